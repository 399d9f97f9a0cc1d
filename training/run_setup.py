"""A training run assembled from its config: the layout and its mesh, the data, the model, the
optimizer, and how a step runs (micro-batches, autocast, TP's loss). train.py, the benchmarks,
gpu_check and the tests all build their runs here, so they run what training runs."""

from dataclasses import dataclass

import torch

from data.loader import RandomTokens, TokenLoader, ValidationData, find_shards
from data.tokenizer import TOKENIZERS
from models.parallelize import tp_loss_context
from parallel.layout import Layout, optimizer_meshes
from parallel.process_group import mean_over_ranks
from training.config import ConfigError
from training.model_setup import build_model, gpt_config
from training.param_groups import build_optimizer, build_param_groups
from training.precision import bf16_autocast
from training.step import accumulate_gradients, apply_gradients

# Where a run's batches come from: the config's token shards, or random ids made on the device.
DATA_SOURCES = ("shards", "random")
# Random batches replayed in turn: enough that micro-batches differ, few enough to stay small.
RANDOM_BATCHES = 4


def layout_of(cfg, world_size):
    """The Layout of the config's sizes on `world_size` ranks, checked against the model (TP
    splits the heads and the padded vocabulary of the config's tokenizer) and the batch,
    before any work starts."""
    layout = Layout.from_sizes(world_size, cfg.dp_size, cfg.fs_size, cfg.tp_size)
    layout.check_divides("n_head", cfg.n_head)
    layout.check_divides("padded vocabulary", gpt_config(cfg).padded_vocab_size)
    batch_ranks = layout.dp * layout.fs
    if cfg.batch_size % (cfg.device_batch_size * batch_ranks):
        raise ConfigError(
            f"batch_size {cfg.batch_size} must be a multiple of device_batch_size "
            f"{cfg.device_batch_size} x data-parallel ranks (dp_size x fs_size) {batch_ranks}"
        )
    return layout


def accum_steps(cfg, layout):
    """Micro-batches per optimizer step on each rank of `layout` (a whole number: `layout_of`
    checks the batch against the data-parallel ranks, the config against one process)."""
    return cfg.batch_size // (cfg.device_batch_size * layout.dp * layout.fs)


@dataclass
class Run:
    """One rank's part of a training run, ready to step."""

    cfg: object
    layout: Layout
    ctx: object  # the rank's parallel.process_group.DistContext
    mesh: object  # the ("dp", "fs", "tp") DeviceMesh, None in one process
    model: torch.nn.Module
    forward: torch.nn.Module  # what runs a micro-batch: the model, DDP-wrapped or compiled
    groups: list  # the optimizer's param groups, one per parameter role
    optimizer: torch.optim.Optimizer
    train_data: object  # next_batch() gives this rank's (input, target)
    val_data: ValidationData | None  # None for random data, or without validation
    accum_steps: int
    autocast: object

    @property
    def tp_mesh(self):
        """The tensor-parallel mesh, None without TP."""
        return self.mesh["tp"] if self.layout.tp_enabled else None

    def accumulate(self):
        """Forward and backward one step's micro-batches; this rank's mean loss (0-d tensor)."""
        next_batch = self.train_data.next_batch
        with tp_loss_context(self.layout.tp_enabled):
            return accumulate_gradients(self.forward, next_batch, self.accum_steps, self.autocast)

    def apply(self, train_loss, lr_scale, stop_requested=False):
        """Clip and step at `lr_scale` x the base lr, or skip a non-finite step (the
        StepOutcome says which)."""
        return apply_gradients(
            self.model,
            self.optimizer,
            train_loss,
            lr_scale,
            self.cfg.grad_clip,
            stop_requested,
            self.ctx.world_size,
            self.tp_mesh,
        )

    @torch.no_grad()
    def evaluate(self):
        """Mean loss over the fixed validation prefix, averaged over ranks."""
        self.model.eval()
        total = torch.zeros((), device=self.ctx.device)
        with tp_loss_context(self.layout.tp_enabled):
            for x, y in self.val_data:
                with self.autocast:
                    total += self.model(x, y).float()
        self.model.train()
        return mean_over_ranks(total / len(self.val_data), self.ctx).item()


def build_run(cfg, layout, ctx, data="shards", validation=True):
    """The Run of `cfg` on this rank of `layout`. The data comes first, so that a missing or
    corrupt shard stops the run before the model takes any memory.

    `data` is one of DATA_SOURCES: "random" draws a few batches of ids on the device from the
    seed and this rank's batch index, with no validation data. A benchmark that reads shards
    but never evaluates passes `validation=False`: no val shards, and no `val_tokens` to hold."""
    if data not in DATA_SOURCES:
        raise ValueError(f"data must be one of {', '.join(DATA_SOURCES)}, got {data!r}")
    mesh = layout.build_mesh(ctx.device.type)
    batch_rank, batch_ranks = layout.data_rank(ctx.rank)
    steps = accum_steps(cfg, layout)
    vocab_size = TOKENIZERS[cfg.tokenizer].vocab_size
    shape = (cfg.device_batch_size, cfg.sequence_length)
    if data == "shards":
        split = (batch_rank, batch_ranks, ctx.device, vocab_size)
        train_data = TokenLoader(find_shards(cfg.data_dir, "train"), *shape, *split)
        val_data = None
        if validation:
            val_data = ValidationData(find_shards(cfg.data_dir, "val"), cfg.val_tokens, *shape, *split)
    else:
        seed = cfg.seed + batch_rank
        train_data = RandomTokens(*shape, vocab_size, ctx.device, seed, min(steps, RANDOM_BATCHES))
        val_data = None
    model, forward = build_model(cfg, layout, mesh, ctx)
    groups = build_param_groups(model, cfg)
    optimizer = build_optimizer(groups, cfg, optimizer_meshes(mesh, ctx.group))
    autocast = bf16_autocast(cfg.precision, ctx.device)
    return Run(
        cfg=cfg,
        layout=layout,
        ctx=ctx,
        mesh=mesh,
        model=model,
        forward=forward,
        groups=groups,
        optimizer=optimizer,
        train_data=train_data,
        val_data=val_data,
        accum_steps=steps,
        autocast=autocast,
    )
