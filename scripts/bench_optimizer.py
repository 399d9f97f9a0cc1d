"""Time optimizer.step() on the matrices of a GPT, in the manner of the Dion2 paper's Figure 1.

    python scripts/bench_optimizer.py --model_dim 768 --n_layer 2 [--png bench.png]
    python scripts/bench_optimizer.py --model_dims 128 256 512 768 --png dims.png
    python scripts/bench_optimizer.py --against ../shared/opponents/microsoft-dion

With --against PATH (a checkout of microsoft/dion, or its `dion` package folder) it times ours
against theirs instead, interleaved in one process on the same inputs: Muon, NorMuon, Dion2 and
NorDion2 (fraction 0.25) at --model_dims (default 512 and 768), each side at its defaults and
both with Newton-Schulz in fp32, eager on both sides (the reference compiles its Newton-Schulz
by default), and with --compiled, compiled on both sides as an extra column (on a 2-core CPU
the compiles take many minutes); --modes picks the columns (`--modes fp32` alone skips the
reference's bf16 steps, which a CPU without native bf16 takes minutes over). Reported: the
minimum step over the timed steps, and ours / theirs. A step that takes over SLOW_STEP seconds
is timed once, its warm-up step included: the reference's bf16 Newton-Schulz on a CPU without
native bf16 takes minutes.

With --model_dims it times each model dimension in turn, prints one table per dimension and a
summary, and --png draws step time against model_dim, one line per contender (Figure 1, left).

Per layer the matrices are four d x d, one 4d x d and one d x 4d, with fixed random gradients.
The contenders (Muon, Dion2 at several fractions, and Muon's Newton-Schulz matmuls alone on the
same stacked inputs) run interleaved, one step each in a rotating order, so that the machine's
noise falls on all of them alike. Reported: the minimum and the median over the timed steps.
"""

import argparse
import statistics
import sys
from functools import partial
from pathlib import Path

import torch

from optimizers import Dion2, Muon
from optimizers.dion2 import num_selected
from optimizers.matrix_optimizer import default_ns_dtype
from optimizers.newton_schulz import coefficients, gram, newton_schulz_flops, use_gram
from scripts.results import results_file
from scripts.timing import interleaved

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# The algorithms compared with microsoft/dion, and the ways each pair runs.
AGAINST = ("muon", "normuon", "dion2", "nordion2")
MODES = ("defaults", "fp32", "compiled")
SLOW_STEP = 5.0


def gpt_matrix_shapes(model_dim, n_layer):
    """The hidden matrices of one GPT: per layer q, k, v, out (d x d), MLP in (4d x d) and out."""
    d = model_dim
    return [(d, d)] * 4 * n_layer + [(4 * d, d), (d, 4 * d)] * n_layer


def ns_matmuls(stacks, use_polar_express=True):
    """Only the matmuls of Newton-Schulz (the same `gram` products), on stacked, oriented inputs."""
    for x in stacks:
        for a, _, _ in coefficients(use_polar_express)[0]:
            A = gram(x)
            B = gram(A)
            x = torch.baddbmm(x, B, x, beta=a, alpha=1.0)


def oriented_stacks(shapes, device, dtype, generator):
    """Random inputs stacked per shape, each wide (m <= n), as Muon's Newton-Schulz sees them."""
    counts = {}
    for m, n in shapes:
        key = (min(m, n), max(m, n))
        counts[key] = counts.get(key, 0) + 1
    return [torch.randn(c, m, n, generator=generator).to(device, dtype) for (m, n), c in counts.items()]


def ns_flops(algorithm, shapes, dtype, fraction=0.25, gram="auto"):
    """The Newton-Schulz FLOPs of one step of `algorithm` (one of AGAINST) on `shapes` in
    `dtype`, every product counted whole, in the form `gram` picks (False: the plain form, as
    the reference runs it). A selecting optimizer orthonormalizes its k x other slices."""
    from scripts.microsoft_dion import OURS, SELECTING

    total = 0
    for m, n in shapes:
        if algorithm in SELECTING:
            slices, other = (m, n) if OURS[algorithm].selects_rows(m, n) else (n, m)
            m, n = num_selected(fraction, slices), other
        total += newton_schulz_flops(m, n, True, use_gram(gram, m, n, dtype), dtype)
    return total


def make_contender(build, shapes, device, generator):
    """Fresh parameters with fixed gradients, and a step function for the optimizer `build` makes."""
    params = [torch.randn(s, generator=generator).to(device) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator).to(device)
    return build(params).step


def run(model_dim, n_layer, fractions, steps, warmup, device, dtype, seed=0):
    """Time every contender; return {name: [seconds per step, ...]} over the timed steps."""
    generator = torch.Generator().manual_seed(seed)
    shapes = gpt_matrix_shapes(model_dim, n_layer)
    contenders = {"muon": make_contender(lambda p: Muon(p, ns_dtype=dtype), shapes, device, generator)}
    for f in fractions:
        contenders[f"dion2 {f:g}"] = make_contender(
            lambda p, f=f: Dion2(p, fraction=f, ns_dtype=dtype), shapes, device, generator
        )
    stacks = oriented_stacks(shapes, device, dtype, generator)
    contenders["muon NS matmuls"] = lambda: ns_matmuls(stacks)
    return interleaved(contenders, steps, warmup, device)


def report(times, model_dim, n_layer, device, dtype):
    """Print the table and the target ratios."""
    muon = statistics.median(times["muon"])
    print(
        f"optimizer.step() on a {n_layer}-layer GPT of model_dim {model_dim}; {device}, {dtype}, "
        f"{len(times['muon'])} timed steps each"
    )
    print(f"{'contender':<18} {'min ms':>10} {'median ms':>10} {'/ muon':>8}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<18} {min(values) * 1e3:>10.1f} {median * 1e3:>10.1f} {median / muon:>8.3f}")
    ns = statistics.median(times["muon NS matmuls"])
    print(f"muon step / its NS matmuls alone: {muon / ns:.3f} (target <= 1.3)")
    if "dion2 0.25" in times:
        ratio = statistics.median(times["dion2 0.25"]) / muon
        print(f"dion2 0.25 step / muon step: {ratio:.3f} (target <= 0.12)")


def time_pair(ours, theirs, steps, warmup, device, compiled=False):
    """{"ours": seconds, "theirs": seconds}: the minimum over `steps` interleaved steps after
    `warmup`. A side whose first step took over SLOW_STEP seconds keeps that one step, and
    the other is timed alone; when `compiled`, that first step comes after one that compiles."""
    pair = {"ours": ours, "theirs": theirs}
    if compiled:
        interleaved(pair, 0, 1, device)
    first = interleaved(pair, 1, 0, device)
    fast = {name: fn for name, fn in pair.items() if first[name][0] <= SLOW_STEP}
    times = interleaved(fast, steps, max(warmup - 1, 0), device) if fast else {}
    return {name: min(times[name]) if name in fast else first[name][0] for name in pair}


def against(path, model_dims, n_layer, steps, warmup, device, modes, seed=0):
    """Time ours against microsoft/dion: {(model_dim, algorithm, mode): {"ours": s, "theirs": s}},
    and ours alone at the default dtype: {model_dim: `run`'s times of Muon, Dion2 at 0.25 and
    Muon's Newton-Schulz matmuls}."""
    from scripts.microsoft_dion import build, import_reference

    results, own = {}, {}
    for dim in model_dims:
        shapes = gpt_matrix_shapes(dim, n_layer)
        for algorithm in AGAINST:
            for mode in modes:
                reference = import_reference(path, compiled=mode == "compiled")
                generator = torch.Generator().manual_seed(seed)
                fp32 = mode == "fp32"
                # Both sides start from the same weights and gradients.
                compiled = mode == "compiled"
                ours = partial(build, reference, algorithm, "ours", fp32=fp32, compile=compiled)
                theirs = partial(build, reference, algorithm, "theirs", fp32=fp32)
                ours = make_contender(ours, shapes, device, generator)
                generator.manual_seed(seed)
                theirs = make_contender(theirs, shapes, device, generator)
                results[(dim, algorithm, mode)] = time_pair(ours, theirs, steps, warmup, device, compiled)
                print(f"  {dim} {algorithm} {mode}: {results[(dim, algorithm, mode)]}", file=sys.stderr)
        # Our own targets from our steps alone, interleaved with the matmuls they are held to.
        own[dim] = run(dim, n_layer, [0.25], steps, warmup, device, default_ns_dtype(device), seed)
    return results, own


def report_against(results, own, modes, device):
    """The table of ours against theirs, and our own targets at the default dtype."""
    print(f"optimizer.step() against microsoft/dion on {device}: minimum step in ms, ours / theirs")
    print(
        "(flops: ours / theirs of Newton-Schulz's FLOPs in that column's dtype, every product counted whole)"
    )
    header = f"{'model_dim':>9} {'optimizer':<9}"
    for mode in modes:
        header += f" {mode + ' ours':>14} {'theirs':>10} {'ratio':>6} {'flops':>6}"
    print(header)
    for dim, algorithm in dict.fromkeys((d, a) for d, a, _ in results):
        line = f"{dim:>9} {algorithm:<9}"
        shapes = gpt_matrix_shapes(dim, 1)
        for mode in modes:
            t = results[(dim, algorithm, mode)]
            dtype = torch.float32 if mode == "fp32" else default_ns_dtype(device)
            flops = ns_flops(algorithm, shapes, dtype) / ns_flops(algorithm, shapes, dtype, gram=False)
            line += f" {t['ours'] * 1e3:>14.1f} {t['theirs'] * 1e3:>10.1f} {t['ours'] / t['theirs']:>5.2f}x"
            line += f" {flops:>5.2f}x"
        print(line)
    for dim, times in own.items():
        muon = statistics.median(times["muon"])
        ns = statistics.median(times["muon NS matmuls"])
        dion2 = statistics.median(times["dion2 0.25"])
        print(
            f"model_dim {dim}, ours at defaults (medians, interleaved): muon step / its NS matmuls "
            f"{muon / ns:.3f} (target <= 1.3), dion2 0.25 / muon {dion2 / muon:.3f} (target <= 0.12)"
        )


def plot(times, path, title):
    """A bar chart of the median step times."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(times)
    medians = [statistics.median(times[n]) * 1e3 for n in names]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh(names[::-1], medians[::-1], color="tab:blue")
    ax.set_xlabel("median step time (ms)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def report_dims(results):
    """Print the median step time of every contender at every model_dim."""
    names = list(next(iter(results.values())))
    print("median optimizer.step() in ms, by model_dim")
    print(f"{'model_dim':>9} " + " ".join(f"{n:>15}" for n in names))
    for dim, times in results.items():
        print(f"{dim:>9} " + " ".join(f"{statistics.median(times[n]) * 1e3:>15.1f}" for n in names))


def plot_dims(results, path, title):
    """Median step time against model_dim, one line per contender, on log axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = list(results)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name in next(iter(results.values())):
        style = {"ls": "--", "color": "gray"} if name == "muon NS matmuls" else {"marker": "o"}
        ax.plot(dims, [statistics.median(results[d][name]) * 1e3 for d in dims], label=name, **style)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(dims, [str(d) for d in dims])
    ax.set_xlabel("model_dim")
    ax.set_ylabel("median optimizer step time (ms)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    print(f"wrote {path}")


def main(argv=None):
    """Command-line entry point. Returns what it timed, as its report printed it: {name: step
    times} for one model_dim, {model_dim: those} for several, or (results, own) of `against`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_dim", type=int, default=768)
    parser.add_argument("--model_dims", type=int, nargs="+", default=None, help="time each of these instead")
    parser.add_argument("--n_layer", type=int, default=2)
    parser.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.125])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="Newton-Schulz compute dtype; default: bf16 where the hardware has it (CUDA, CPUs with "
        "AVX512-BF16 or AMX), else fp32",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--png", type=Path, default=None)
    parser.add_argument(
        "--against", default=None, help="a microsoft/dion checkout or its dion package folder"
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=MODES,
        default=None,
        help="with --against: the columns (default: defaults and fp32, and compiled with --compiled)",
    )
    parser.add_argument("--compiled", action="store_true", help="with --against: add the compiled column")
    parser.add_argument("--write", default=None, help="also write the report to this results file (markdown)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.against:
        from scripts.microsoft_dion import import_reference

        import_reference(args.against)  # a bad path fails here, before any work
    with results_file(args.write, "bench_optimizer.py", sys.argv[1:] if argv is None else argv, device):
        return measure(args, device)


def measure(args, device):
    """Time and report what the arguments ask for (see `main`)."""
    if args.against:
        modes = args.modes or (MODES if args.compiled else MODES[:2])
        dims = args.model_dims or [512, 768]
        results, own = against(args.against, dims, args.n_layer, args.steps, args.warmup, device, modes)
        report_against(results, own, modes, device)
        return results, own
    dtype = DTYPES[args.dtype] if args.dtype else default_ns_dtype(device)
    if args.model_dims:
        results = {}
        for dim in args.model_dims:
            results[dim] = run(dim, args.n_layer, args.fractions, args.steps, args.warmup, device, dtype)
            report(results[dim], dim, args.n_layer, device, dtype)
            print()
        report_dims(results)
        if args.png:
            plot_dims(results, args.png, f"optimizer step of a {args.n_layer}-layer GPT ({device}, {dtype})")
        return results
    times = run(args.model_dim, args.n_layer, args.fractions, args.steps, args.warmup, device, dtype)
    report(times, args.model_dim, args.n_layer, device, dtype)
    if args.png:
        plot(times, args.png, f"optimizer step, model_dim {args.model_dim}, {args.n_layer} layers ({device})")
    return times


if __name__ == "__main__":
    main()
