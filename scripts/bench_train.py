"""Training throughput: tokens/s, where the step's time goes, peak memory and MFU.

    python scripts/bench_train.py --config configs/tiny_cpu.yaml --optimizer muon,dion2,adamw
    python scripts/bench_train.py --config configs/dion2_160m.yaml --optimizer adamw,dion2 \\
        --ortho_fraction 0.25 --compile true
    python scripts/bench_train.py --config configs/tiny_cpu.yaml --optimizer muon,dion2,adamw \\
        --diagnostics_every 10 --steps 60                  # what the diagnostics cost
    python scripts/bench_train.py --config configs/tiny_cpu.yaml --optimizer dion2 \\
        --activation_checkpointing none,selective,full     # memory against recompute

Each optimizer in `--optimizer`, under each mode in `--activation_checkpointing` (a list here;
the config's mode when it is not given), runs in a fresh process: `--warmup` steps (compilation
happens there), then `--steps` timed training steps of the config on random tokens (or, with
`--data shards`, the config's `data_dir` through the loader), in one process on one device.
The model is built and each step taken by the very functions that train.py calls
(training/run_setup.py): every micro-batch's forward and backward, then
the gradient clipping, the ranks' agreement on the loss, and optimizer.step().
Any other `--key value` is a config override, as for train.py.

Reported per optimizer: median step time, tokens/s, the shares of forward+backward and of the
rest of the step (clipping, the loss check and optimizer.step()), peak memory (CUDA: the
allocator's peak; CPU: the process's peak resident set), and on CUDA the model FLOPs
utilization against the device's dense bf16 peak (`--peak_tflops` overrides the table).
Ratios are against the first run listed. The optimizer diagnostics run every
`diagnostics_every` steps, as in train.py; their cost is the median measured step's excess over
the median plain step, spread over the steps between two measured ones.
"""

import argparse
import multiprocessing
import resource
import statistics
import sys
import time

import torch

from data.loader import DataError
from data.shards import ShardError
from models.flops import training_flops
from parallel.layout import Layout
from parallel.process_group import DeviceError, init_distributed
from scripts.results import results_file
from scripts.timing import synchronize
from training.config import CHOICES, ConfigError, load_config_for
from training.diagnostics import Diagnostics
from training.param_groups import ParamGroupError
from training.run_setup import DATA_SOURCES, build_run

# Dense bf16 tensor-core peaks in TFLOP/s, from the vendors' datasheets. The first name that
# appears in torch.cuda.get_device_name() wins, so the more specific names come first.
PEAK_BF16_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,
    "H200": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
}


def peak_tflops(device, override):
    """The device's dense bf16 peak (None where unknown, or off CUDA)."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def measure(argv, optimizer, steps, warmup, peak_override, data="random"):
    """Run warmup + timed steps of one optimizer on `data` (one of DATA_SOURCES: "random"
    tokens made on the device, or the config's "shards" through the loader); return its
    measurements."""
    cfg = load_config_for(argv, optimizer)
    ctx = init_distributed(cfg.device, cfg.timeout)
    device = ctx.device
    run = build_run(cfg, Layout(), ctx, data, validation=False)
    model, opt = run.model, run.optimizer
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    diagnostics = Diagnostics(model, opt, cfg.diagnostics_every)
    step_times, backward_times, optimizer_times, measured_times = [], [], [], []
    for step in range(warmup + steps):
        measured = diagnostics.due(step + 1, False)
        synchronize(device)
        start = time.perf_counter()
        train_loss = run.accumulate()
        if measured:
            diagnostics.before_step()
        synchronize(device)
        optimizer_start = time.perf_counter()
        outcome = run.apply(train_loss, 1.0)
        if measured:
            diagnostics.after_step()
        synchronize(device)
        if step >= warmup:
            (measured_times if measured else step_times).append(time.perf_counter() - start)
            backward_times.append(optimizer_start - start)
            optimizer_times.append(time.perf_counter() - optimizer_start)
    if device.type == "cuda":
        peak_bytes = torch.cuda.max_memory_allocated(device)
    else:
        peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "device_type": device.type,
        # Every step measured (diagnostics_every 1) leaves no plain step to compare with.
        "step": statistics.median(step_times or measured_times),
        "forward_backward": statistics.median(backward_times),
        "optimizer": statistics.median(optimizer_times),
        "tokens_per_step": cfg.batch_size * cfg.sequence_length,
        "flops_per_token": sum(training_flops(model).values()),
        "peak_bytes": peak_bytes,
        "peak_tflops": peak_tflops(device, peak_override),
        "final_loss": outcome.train_loss,
        "diagnostics_every": cfg.diagnostics_every,
        "measured_step": statistics.median(measured_times) if measured_times and step_times else None,
    }


def report(results, steps, warmup):
    """Print the side-by-side table and the ratios to the first run."""
    first = next(iter(results.values()))
    peak = first["peak_tflops"]
    print(
        f"{first['device']}: median of {steps} steps after {warmup} warm-up steps, "
        f"{first['tokens_per_step']:,} tokens/step"
    )
    width = max(10, *map(len, results))
    header = f"{'run':<{width}} {'step ms':>9} {'tokens/s':>11} {'fwd+bwd':>8} {'optim':>7} {'peak GiB':>9}"
    print(header + (f" {'MFU':>6}" if peak else ""))
    for name, r in results.items():
        tokens_per_s = r["tokens_per_step"] / r["step"]
        line = (
            f"{name:<{width}} {r['step'] * 1e3:>9.1f} {tokens_per_s:>11,.0f} "
            f"{r['forward_backward'] / r['step']:>8.1%} {r['optimizer'] / r['step']:>7.1%} "
            f"{r['peak_bytes'] / 2**30:>9.2f}"
        )
        if peak:
            line += f" {r['flops_per_token'] * tokens_per_s / (peak * 1e12):>6.1%}"
        print(line)
    if first["device_type"] == "cuda" and not peak:
        print("MFU: this GPU is not in the table of bf16 peaks; pass --peak_tflops")
    for name, r in results.items():
        if r["measured_step"] is not None:
            extra = (r["measured_step"] - r["step"]) / (r["diagnostics_every"] * r["step"])
            print(
                f"{name}: diagnostics every {r['diagnostics_every']} steps: a measured step takes "
                f"{r['measured_step'] * 1e3:.1f} ms against {r['step'] * 1e3:.1f} ms: "
                f"{extra:.2%} of the step time"
            )
    base_name = next(iter(results))
    print(f"ratios to {base_name}:")
    print(f"{'run':<{width}} {'tokens/s':>9} {'optim ms':>9} {'peak mem':>9}")
    for name, r in results.items():
        print(
            f"{name:<{width}} {first['step'] / r['step']:>9.3f} {r['optimizer'] / first['optimizer']:>9.3f} "
            f"{r['peak_bytes'] / first['peak_bytes']:>9.3f}"
        )


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--optimizer", default="muon,dion2,adamw", help="comma-separated optimizers")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per optimizer")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    parser.add_argument("--peak_tflops", type=float, default=None, help="the device's bf16 peak, for MFU")
    parser.add_argument("--write", default=None, help="also write the report to this results file (markdown)")
    parser.add_argument(
        "--data",
        choices=DATA_SOURCES,
        default="random",
        help="random tokens made on the device, or the config's data_dir through the loader",
    )
    parser.add_argument(
        "--activation_checkpointing",
        default=None,
        help="comma-separated modes to compare, each with every optimizer (default: the config's)",
    )
    args, config_argv = parser.parse_known_args(argv)
    names = [n.strip() for n in args.optimizer.split(",") if n.strip()]
    unknown = [n for n in names if n not in CHOICES["optimizer"]]
    if not names or unknown:
        parser.error(
            f"--optimizer {args.optimizer!r}: unknown {', '.join(unknown) or 'empty list'}; "
            f"allowed: {', '.join(CHOICES['optimizer'])}, comma-separated"
        )
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    runs = {name: (name, config_argv) for name in names}
    if args.activation_checkpointing is not None:
        modes = [m.strip() for m in args.activation_checkpointing.split(",") if m.strip()]
        runs = {
            f"{name} ac={mode}": (name, [*config_argv, "--activation_checkpointing", mode])
            for name in names
            for mode in modes
        }
    return args, runs


def main(argv):
    args, runs = parse_args(argv)
    try:
        for name, run_argv in runs.values():  # bad config input fails here, before any work
            load_config_for(run_argv, name)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    results = {}
    # A fresh process per run, so that the peak memory and the caches are its own.
    context = multiprocessing.get_context("spawn")
    for label, (name, run_argv) in runs.items():
        with context.Pool(1) as pool:
            try:
                results[label] = pool.apply(
                    measure, (run_argv, name, args.steps, args.warmup, args.peak_tflops, args.data)
                )
            except (ConfigError, ParamGroupError, DeviceError, DataError, ShardError) as e:
                sys.exit(f"error: {label}: {e}")
        print(f"{label}: {results[label]['step'] * 1e3:.1f} ms/step", file=sys.stderr)
    device = "cuda" if next(iter(results.values()))["device_type"] == "cuda" else "cpu"
    with results_file(args.write, "bench_train.py", argv, device):
        report(results, args.steps, args.warmup)


if __name__ == "__main__":
    main(sys.argv[1:])
