"""Train a GPT: `python train.py --config configs/tiny_cpu.yaml [--key value ...]`.

Under torchrun, every rank runs this file and the batch is split over the ranks.
"""

import math
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from data.loader import DataError, TokenLoader, ValidationData, find_shards
from data.shards import EOT_TOKEN, ShardError
from data.tokenizer import gpt2_encoding
from models.gpt_model import GPT, GPTConfig
from models.parallelize import apply_fsdp, apply_tp, sync_tp_partial_grads
from training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_model_and_optimizer,
    resolve_resume,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from training.config import ConfigError, load_config, to_dict, to_yaml
from training.distributed import grad_sync, init_distributed, mean_over_ranks, shutdown, wrap_model
from training.grad_clip import clip_grad_norm
from training.host_memory import keep_freed_memory
from training.mesh import build_mesh, data_rank, fsdp_mesh, is_sharded, mesh_sizes, optimizer_meshes
from training.metrics import MetricsLogger
from training.param_groups import (
    ParamGroupError,
    build_optimizer,
    build_param_groups,
    describe_param_groups,
    selection_metrics,
)
from training.precision import bf16_autocast, uses_bf16
from training.schedule import lr_multiplier

# Bad input is reported as one line, never a traceback.
USER_ERRORS = (ConfigError, DataError, ShardError, CheckpointError, ParamGroupError)
# Keys that shape the weights or the optimizer state: a checkpoint only resumes into the same values.
RESUME_KEYS = ("model_dim", "n_layer", "n_head", "sequence_length", "optimizer", "scalar_opt")


@torch.no_grad()
def evaluate(model, val_data, autocast, ctx):
    """Mean loss over the fixed validation prefix, averaged over ranks."""
    model.eval()
    total = torch.zeros((), device=ctx.device)
    for x, y in val_data:
        with autocast:
            total += model(x, y).float()
    model.train()
    return mean_over_ranks(total / len(val_data), ctx).item()


def main(argv):
    """Run one training job described by the command line `argv`."""
    # Config and all checks that need no work.
    cfg = load_config(argv)
    keep_freed_memory()
    layout = mesh_sizes(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    ctx = init_distributed(cfg.device)
    mesh = build_mesh(layout, ctx.device.type)
    batch_rank, batch_ranks = data_rank(mesh, ctx)
    if cfg.batch_size % (cfg.device_batch_size * batch_ranks):
        raise ConfigError(
            f"batch_size {cfg.batch_size} must be a multiple of device_batch_size "
            f"{cfg.device_batch_size} x data-parallel ranks (dp_size x fs_size) {batch_ranks}"
        )
    accum_steps = cfg.batch_size // (cfg.device_batch_size * batch_ranks)
    run_dir = Path(cfg.runs_dir) / cfg.run_name
    resume_path = resolve_resume(cfg.resume, run_dir)
    checkpoint = load_checkpoint(resume_path) if resume_path else None
    if checkpoint is not None:
        changed = [k for k in RESUME_KEYS if checkpoint["config"][k] != getattr(cfg, k)]
        if changed:
            raise CheckpointError(
                f"checkpoint {resume_path} has a different {changed[0]} "
                f"({checkpoint['config'][changed[0]]}, config says {getattr(cfg, changed[0])})"
            )

    # Data: the train stream and the fixed validation prefix, split over the dp x fs ranks.
    loader = TokenLoader(
        find_shards(cfg.data_dir, "train"),
        cfg.device_batch_size,
        cfg.sequence_length,
        batch_rank,
        batch_ranks,
        ctx.device,
    )
    val_data = ValidationData(
        find_shards(cfg.data_dir, "val"),
        cfg.val_tokens,
        cfg.device_batch_size,
        cfg.sequence_length,
        batch_rank,
        batch_ranks,
        ctx.device,
    )
    if ctx.is_main:
        print(to_yaml(cfg), end="")
        print("layout dp x fs x tp = {} x {} x {} on {}".format(*layout, ctx.device))
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))

    # Model: built without memory on the meta device, split by TP, sharded by FSDP, then
    # materialised and initialised.
    use_bf16 = uses_bf16(cfg.precision, ctx.device)
    autocast = bf16_autocast(cfg.precision, ctx.device)
    with torch.device("meta"):
        raw_model = GPT(GPTConfig(cfg.model_dim, cfg.n_layer, cfg.n_head, cfg.sequence_length))
    if layout[2] > 1:
        apply_tp(raw_model, mesh["tp"])
    # Under compressed sync the matrices' gradients skip the data-parallel all-reduce.
    compressed = cfg.replicate_mesh_grad_sync and layout[0] > 1
    if is_sharded(layout):
        matrix_mesh = mesh["fs"] if compressed else None
        apply_fsdp(raw_model, fsdp_mesh(mesh), bf16_compute=use_bf16, matrix_mesh=matrix_mesh)
    raw_model.to_empty(device=ctx.device)
    raw_model.init_weights(cfg.seed)
    unsynced = [name for name, _ in raw_model.param_roles()["matrix"]] if compressed else []
    model = wrap_model(raw_model, ctx, unsynced)
    if cfg.compile:
        model = torch.compile(model)

    # Optimizer: one param group per parameter role; the matrices get the orthonormal algorithm.
    groups = build_param_groups(raw_model, cfg)
    optimizer = build_optimizer(groups, cfg, optimizer_meshes(mesh, ctx))
    if ctx.is_main:
        print("\n".join(describe_param_groups(groups)))

    # Resume: weights, optimizer, data position and RNGs, so the run continues exactly.
    step = 0
    if checkpoint is not None:
        load_model_and_optimizer(resume_path, raw_model, optimizer)
        loader.load_state_dict(checkpoint["loader"])
        set_rng_state(checkpoint["rng"])
        step = checkpoint["step"]
        if ctx.is_main:
            print(f"resumed from {resume_path} at step {step}")
    logger = (
        MetricsLogger(
            run_dir,
            cfg,
            resume_step=step if checkpoint else None,
            wandb_id=checkpoint["wandb_id"] if checkpoint else None,
        )
        if ctx.is_main
        else None
    )

    def save(step):
        # Every rank writes its shards of the model and optimizer; any layout can load them.
        optimizer.synchronize_for_checkpoint()
        meta = {
            "loader": loader.state_dict(),
            "rng": rng_state(),
            "step": step,
            "config": to_dict(cfg),
            "wandb_id": logger.wandb_id if ctx.is_main else None,
        }
        save_checkpoint(run_dir, step, raw_model, optimizer, meta, cfg.keep_checkpoints)

    # The loop: accumulate micro-batches, clip the gradient, step, evaluate, checkpoint.
    tokens_per_step = cfg.batch_size * cfg.sequence_length
    bar = tqdm(total=cfg.num_iterations, initial=step, disable=not ctx.is_main, dynamic_ncols=True)
    while step < cfg.num_iterations:
        start = time.perf_counter()
        train_loss = torch.zeros((), device=ctx.device)
        for micro in range(accum_steps):
            x, y = loader.next_batch()
            with grad_sync(model, sync=micro == accum_steps - 1), autocast:
                loss = model(x, y)
            (loss / accum_steps).backward()
            train_loss += loss.detach().float() / accum_steps
        if layout[2] > 1:
            sync_tp_partial_grads(raw_model, mesh["tp"])
        grad_norm = clip_grad_norm(raw_model.parameters(), cfg.grad_clip or math.inf)
        lr_scale = lr_multiplier(step, cfg.num_iterations, cfg.warmup_ratio, cfg.warmdown_ratio)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_scale
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        train_loss = mean_over_ranks(train_loss, ctx).item()
        step_time = time.perf_counter() - start
        record = {
            "step": step,
            "train_loss": train_loss,
            "lr": cfg.lr * lr_scale,
            "grad_norm": grad_norm.item(),
            "tokens": step * tokens_per_step,
            "step_time": step_time,
            "tokens_per_s": tokens_per_step / step_time,
            "comm_bytes": optimizer.comm_bytes(),
        }
        last = step == cfg.num_iterations
        if last or (cfg.val_loss_every and step % cfg.val_loss_every == 0):
            record["val_loss"] = evaluate(raw_model, val_data, autocast, ctx)
        if cfg.diagnostics_every and (last or step % cfg.diagnostics_every == 0):
            record.update(selection_metrics(optimizer))
        if ctx.is_main:
            logger.log(record)
            bar.update()
            bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}")
            if "val_loss" in record:
                bar.write(f"step {step}: val_loss {record['val_loss']:.4f}")
        if last or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
            save(step)
    bar.close()

    if ctx.is_main:
        logger.close()
    if cfg.sample_tokens:
        # Every rank samples the same tokens (sharded weights need all ranks); rank 0 prints.
        prompt = torch.tensor([[EOT_TOKEN]], device=ctx.device)
        generator = torch.Generator(ctx.device).manual_seed(cfg.seed)
        with autocast:
            sample = raw_model.generate(prompt, cfg.sample_tokens, top_k=200, generator=generator)
        if ctx.is_main:
            print(f"sample:\n{gpt2_encoding()[0].decode(sample[0, 1:].tolist())}")
    shutdown(ctx)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except USER_ERRORS as e:
        sys.exit(f"error: {e}")
