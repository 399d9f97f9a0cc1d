"""Time one batched Newton-Schulz: PyTorch, torch.compile and the Triton kernels, each in
the plain and the Gram form.

    python scripts/bench_newton_schulz.py --shape 768 3072 --batch 12 --dtype bf16
    python scripts/bench_newton_schulz.py --shape 192 192 --shape 192 384 --shape 192 768 --dtype fp32

The contenders run interleaved, one call each in a rotating order, on the same random
stack (batch, m, n). Reported per shape: the median time per call, each one's speed-up over
plain PyTorch, the Gram form's FLOPs over the plain form's, and the form `auto` picks. The
Triton contenders need CUDA (or TRITON_INTERPRET=1 on the CPU, which checks they run, not
how fast); torch.compile's first call, the compilation, is not timed.
"""

import argparse
import statistics
import sys
from functools import partial

import torch

from optimizers.compiled import run_compiled
from optimizers.newton_schulz import gram_pays, newton_schulz, newton_schulz_flops
from scripts.results import results_file
from scripts.timing import interleaved

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def contenders(x, dtype, compiled):
    """{name: a call of Newton-Schulz on x}, plain and Gram; compiled ones with `compiled`,
    Triton ones only where the kernels can run."""
    calls = {}
    for form, gram in (("", False), (" gram", True)):
        calls[f"pytorch{form}"] = partial(newton_schulz, x, True, dtype, None, False, gram)
        if compiled:
            calls[f"torch.compile{form}"] = partial(
                run_compiled, newton_schulz, x, True, dtype, None, False, gram
            )
    try:
        from optimizers.triton_ns import kernels_usable
    except ImportError:
        print("triton is not installed: no Triton contender", file=sys.stderr)
        return calls
    if kernels_usable(x.device):
        calls["triton"] = partial(newton_schulz, x, True, dtype, None, True)
        calls["triton gram"] = partial(newton_schulz, x, True, dtype, None, True, True)
    else:
        print(f"Triton cannot run on {x.device} (no CUDA, TRITON_INTERPRET unset)", file=sys.stderr)
    return calls


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--shape", type=int, nargs=2, action="append", metavar=("M", "N"), help="repeatable; default 768 3072"
    )
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no_compile", action="store_true", help="leave out the torch.compile contenders")
    parser.add_argument("--write", default=None, help="also write the report to this results file (markdown)")
    args = parser.parse_args(argv)
    args.shape = args.shape or [(768, 3072)]
    if min(*(d for s in args.shape for d in s), args.batch, args.steps) < 1 or args.warmup < 1:
        parser.error(f"--shape, --batch, --steps and --warmup must be >= 1, got {vars(args)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    generator = torch.Generator().manual_seed(0)
    results = []
    for shape in args.shape:
        x = torch.randn(args.batch, *shape, generator=generator).to(device, dtype)
        calls = contenders(x, dtype, not args.no_compile)
        results.append((shape, interleaved(calls, args.steps, args.warmup, device)))
    with results_file(args.write, "bench_newton_schulz.py", argv, device):
        for shape, times in results:
            report(shape, times, args, device)
    return results


def report(shape, times, args, device):
    """Print the medians, the speed-ups over plain PyTorch and the FLOPs of the two forms."""
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    m, n = shape
    dtype = DTYPES[args.dtype]
    flops = newton_schulz_flops(m, n, True, True, dtype) / newton_schulz_flops(m, n)
    auto = "gram" if gram_pays(m, n, dtype) else "plain"
    print(
        f"Newton-Schulz of {args.batch} x {m} x {n} in {args.dtype} on {where}, median of {args.steps} "
        f"calls; Gram / plain FLOPs {flops:.2f}, auto picks {auto}"
    )
    base = statistics.median(times["pytorch"])
    print(f"{'contender':<19} {'median ms':>10} {'speed-up':>9}")
    for name in times:
        median = statistics.median(times[name])
        print(f"{name:<19} {median * 1e3:>10.2f} {base / median:>9.2f}")
    if "triton" in times and device.type == "cuda":
        print(
            f"triton speed-up over pytorch: {base / statistics.median(times['triton']):.2f}x (target >= 1.3)"
        )
    print()


if __name__ == "__main__":
    main(sys.argv[1:])
