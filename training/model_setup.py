"""The model of a run on this rank: built, parallelized, initialised and wrapped."""

import torch

from data.tokenizer import TOKENIZERS
from models.activation_checkpointing import apply_activation_checkpointing
from models.gpt_model import GPT, GPTConfig
from models.parallelize import apply_fsdp, apply_tp, wrap_model
from parallel.layout import fsdp_mesh
from training.precision import uses_bf16


def compressed_sync(cfg, layout):
    """Whether the matrices' gradients skip the data-parallel all-reduce (the optimizer
    averages a compressed form of them instead)."""
    return cfg.replicate_mesh_grad_sync and layout.dp_enabled


def gpt_config(cfg):
    """The model shape that `cfg` names."""
    vocab_size = TOKENIZERS[cfg.tokenizer].vocab_size
    return GPTConfig(cfg.model_dim, cfg.n_layer, cfg.n_head, cfg.sequence_length, vocab_size)


def build_model(cfg, layout, mesh, ctx):
    """(model, forward): the GPT of `cfg`, and the module that runs its steps (DDP-wrapped,
    compiled, or the model itself).

    The model is built without memory on the meta device, split by TP, given its activation
    checkpointing, sharded by FSDP, and only then materialised on this rank's device and
    initialised from the seed: every rank draws the same full tensors and keeps its block, so
    all layouts start from the same weights.
    """
    with torch.device("meta"):
        model = GPT(gpt_config(cfg))
    if layout.tp_enabled:
        apply_tp(model, mesh["tp"])
    apply_activation_checkpointing(model, cfg.activation_checkpointing, cfg.ac_every)
    compressed = compressed_sync(cfg, layout)
    if layout.sharded:
        apply_fsdp(
            model,
            fsdp_mesh(mesh),
            bf16_compute=uses_bf16(cfg.precision, ctx.device),
            matrix_mesh=mesh["fs"] if compressed else None,
        )
    model.to_empty(device=ctx.device)
    model.init_weights(cfg.seed)
    unsynced = [name for name, _ in model.param_roles()["matrix"]] if compressed else []
    forward = wrap_model(model, ctx, unsynced)
    if cfg.compile:
        forward = torch.compile(forward)
    return model, forward
