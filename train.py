"""Train a GPT: `python train.py --config configs/tiny_cpu.yaml [--key value ...]`.

Under torchrun, every rank runs this file and the batch is split over the ranks. The exit code
says how the run ended (training/exit_codes.py): finished, bad input, a non-finite loss or
gradient, or preempted with a checkpoint to resume from.
"""

import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from data.loader import DataError
from data.shards import ShardError
from data.tokenizer import TOKENIZERS
from parallel.layout import LayoutError
from parallel.process_group import DeviceError, process_group
from training.checkpoint import (
    CheckpointError,
    check_resumes_into,
    load_checkpoint,
    load_model_and_optimizer,
    resolve_resume,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from training.config import ConfigError, command_line, to_dict, to_yaml
from training.diagnostics import Diagnostics
from training.exit_codes import ExitCode
from training.host_memory import keep_freed_memory
from training.metrics import MetricsLogger
from training.param_groups import ParamGroupError, describe_param_groups, newton_schulz_note
from training.preemption import PreemptionHandler, parse_signals
from training.run_setup import build_run, layout_of
from training.schedule import lr_multiplier
from training.step import NonFiniteError

# Bad input is reported as one line, never a traceback.
USER_ERRORS = (ConfigError, LayoutError, DeviceError, DataError, ShardError, CheckpointError, ParamGroupError)
# Errors that every rank raises alike, so the ranks can still leave the process group together.
AGREED_ERRORS = (*USER_ERRORS, NonFiniteError)


def main(argv):
    """Run one training job described by the command line `argv`; return its ExitCode."""
    cfg = command_line(argv)
    if cfg is None:  # --help
        return ExitCode.FINISHED
    keep_freed_memory()
    layout = layout_of(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    # Signals are caught from the start, so one during set-up still ends in a checkpoint.
    with (
        process_group(cfg.device, cfg.timeout, agreed_errors=AGREED_ERRORS) as ctx,
        PreemptionHandler(parse_signals(cfg.preempt_signals)) as preemption,
    ):
        return train(cfg, layout, ctx, preemption)


def train(cfg, layout, ctx, preemption):
    """Train on the ranks of `ctx`: resume, then the loop. Returns FINISHED, or PREEMPTED once
    the step during which `preemption` was requested is saved."""
    run_dir = Path(cfg.runs_dir) / cfg.run_name
    resume_path, passed_over = resolve_resume(cfg.resume, run_dir)
    checkpoint = load_checkpoint(resume_path) if resume_path else None
    if checkpoint is not None:
        check_resumes_into(checkpoint, resume_path, cfg)
    run = build_run(cfg, layout, ctx)
    model, optimizer, loader = run.model, run.optimizer, run.train_data
    if ctx.is_main:
        print(to_yaml(cfg), end="")
        print(f"layout {layout} on {ctx.device}")
        for note in passed_over:
            print(note)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        print("\n".join(describe_param_groups(run.groups)))
        if (note := newton_schulz_note(cfg, ctx.device)) is not None:
            print(note)

    # Resume: weights, optimizer, data position and RNGs, so the run continues exactly.
    step, skipped = 0, 0
    if checkpoint is not None:
        load_model_and_optimizer(resume_path, model, optimizer)
        loader.load_state_dict(checkpoint["loader"])
        set_rng_state(checkpoint["rng"])
        step, skipped = checkpoint["step"], checkpoint.get("skipped_steps", 0)
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
            "skipped_steps": skipped,
            "config": to_dict(cfg),
            "wandb_id": logger.wandb_id if ctx.is_main else None,
        }
        save_checkpoint(run_dir, step, model, optimizer, meta, cfg.keep_checkpoints)

    # The loop: accumulate micro-batches, agree over the ranks, clip and step, evaluate, checkpoint.
    tokens_per_step = cfg.batch_size * cfg.sequence_length
    diagnostics = Diagnostics(model, optimizer, cfg.diagnostics_every)
    # The progress bar goes to stdout, so that stderr holds only warnings and errors.
    with tqdm(
        total=cfg.num_iterations, initial=step, disable=not ctx.is_main, dynamic_ncols=True, file=sys.stdout
    ) as bar:
        while step < cfg.num_iterations:
            start = time.perf_counter()
            last = step + 1 == cfg.num_iterations
            measured = diagnostics.due(step + 1, last)
            train_loss = run.accumulate()
            if measured:
                diagnostics.before_step()
            lr_scale = lr_multiplier(step, cfg.num_iterations, cfg.warmup_ratio, cfg.warmdown_ratio)
            outcome = run.apply(train_loss, lr_scale, preemption.requested)
            step += 1
            step_time = time.perf_counter() - start
            record = {
                "step": step,
                "train_loss": outcome.train_loss,
                "lr": cfg.lr * lr_scale,
                "grad_norm": outcome.grad_norm,
                "tokens": step * tokens_per_step,
                "step_time": step_time,
                "tokens_per_s": tokens_per_step / step_time,
                "comm_bytes": optimizer.comm_bytes(),
            }
            if outcome.nonfinite:
                skipped += 1
                record.update(nonfinite=outcome.nonfinite, skipped_steps=skipped)
                if skipped > cfg.max_skipped_steps:
                    if ctx.is_main:
                        logger.log(record)
                    raise NonFiniteError(step, outcome, cfg.max_skipped_steps)
            if last or (cfg.val_loss_every and step % cfg.val_loss_every == 0):
                record["val_loss"] = run.evaluate()
            if measured:
                record.update(diagnostics.after_step())
            if ctx.is_main:
                logger.log(record)
                bar.update()
                bar.set_postfix(loss=f"{outcome.train_loss:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}")
                if "val_loss" in record:
                    bar.write(f"step {step}: val_loss {record['val_loss']:.4f}")
            if last or outcome.stop_requested or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                save(step)
            if outcome.stop_requested:
                break
    if ctx.is_main:
        logger.close()

    if step < cfg.num_iterations:
        if ctx.is_main:
            print(f"preempted after step {step}, which is checkpointed: continue with --resume auto")
        return ExitCode.PREEMPTED
    if cfg.sample_tokens:
        # Every rank samples the same tokens (sharded weights need all ranks); rank 0 prints.
        tokenizer = TOKENIZERS[cfg.tokenizer]
        prompt = torch.tensor([[tokenizer.eot]], device=ctx.device)
        generator = torch.Generator(ctx.device).manual_seed(cfg.seed)
        with run.autocast:
            sample = model.generate(prompt, cfg.sample_tokens, top_k=200, generator=generator)
        if ctx.is_main:
            print(f"sample:\n{tokenizer.decode(sample[0, 1:].tolist())}")
    return ExitCode.FINISHED


def fail(code, error):
    """Exit with `code`, the error as one line on stderr (from the first rank only)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {error}", file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except USER_ERRORS as e:
        fail(ExitCode.BAD_INPUT, e)
    except NonFiniteError as e:
        fail(ExitCode.NON_FINITE, e)
