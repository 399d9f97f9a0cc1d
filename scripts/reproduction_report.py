"""The tables and figures of docs/reproduction.md, from the runs of configs/sweeps/repro_cpu.yaml:

    python scripts/reproduction_report.py runs/repro_cpu

Each of the Dion2 paper's three claims is a list of comparisons, a configuration against its
baseline. For each, at the end of every quarter of the run: the difference of the mean val
loss (measured at that step) and of the mean train loss over that quarter, with the 95%
confidence interval of the difference and the p-value of Welch's t-test over the seeds. The
tables replace the text between `<!-- report:NAME -->` and `<!-- /report:NAME -->` in --doc;
the figures go to --out.
"""

import argparse
import math
import re
import statistics
import sys
from pathlib import Path

from scripts.compare_runs import comparison, configurations, find_configuration, plot_comparison, welch
from scripts.plot_runs import plot_diagnostics, plot_val_loss
from scripts.run_records import RunsError, load_runs, mean_train_loss

L1 = "optimizer=dion2,selection=l1,decay=selective,ortho_fraction="
RANDOM = "optimizer=dion2,selection=random,ortho_fraction="
# (name, the paper's claim, [(label, configuration, baseline)]): a positive difference means the
# configuration's loss is higher (worse) than its baseline's.
CLAIMS = (
    (
        "fractions",
        "a smaller fraction is slightly worse",
        [
            ("l1 0.25 - l1 0.5", f"{L1}0.25", f"{L1}0.5"),
            ("l1 0.125 - l1 0.5", f"{L1}0.125", f"{L1}0.5"),
            ("l1 0.5 - Muon", f"{L1}0.5", "optimizer=muon"),
        ],
    ),
    (
        "selection",
        "l1 and random selection are about equal",
        [(f"random {f} - l1 {f}", f"{RANDOM}{f}", f"{L1}{f}") for f in (0.5, 0.25, 0.125)],
    ),
    (
        "decay",
        "decaying the whole momentum is clearly worse",
        [("full - selective, l1 0.25", "optimizer=dion2,decay=full", f"{L1}0.25")],
    ),
)
QUARTERS = 4


def quarter_values(runs, quarter):
    """Per run: (the val loss at the end of `quarter`, or None; its mean train loss over it)."""
    out = []
    for r in runs:
        steps = r["records"][-1]["step"]
        start, end = steps * (quarter - 1) // QUARTERS, steps * quarter // QUARTERS
        val = dict(r["val"]).get(end)
        out.append((val, mean_train_loss(r["records"], start, end)))
    return out


def _difference_cells(values, baseline):
    if len(values) < 2 or len(baseline) < 2:
        return ["-", "-"]
    difference, low, high, p = welch(values, baseline)
    return [f"{difference:+.4f} [{low:+.4f}, {high:+.4f}]", f"{p:.3g}"]


def claim_table(groups, comparisons):
    """Markdown rows of each comparison at each quarter, and the effects for the figure."""
    lines = [
        "| comparison | quarter | val loss difference [95% CI] | p | train loss difference, that quarter "
        "[95% CI] | p |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    effects = {}
    for label, name, base_name in comparisons:
        runs = groups[find_configuration(groups, name)]
        base = groups[find_configuration(groups, base_name)]
        for q in range(1, QUARTERS + 1):
            mine, theirs = quarter_values(runs, q), quarter_values(base, q)
            cells = [label, str(q)]
            vals, base_vals = [v for v, _ in mine if v is not None], [v for v, _ in theirs if v is not None]
            cells += _difference_cells(vals, base_vals)
            train, base_train = [t for _, t in mine], [t for _, t in theirs]
            cells += _difference_cells(train, base_train)
            effects.setdefault(label, []).append(welch(train, base_train)[:3])
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", effects


def diagnostics_table(groups):
    """Per configuration, means over seeds: selection coverage and longest wait at the end,
    Newton-Schulz's orthogonality error and the matrices' update RMS over the run."""
    lines = [
        "| configuration | coverage, mean / worst matrix | longest wait (steps) | orthogonality error "
        "(RMS of sigma - 1, largest over the shapes, mean over the run) | update RMS, matrices |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, runs in groups.items():
        last = [[x for x in r["records"] if "update_rms/matrix" in x] for r in runs]
        coverage = wait = "-"
        if "selection_coverage_mean" in last[0][-1]:
            coverage = (
                f"{statistics.mean(m[-1]['selection_coverage_mean'] for m in last):.3f} / "
                f"{statistics.mean(m[-1]['selection_coverage_min'] for m in last):.3f}"
            )
            wait = f"{statistics.mean(m[-1]['selection_longest_wait'] for m in last):.0f}"
        errors = [
            max(v for k, v in x.items() if k.startswith("ortho_error/"))
            for m in last
            for x in m
            if any(k.startswith("ortho_error/") for k in x)
        ]
        error = f"{statistics.mean(errors):.3f}" if errors else "-"
        update = statistics.mean(x["update_rms/matrix"] for m in last for x in m)
        lines.append(f"| {label} | {coverage} | {wait} | {error} | {update:.2e} |")
    return "\n".join(lines) + "\n"


def plot_effects(effects_by_claim, path):
    """Per claim, each comparison's train-loss difference over the quarters with its 95% CI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(effects_by_claim), figsize=(5.5 * len(effects_by_claim), 4.2))
    for ax, (claim, effects) in zip(axes, effects_by_claim.items(), strict=True):
        for k, (label, per_quarter) in enumerate(effects.items()):
            xs = [q + 0.08 * (k - (len(effects) - 1) / 2) for q in range(1, QUARTERS + 1)]
            means = [d for d, _, _ in per_quarter]
            errors = [
                [0 if math.isnan(lo) else d - lo for d, lo, _ in per_quarter],
                [0 if math.isnan(hi) else hi - d for d, _, hi in per_quarter],
            ]
            ax.errorbar(xs, means, yerr=errors, fmt="o-", capsize=3, label=label)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(1, QUARTERS + 1))
        ax.set_xlabel("quarter of the run")
        ax.set_ylabel("train loss difference (positive: worse)")
        ax.set_title(claim, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def replace_sections(doc, sections):
    """The doc's text with each `<!-- report:NAME -->` ... `<!-- /report:NAME -->` filled."""
    text = doc.read_text()
    for name, body in sections.items():
        pattern = re.compile(rf"(<!-- report:{name} -->\n).*?(<!-- /report:{name} -->)", re.DOTALL)
        if not pattern.search(text):
            raise RunsError(f"{doc} has no section <!-- report:{name} --> ... <!-- /report:{name} -->")
        text = pattern.sub(lambda m, body=body: m.group(1) + body + m.group(2), text)
    return text


def main(argv=None):
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", type=Path, help="the sweep's folder of runs")
    parser.add_argument("--doc", type=Path, default=Path("docs/reproduction.md"))
    parser.add_argument("--out", type=Path, default=Path("docs/figures/repro_cpu"))
    args = parser.parse_args(argv)
    runs = [r for r in load_runs([args.runs]) if r["val"]]
    groups = configurations(runs)
    sections = {}
    table, measured, baseline, _, _ = comparison(runs, "optimizer=muon")
    sections["comparison"] = table
    effects = {}
    for name, claim, comparisons in CLAIMS:
        sections[name], effects[claim] = claim_table(groups, comparisons)
    sections["diagnostics"] = diagnostics_table(groups)
    text = replace_sections(args.doc, sections)  # every section found before anything is written
    args.out.mkdir(parents=True, exist_ok=True)
    plot_comparison(measured, baseline, args.out / "comparison.png")
    plot_effects(effects, args.out / "effects.png")
    plot_val_loss(runs, args.out / "val_loss.png", "steps", 0.5, f"validation loss, {len(runs)} runs")
    plot_diagnostics(runs, args.out / "diagnostics.png")
    args.doc.write_text(text)
    print(f"wrote {len(sections)} tables in {args.doc} and 4 figures in {args.out}")


if __name__ == "__main__":
    try:
        main()
    except RunsError as e:
        sys.exit(f"error: {e}")
