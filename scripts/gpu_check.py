"""Every CUDA-only path, checked on one GPU in under 8 minutes, with one table of results.

    python scripts/gpu_check.py                          # on a machine with a CUDA GPU
    python scripts/gpu_check.py --cache_dir /tmp/gc      # compiled graphs kept: a rerun is cheap
    python scripts/gpu_check.py --dry-run                # list the checks, run nothing

The test suite runs on CPUs, so these paths are checked nowhere else:
- the Triton kernels, compiled for the GPU, against PyTorch: fp32 products must be full fp32
  (tl.dot would take TF32); a launch must run on the current stream of its tensors' device
  (one GPU: a second stream; a second GPU current while the tensors are on the first needs 2);
- bf16 autocast, and FSDP's bf16 mixed precision on one rank, which must compute what
  autocast computes (fp32 residual stream and rotary tables);
- the CUDA generator's state through a checkpoint's JSON (with another GPU current, given 2);
- `compile: true`, with no recompile after the first step;
- no host synchronization (CUDA's sync debug mode) in the gradient clipping and
  optimizer.step() of each optimizer, eager, compiled and with the Triton kernels, with the
  diagnostics capturing; in the loader's batches; and exactly one in the ranks' agreement;
- Newton-Schulz in bf16 through the Triton kernels against PyTorch, timed on the 160M and 1B
  buckets: whether the fixed 64 x 32 tiles need autotuning;
- `--steps` training steps of the 160M config with each optimizer on the shipped GPT-2 token
  shards through the real loader, each in a fresh process so that its peak memory is its own:
  tokens/s, MFU, the optimizer's share of the step and peak memory (scripts/bench_train.py).

Time on one H100, by estimate: the 160M rows take about 6 x 25 s = 2.5 min (a process's
start and model build 10 s, 5 warm-up and 100 timed steps at about 0.1 s each for 16 x 1024
tokens at 30-40% MFU); the compile check and the compiled host-sync variants about 4 x 30 s
= 2 min of Inductor compilation the first time (seconds with --cache_dir on a rerun); the
Triton timing about 30 s (each tile shape's first compile, then 5 timed calls per bucket);
the rest under 1 min. About 6 min in all, 4 min on a rerun with the cache.

It needs torch, numpy, PyYAML and triton, and names every one missing in one line before any
check; it exits 0 when every check passes, 1 otherwise. Without CUDA it says so in one line
and exits 0.
"""

import argparse
import importlib.util
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
import traceback
import warnings
from functools import partial
from pathlib import Path

import torch

if importlib.util.find_spec("optimizers") is None:  # a file of a checkout that pip has not installed
    sys.exit(
        "gpu_check: the repository is not installed; from its root run "
        "`python -m pip install --no-deps --no-build-isolation -e .`, or `python -m scripts.gpu_check`"
    )

from optimizers.registry import OPTIMIZERS
from scripts.timing import interleaved

REPO = Path(__file__).resolve().parents[1]
# A model small enough to check a path in seconds, with every kind of parameter.
SMALL = ["--model_dim", "256", "--n_layer", "2", "--n_head", "4", "--sequence_length", "256"]
SMALL += ["--batch_size", "8", "--device_batch_size", "8", "--lr", "0.02"]
# What the checks import beyond torch, by import name and by the name pip installs it under.
REQUIRED = {"numpy": "numpy", "yaml": "PyYAML", "triton": "triton"}
# GPT-2 token shards that ship with the repository: the 160M rows read them through the loader.
SHIPPED_SHARDS = REPO / "data" / "shakespeare"


class Skipped(Exception):
    """A check that this machine cannot run (for example one that needs two GPUs)."""


def relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check_triton_products(device):
    """The symmetric-product kernel against torch.bmm, in fp32 and bf16."""
    from optimizers.triton_ns import sym_gram

    generator = torch.Generator(device).manual_seed(0)
    x = torch.randn(4, 512, 768, device=device, generator=generator)
    exact = torch.bmm(x.double(), x.double().mT)
    fp32 = relative_error(sym_gram(x), exact)
    bf16 = relative_error(sym_gram(x.bfloat16()), exact)
    # Full fp32 is about 1e-7 off here; TF32 (10-bit mantissas) about 1e-3.
    assert fp32 < 1e-5, f"fp32 products {fp32:.1e} off: not full fp32 (TF32?)"
    assert bf16 < 2e-2, f"bf16 products {bf16:.1e} off"
    return f"relative error: fp32 {fp32:.1e}, bf16 {bf16:.1e}"


def check_triton_newton_schulz(device):
    """Newton-Schulz through the kernels against the PyTorch path, per compute dtype."""
    from optimizers.newton_schulz import newton_schulz

    generator = torch.Generator(device).manual_seed(1)
    x = torch.randn(8, 768, 3072, device=device, generator=generator)
    reference = newton_schulz(x.double(), dtype=torch.float64)
    errors = {}
    for dtype in (torch.float32, torch.bfloat16):
        kernels = relative_error(newton_schulz(x, dtype=dtype, use_triton=True), reference)
        pytorch = relative_error(newton_schulz(x, dtype=dtype), reference)
        errors[dtype] = (kernels, pytorch)
        assert kernels <= 2 * pytorch + 1e-5, f"{dtype}: kernels {kernels:.1e} vs PyTorch {pytorch:.1e}"
    return ", ".join(f"{str(d)[6:]}: kernels {k:.1e}, PyTorch {p:.1e}" for d, (k, p) in errors.items())


def check_triton_launch_placement(device):
    """A launch runs on the current stream of its tensors' device (2 GPUs: with another current)."""
    from optimizers.triton_ns import sym_gram

    source = torch.randn(2, 128, 256, device=device)
    expected = torch.bmm(source, source.mT)
    x = torch.zeros_like(source)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        # The input is written only after a sleep on this stream: a launch on any other stream
        # would read the zeros still there.
        torch.cuda._sleep(100_000_000)
        x.copy_(source)
        result = sym_gram(x)
    torch.cuda.synchronize(device)
    error = relative_error(result, expected)
    assert error < 1e-5, f"second stream: {error:.1e} off"
    details = [f"on a second stream: relative error {error:.1e}"]
    if torch.cuda.device_count() < 2:
        details.append("a launch on cuda:1 with cuda:0 current needs 2 GPUs (not run)")
        return "; ".join(details)
    other = torch.device("cuda", 1)
    x = torch.randn(2, 128, 256, device=other)
    with torch.cuda.device(0):
        result = sym_gram(x)
    torch.cuda.synchronize(other)
    error = relative_error(result, torch.bmm(x, x.mT))
    assert error < 1e-5, f"cuda:1 with cuda:0 current: {error:.1e} off"
    return "; ".join([*details, f"cuda:1 with cuda:0 current: relative error {error:.1e}"])


# The buckets Muon orthonormalizes per step: (count, rows, cols) of the 160M (768 wide, 12
# layers) and 1B (2048 wide, 16 layers) models' q, k, v and out, MLP fc and MLP proj.
NS_BUCKETS = {
    "160M": [(48, 768, 768), (12, 3072, 768), (12, 768, 3072)],
    "1B": [(64, 2048, 2048), (16, 8192, 2048), (16, 2048, 8192)],
}


def check_triton_bf16_timing(device):
    """Newton-Schulz in bf16, Triton kernels against PyTorch, on the 160M and 1B buckets."""
    from optimizers.newton_schulz import newton_schulz

    parts, ratios = [], []
    for model, buckets in NS_BUCKETS.items():
        for count, m, n in buckets:
            x = torch.randn(count, m, n, device=device)
            calls = {
                kernels: lambda x=x, k=kernels: newton_schulz(x, dtype=torch.bfloat16, use_triton=k)
                for kernels in (False, True)
            }
            seconds = {k: statistics.median(t) for k, t in interleaved(calls, 5, 1, device).items()}
            ratios.append(seconds[True] / seconds[False])
            parts.append(
                f"{model} {count}x{m}x{n}: PyTorch {seconds[False] * 1e3:.1f} ms, "
                f"Triton {seconds[True] * 1e3:.1f} ms ({ratios[-1]:.2f}x)"
            )
            del x
    return {"detail": "; ".join(parts), "triton/pytorch": f"{min(ratios):.2f}-{max(ratios):.2f}x"}


def training_run(argv, optimizer="muon"):
    """The Run (training/run_setup.py) of a one-process run of `argv` on random tokens."""
    from parallel.layout import Layout
    from parallel.process_group import init_distributed
    from training.config import load_config_for
    from training.run_setup import build_run

    cfg = load_config_for([*argv, "--run_name", "gpu_check"], optimizer)
    return build_run(cfg, Layout(), init_distributed(cfg.device, cfg.timeout), data="random")


def train_losses(run, steps):
    """The train losses of `steps` steps of a Run."""
    losses = []
    for step in range(steps):
        loss = run.accumulate()
        lr_scale = 1 - step / (2 * steps)  # a changing lr, as the schedule gives
        losses.append(run.apply(loss, lr_scale).train_loss)
    return losses


def residual_dtypes(model):
    """A hook list recording the dtype of every block's input (the residual stream)."""
    seen = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda _, args: seen.append((args[0].dtype, args[1].dtype)))
    return seen


def check_bf16_autocast(device):
    """20 steps in bf16 against fp32: finite, close, the residual stream and rotary tables fp32."""
    losses = {}
    for precision in ("fp32", "bf16"):
        run = training_run([*SMALL, "--device", str(device), "--precision", precision])
        seen = residual_dtypes(run.model)
        losses[precision] = train_losses(run, 20)
    assert set(seen) == {(torch.float32, torch.float32)}, f"block inputs {set(seen)}"
    gap = max(abs(a - b) for a, b in zip(losses["fp32"], losses["bf16"], strict=True))
    assert all(map(math.isfinite, losses["bf16"])) and losses["bf16"][-1] < losses["bf16"][0]
    assert gap < 0.1, f"bf16 and fp32 losses {gap:.3f} apart"
    return f"loss {losses['bf16'][0]:.3f} -> {losses['bf16'][-1]:.3f}; largest gap to fp32 {gap:.1e}"


def check_fsdp_mixed_precision(device):
    """FSDP on one rank with bf16 parameters against autocast alone: the same losses."""
    import dataclasses

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from models.gpt_model import GPT
    from models.parallelize import apply_fsdp
    from training.param_groups import build_optimizer, build_param_groups

    run = training_run([*SMALL, "--device", str(device), "--precision", "bf16"], "adamw")
    cfg = run.cfg
    plain = train_losses(run, 5)
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with torch.device("meta"):
            sharded = GPT(run.model.config)
        apply_fsdp(sharded, init_device_mesh("cuda", (1,)), bf16_compute=True)
        sharded.to_empty(device=device)
        sharded.init_weights(cfg.seed)
        seen = residual_dtypes(sharded)
        opt = build_optimizer(build_param_groups(sharded, cfg), cfg)
        # The same batch (the run's one micro-batch), autocast and clipping, on the FSDP model.
        fsdp = train_losses(dataclasses.replace(run, model=sharded, forward=sharded, optimizer=opt), 5)
    finally:
        dist.destroy_process_group()
    assert set(seen) == {(torch.float32, torch.float32)}, f"block inputs {set(seen)}"
    gap = max(abs(a - b) for a, b in zip(plain, fsdp, strict=True))
    assert gap < 1e-3, f"FSDP bf16 losses {gap:.1e} from autocast's"
    return f"AdamW, 5 steps: largest loss gap to autocast alone {gap:.1e}"


def check_cuda_rng(device):
    """The CUDA generator's state through a checkpoint's JSON and back (2 GPUs: on cuda:1)."""
    from training.checkpoint import rng_state, set_rng_state

    # With a second GPU, the process's own device is cuda:1, as a torchrun rank's would be: a
    # state kept by a fixed index (cuda:0's) instead of the current device's would not give
    # cuda:1's draws back.
    own = torch.device("cuda", 1) if torch.cuda.device_count() > 1 else device
    with torch.cuda.device(own):
        state = json.loads(json.dumps(rng_state()))
        expected = torch.rand(4, device=own)
        torch.rand(100, device=own)
        set_rng_state(state)
        assert torch.equal(torch.rand(4, device=own), expected), f"another draw on {own} after the restore"
    if own == device:
        return "the same draw after the restore; with another GPU as the process's own needs 2 GPUs (not run)"
    return f"the same draw on {own}, the current device, after the restore"


def check_compile(device):
    """compile: true (model and optimizer) for Muon and Dion2: no compile after the first step."""
    from torch._dynamo.utils import counters

    details = []
    for optimizer in ("muon", "dion2"):
        run = training_run([*SMALL, "--device", str(device), "--compile", "true"], optimizer)
        first = train_losses(run, 1)
        compiled = counters["stats"]["unique_graphs"]
        later = train_losses(run, 3)
        recompiled = counters["stats"]["unique_graphs"] - compiled
        assert recompiled == 0, f"{optimizer}: {recompiled} graphs compiled after the first step"
        assert all(map(math.isfinite, first + later))
        details.append(f"{optimizer} {compiled} graphs")
    return ", ".join(details) + ", none after step 1"


def host_waits(device, fn):
    """fn() under CUDA's sync debug mode "warn": (its result, how often the host waited)."""
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return result, sum("synchroniz" in str(w.message) for w in caught)


def check_no_host_sync(device):
    """No host wait in each optimizer's clip and step (eager, compiled, Triton) or the loader."""
    from data.loader import TokenLoader, find_shards
    from training.grad_clip import clip_grad_norm
    from training.step import agree

    variants = {name: [name] for name in OPTIMIZERS}
    variants["dion2 random"] = ["dion2", "--selection", "random"]
    for name in ("muon", "dion2"):
        variants[f"{name} compiled"] = [name, "--compile", "true"]
        variants[f"{name} triton"] = [name, "--use_triton", "true"]
    for name, (optimizer, *options) in variants.items():
        run = training_run([*SMALL, "--device", str(device), *options], optimizer)
        model, opt = run.model, run.optimizer
        train_losses(run, 2)  # state made, caches warm, compiled
        run.accumulate()

        def clip_and_step(model=model, opt=opt):
            norm = clip_grad_norm(model.parameters(), 1.0)
            opt.capture_orthogonality()  # the diagnostics' capture rides along in the step
            opt.step()
            return norm

        norm, waits = host_waits(device, clip_and_step)
        assert waits == 0, f"{name}: the clipping and step made the host wait {waits} times"
        opt.orthogonality_errors()
    loss = torch.zeros((), device=device)
    _, agreement = host_waits(device, lambda: agree(loss, norm, False, 1))
    assert agreement == 1, f"the ranks' agreement made the host wait {agreement} times, not once"
    loader = TokenLoader(find_shards(SHIPPED_SHARDS, "train"), 8, 256, device=device)
    loader.next_batch()  # the first shard is read and checked here
    _, batches = host_waits(device, lambda: [loader.next_batch() for _ in range(4)])
    assert batches == 0, f"4 batches from the loader made the host wait {batches} times"
    return f"none in {', '.join(variants)}, nor in 4 loader batches; one in the agreement"


def make_check_160m(optimizer, steps):
    """The check that trains the 160M config for `steps` steps with `optimizer`, timed."""

    def check_160m(device):
        from scripts.bench_train import measure

        argv = ["--config", str(REPO / "configs" / "dion2_160m.yaml"), "--device", str(device)]
        argv += ["--batch_size", "16", "--device_batch_size", "16", "--data_dir", str(SHIPPED_SHARDS)]
        # A fresh process, as bench_train runs each: the peak memory and caches are the row's own,
        # and what this process keeps cached is given back first.
        torch.cuda.empty_cache()
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            r = pool.apply(measure, (argv, optimizer, steps, 5, None, "shards"))
        assert math.isfinite(r["final_loss"]), f"loss {r['final_loss']}"
        tokens_per_s = r["tokens_per_step"] / r["step"]
        return {
            "detail": f"loss {r['final_loss']:.3f} after {steps + 5} steps",
            "tokens/s": f"{tokens_per_s:,.0f}",
            "MFU": f"{r['flops_per_token'] * tokens_per_s / (r['peak_tflops'] * 1e12):.1%}"
            if r["peak_tflops"]
            else "?",
            "optim": f"{r['optimizer'] / r['step']:.1%}",
            "peak GiB": f"{r['peak_bytes'] / 2**30:.2f}",
        }

    check_160m.__doc__ = (
        f"{steps} steps of the 160M config (16 x 1024 tokens a step, shipped shards) with {optimizer}."
    )
    return check_160m


# The wide buckets where the Gram form may pay: the MLP matrices, and Dion2's slices at fraction
# 0.25 of the attention (1:4) and MLP (1:16) matrices, as (count, rows, cols).
GRAM_BUCKETS = {
    "160M": [(12, 768, 3072), (48, 192, 768), (24, 192, 3072)],
    "1B": [(16, 2048, 8192), (64, 512, 2048), (32, 512, 8192)],
}


def check_gram_newton_schulz(device):
    """The Gram form against the plain one in bf16 and fp32 on GRAM_BUCKETS: its orthogonality
    error within 10% of plain's on Gaussian inputs, and the time of each (PyTorch)."""
    from optimizers.newton_schulz import gram_pays, newton_schulz, orthogonality_error

    parts = []
    for model, buckets in GRAM_BUCKETS.items():
        for count, m, n in buckets:
            x = torch.randn(count, m, n, device=device)
            for dtype in (torch.bfloat16, torch.float32):
                calls = {
                    gram: partial(newton_schulz, x, True, dtype, None, False, gram) for gram in (False, True)
                }
                errors = {gram: orthogonality_error(call()[0]) for gram, call in calls.items()}
                worst = (errors[True] / errors[False]).max().item()
                assert worst <= 1.1, f"{model} {count}x{m}x{n} {dtype}: Gram's error {worst:.2f}x plain's"
                seconds = {k: statistics.median(t) for k, t in interleaved(calls, 5, 1, device).items()}
                auto = "Gram" if gram_pays(m, n, dtype) else "plain"
                parts.append(
                    f"{model} {count}x{m}x{n} {str(dtype)[6:]}: plain {seconds[False] * 1e3:.1f} ms, Gram "
                    f"{seconds[True] * 1e3:.1f} ms, error {worst:.2f}x, auto {auto}"
                )
            del x
    return "; ".join(parts)


def checks(steps):
    """{name: check}: each takes the device and returns a detail line (or a row's columns)."""
    found = {
        "triton products": check_triton_products,
        "triton newton-schulz": check_triton_newton_schulz,
        "triton launch placement": check_triton_launch_placement,
        "triton bf16 timing": check_triton_bf16_timing,
        "gram newton-schulz": check_gram_newton_schulz,
        "bf16 autocast": check_bf16_autocast,
        "fsdp bf16 1 rank": check_fsdp_mixed_precision,
        "cuda rng": check_cuda_rng,
        "compile": check_compile,
        "no host sync": check_no_host_sync,
    }
    found.update({f"160m {name}": make_check_160m(name, steps) for name in OPTIMIZERS})
    return found


COLUMNS = ("tokens/s", "MFU", "optim", "peak GiB", "triton/pytorch")


def missing_packages():
    """The pip names of the packages in REQUIRED that this Python cannot import."""
    return [pip for name, pip in REQUIRED.items() if importlib.util.find_spec(name) is None]


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="list the checks and run nothing")
    parser.add_argument("--steps", type=int, default=100, help="timed steps of the 160M config per optimizer")
    parser.add_argument("--only", default=None, help="comma-separated check names (default: all)")
    parser.add_argument(
        "--cache_dir",
        default=None,
        help="keep Inductor's and Triton's compiled code here (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR), "
        "so that a rerun skips compilation",
    )
    args = parser.parse_args(argv)
    found = checks(args.steps)
    if args.only:
        names = [n.strip() for n in args.only.split(",")]
        unknown = [n for n in names if n not in found]
        if unknown:
            parser.error(f"--only: unknown check {unknown[0]!r}; the checks: {', '.join(found)}")
        found = {n: found[n] for n in names}
    if args.dry_run:
        width = max(map(len, found)) + 2
        for name, check in found.items():
            print(f"{name:<{width}}{check.__doc__.splitlines()[0]}")
        return 0
    missing = missing_packages()
    if missing:
        names = ", ".join(missing)
        print(f"gpu_check: missing packages: {names}; install them: pip install {' '.join(missing)}")
        return 1
    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device here (torch {torch.__version__}); nothing to check")
        return 0
    if args.cache_dir:
        # Set before anything compiles; the 160M rows' processes inherit them.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(args.cache_dir) / "inductor")
        os.environ["TRITON_CACHE_DIR"] = str(Path(args.cache_dir) / "triton")
    os.environ.setdefault("WANDB_MODE", "disabled")
    device = torch.device("cuda", 0)
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    rows, failed = [], 0
    for name, check in found.items():
        start = time.perf_counter()
        try:
            result = check(device)
            status = "pass"
        except Skipped as e:
            result, status = str(e), "skip"
        except Exception as e:  # a failing check is a row of the table, not the end of the run
            traceback.print_exc(file=sys.stderr)
            result, status = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", "FAIL"
            failed += 1
        result = result if isinstance(result, dict) else {"detail": result}
        rows.append({"check": name, "result": status, "s": f"{time.perf_counter() - start:.0f}", **result})
        print(f"{name}: {status} ({rows[-1]['s']} s)", file=sys.stderr, flush=True)
    header = ("check", "result", "s", *COLUMNS, "detail")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row.get(column, "") for column in header) + " |")
    print(f"{len(rows) - failed} of {len(rows)} checks passed or skipped, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
