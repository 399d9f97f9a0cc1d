"""Time one batched Newton-Schulz: PyTorch, torch.compile, and the Triton kernels.

    python scripts/bench_newton_schulz.py --shape 768 3072 --batch 12 --dtype bf16

The contenders run interleaved, one call each in a rotating order, on the same random
stack (batch, m, n). Reported: the median time per call and each one's speed-up over
PyTorch. The Triton contender needs CUDA (or TRITON_INTERPRET=1 on the CPU, which checks it
runs, not how fast); torch.compile's first call, the compilation, is not timed.
"""

import argparse
import statistics
import sys

import torch

from optimizers.compiled import run_compiled
from optimizers.newton_schulz import newton_schulz
from scripts.results import results_file
from scripts.timing import interleaved

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def contenders(x, dtype):
    """{name: a call of Newton-Schulz on x}, Triton only where its kernels can run."""
    calls = {
        "pytorch": lambda: newton_schulz(x, True, dtype),
        "torch.compile": lambda: run_compiled(newton_schulz, x, True, dtype, None),
    }
    try:
        from optimizers.triton_ns import kernels_usable
    except ImportError:
        print("triton is not installed: no Triton contender", file=sys.stderr)
        return calls
    if kernels_usable(x.device):
        calls["triton"] = lambda: newton_schulz(x, True, dtype, use_triton=True)
    else:
        print(f"Triton cannot run on {x.device} (no CUDA, TRITON_INTERPRET unset)", file=sys.stderr)
    return calls


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=int, nargs=2, default=(768, 3072), metavar=("M", "N"))
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--write", default=None, help="also write the report to this results file (markdown)")
    args = parser.parse_args(argv)
    if min(*args.shape, args.batch, args.steps) < 1 or args.warmup < 1:
        parser.error(f"--shape, --batch, --steps and --warmup must be >= 1, got {vars(args)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    x = torch.randn(args.batch, *args.shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    calls = contenders(x, dtype)
    times = interleaved(calls, args.steps, args.warmup, device)
    with results_file(args.write, "bench_newton_schulz.py", argv, device):
        report(times, args, device)


def report(times, args, device):
    """Print the medians and the speed-ups over PyTorch."""
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    m, n = args.shape
    print(
        f"Newton-Schulz of {args.batch} x {m} x {n} in {args.dtype} on {where}, median of {args.steps} calls"
    )
    base = statistics.median(times["pytorch"])
    print(f"{'contender':<14} {'median ms':>10} {'speed-up':>9}")
    for name in times:
        median = statistics.median(times[name])
        print(f"{name:<14} {median * 1e3:>10.2f} {base / median:>9.2f}")
    if "triton" in times and device.type == "cuda":
        print(
            f"triton speed-up over pytorch: {base / statistics.median(times['triton']):.2f}x (target >= 1.3)"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
