"""How orthonormal Newton-Schulz's output is, plain against the Gram form, on a GPT's shapes.

    python scripts/newton_schulz_accuracy.py --model_dims 768 2048 --dtypes fp32 bf16
    python scripts/newton_schulz_accuracy.py --model_dims 768 --restarts none 1 2 3

For each model dimension d the shapes are Muon's (d x d and d x 4d) and the slices Dion2 at
--fraction orthonormalizes (fraction d x d and fraction d x 4d), each on two inputs: Gaussian,
and ill-conditioned (singular values spaced evenly in log from 1 down to 1/--condition).
Reported per row: the form `auto` picks for the shape, the RMS and the largest |sigma - 1| of
the output's singular values, plain and Gram, Gram's over plain for each (the worse of the
two), and each output's distance from the plain iteration run in fp64 (||O - O64|| / ||O64||),
which says how much of an error is rounding. With --restarts, one set of Gram columns per
restart rule: "none", or the steps after which the Gram form restarts from X ("1,3");
"default" is the dtype's GRAM_RESTARTS.
"""

import argparse
import sys

import torch

from optimizers.newton_schulz import GRAM_RESTARTS, gram_pays, newton_schulz, orthogonality_error
from scripts.results import results_file

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
INPUTS = ("gaussian", "condition")


def shapes(model_dim, fraction):
    """The wide (m <= n) shapes one GPT layer orthonormalizes: Muon's, then Dion2's slices."""
    d, k = model_dim, max(1, round(fraction * model_dim))
    return [(d, d), (d, 4 * d), (k, d), (k, 4 * d)]


def make_input(kind, m, n, condition, generator):
    """An m x n input: Gaussian, or U diag(sigma) V^T with sigma from 1 to 1 / condition."""
    x = torch.randn(m, n, generator=generator, dtype=torch.float64)
    if kind == "gaussian":
        return x.float()
    u = torch.linalg.qr(torch.randn(m, m, generator=generator, dtype=torch.float64)).Q
    v = torch.linalg.qr(x.mT).Q
    sigma = torch.logspace(0, -torch.log10(torch.tensor(float(condition))).item(), m, dtype=torch.float64)
    return (u * sigma) @ v.mT


def parse_restarts(text, dtype):
    """A restart rule as the command line gives it."""
    if text == "default":
        return GRAM_RESTARTS[dtype]
    return () if text == "none" else tuple(int(step) for step in text.split(","))


def distance(out, exact):
    """||out - exact|| / ||exact||."""
    return ((out.double() - exact).norm() / exact.norm()).item()


def measure(args):
    """[(shape, input, dtype, plain, {rule: Gram})], each (RMS error, max error, distance
    from the fp64 iteration)."""
    generator = torch.Generator().manual_seed(args.seed)
    rows = []
    for model_dim in args.model_dims:
        for m, n in shapes(model_dim, args.fraction):
            for kind in INPUTS:
                x = make_input(kind, m, n, args.condition, generator).float()
                exact = newton_schulz(x.double(), dtype=torch.float64)

                def errors(out, exact=exact):
                    return (*orthogonality_error(out).tolist(), distance(out, exact))

                for name in args.dtypes:
                    dtype = DTYPES[name]
                    plain = errors(newton_schulz(x, dtype=dtype))
                    gram = {
                        rule: errors(
                            newton_schulz(x, dtype=dtype, use_gram=True, restarts=parse_restarts(rule, dtype))
                        )
                        for rule in args.restarts
                    }
                    rows.append(((m, n), kind, name, plain, gram))
                    print(f"measured {m} x {n} {kind} {name}", file=sys.stderr, flush=True)
    return rows


def report(rows, args):
    """One markdown table: the errors and Gram's ratio to plain, per restart rule."""
    print(
        f"Orthogonality error of Newton-Schulz (Polar Express, 5 steps), plain and Gram; "
        f"Dion2 slices at fraction {args.fraction}, ill-conditioned inputs at condition {args.condition:g}.\n"
    )
    heads = ["shape", "input", "dtype", "auto", "plain RMS", "plain max", "plain distance"]
    for rule in args.restarts:
        heads += [f"Gram [{rule}] RMS", f"Gram [{rule}] max", f"[{rule}] worst ratio", f"[{rule}] distance"]
    print("| " + " | ".join(heads) + " |")
    print("|" + "---|" * len(heads))
    for (m, n), kind, dtype, plain, gram in rows:
        auto = "Gram" if gram_pays(m, n, DTYPES[dtype]) else "plain"
        cells = [f"{m} x {n}", kind, dtype, auto, f"{plain[0]:.4f}", f"{plain[1]:.4f}", f"{plain[2]:.4f}"]
        for rule in args.restarts:
            error = gram[rule]
            worst = max(error[0] / plain[0], error[1] / plain[1])
            cells += [f"{error[0]:.4f}", f"{error[1]:.4f}", f"{worst:.3f}", f"{error[2]:.4f}"]
        print("| " + " | ".join(cells) + " |")
    print()
    for rule in args.restarts:
        for dtype in args.dtypes:
            for kind in INPUTS:
                chosen = [(p, g[rule]) for _, k, d, p, g in rows if (k, d) == (kind, dtype)]
                worst = max(max(g[0] / p[0], g[1] / p[1]) for p, g in chosen)
                far = [max(x[2] for x in side) for side in zip(*chosen, strict=True)]
                print(
                    f"- [{rule}] {dtype}, {kind}: worst Gram / plain error {worst:.3f} (target <= 1.10); "
                    f"largest distance from fp64: plain {far[0]:.4f}, Gram {far[1]:.4f}"
                )


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_dims", type=int, nargs="+", default=[768, 2048])
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    parser.add_argument("--fraction", type=float, default=0.25)
    parser.add_argument("--condition", type=float, default=1e4)
    parser.add_argument("--restarts", nargs="+", default=["default"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", default=None, help="also write the report to this results file (markdown)")
    args = parser.parse_args(argv)
    if min(args.model_dims) < 1 or not 0 < args.fraction <= 1 or args.condition < 1:
        parser.error(f"--model_dims must be >= 1, --fraction in (0, 1], --condition >= 1, got {vars(args)}")
    for rule in args.restarts:
        try:
            parse_restarts(rule, torch.float32)
        except ValueError:
            parser.error(f"--restarts takes default, none or steps like 1,3; got {rule}")
    rows = measure(args)
    with results_file(args.write, "newton_schulz_accuracy.py", argv, "cpu", markdown=True):
        report(rows, args)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
