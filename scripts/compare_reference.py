"""Check that our optimizers take microsoft/dion's steps: the same weights and gradients on
both sides, a few steps, and the cosine between the two weight changes of every matrix.

    python scripts/compare_reference.py --against ../shared/opponents/microsoft-dion

Both sides run Newton-Schulz in fp32 (theirs through its `newton_schulz_func`), so that what is
compared is the update rule, not the rounding of bf16. Matrices: wide, tall and square; the
selecting algorithms (Dion2, NorDion2 and its alias Dion3) at fraction 0.5 and 0.25. Ours
runs with --use_gram_newton_schulz (default auto: the wide MLP-like matrix and the selected
slices take the Gram form), theirs with its plain Newton-Schulz. Exits with 1 when a cosine
falls below --min_cosine.
"""

import argparse
import sys

import torch

from scripts.microsoft_dion import ALGORITHMS, SELECTING, build, import_reference
from scripts.results import results_file

SHAPES = {"wide": (64, 160), "tall": (160, 64), "square": (96, 96), "mlp": (64, 256)}
# The command line's values of use_gram_newton_schulz.
GRAM = {"true": True, "false": False, "auto": "auto"}


def weight_changes(reference, algorithm, side, fraction, steps, seed, gram):
    """Each matrix's weight change after `steps` steps of one side, from fixed weights and
    gradients."""
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(shape, generator=generator) for shape in SHAPES.values()]
    start = [p.clone() for p in params]
    optimizer = build(reference, algorithm, side, params, fp32=True, fraction=fraction, gram=gram)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()
    return [(p - s).double() for p, s in zip(params, start, strict=True)]


def compare(reference, steps=3, seed=0, gram="auto"):
    """[(algorithm, fraction, shape name, cosine)] for every case, ours with
    use_gram_newton_schulz = `gram`."""
    rows = []
    for algorithm in ALGORITHMS:
        for fraction in (0.5, 0.25) if algorithm in SELECTING else (None,):
            ours = weight_changes(reference, algorithm, "ours", fraction, steps, seed, gram)
            theirs = weight_changes(reference, algorithm, "theirs", fraction, steps, seed, gram)
            for name, a, b in zip(SHAPES, ours, theirs, strict=True):
                cosine = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
                rows.append((algorithm, fraction, name, cosine))
    return rows


def main(argv=None):
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--against", required=True, help="a microsoft/dion checkout or its dion package folder"
    )
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--min_cosine", type=float, default=0.999)
    parser.add_argument("--use_gram_newton_schulz", choices=GRAM, default="auto", help="ours only")
    parser.add_argument("--write", default=None, help="also write the report to this results file (markdown)")
    args = parser.parse_args(argv)
    rows = compare(import_reference(args.against), args.steps, gram=GRAM[args.use_gram_newton_schulz])
    with results_file(args.write, "compare_reference.py", sys.argv[1:] if argv is None else argv, "cpu"):
        worst = report(rows, args)
    if worst < args.min_cosine:
        sys.exit(1)


def report(rows, args):
    """Print every cosine and the lowest; returns the lowest."""
    print(
        f"cosine of the {args.steps}-step weight change, ours (use_gram_newton_schulz "
        f"{args.use_gram_newton_schulz}) against microsoft/dion (fp32 Newton-Schulz)"
    )
    print(f"{'optimizer':<10} {'fraction':>8} {'matrix':<8} {'cosine':>9}")
    for algorithm, fraction, name, cosine in rows:
        shown = "-" if fraction is None else f"{fraction:g}"
        print(f"{algorithm:<10} {shown:>8} {name:<8} {cosine:>9.6f}")
    worst = min(rows, key=lambda row: row[3])
    print(f"lowest cosine {worst[3]:.6f} ({worst[0]}, {worst[2]}); required >= {args.min_cosine}")
    return worst[3]


if __name__ == "__main__":
    main()
