"""Plot the validation loss of training runs, one line per run, in the manner of the Dion2 paper.

    python scripts/plot_runs.py runs/repro_cpu                     # every run of a sweep
    python scripts/plot_runs.py runs/repro_cpu/optimizer=muon runs/repro_cpu/*seed=0 \\
        --x tokens --zoom 0.4 --out docs/figures/fig2

Each argument is a run folder (with metrics.jsonl and config.yaml) or a folder with runs
beneath it at any depth (`runs` after a sweep finds every sweep's runs). Runs
are labelled by the config keys whose values differ between them, leaving out keys that the
run's optimizer does not read. Written to --out (default: the first folder given):
val_loss.png, with a second panel zoomed on the last part of the run when --zoom is given;
final_losses.md, the table of final losses (also printed), with the mean train loss of the
last quarter of the steps next to them, and the downstream scores of the runs that
scripts/evaluate.py scored; selection.png, Dion2's selection diagnostics, and
diagnostics.png, the optimizer's (training/diagnostics.py), when the runs logged them.
"""

import argparse
import math
import statistics
import sys
from pathlib import Path

from scripts.run_records import RunsError, load_runs, tail_train_loss

DIAGNOSTICS = ("selection_coverage_mean", "selection_coverage_min", "selection_longest_wait")


def final_loss_tables(runs):
    """Markdown: the final val loss of every run, best first, with the mean train loss of the
    last quarter; and the means over seeds when some runs differ only in their seed."""
    rows = sorted((r for r in runs if r["val"]), key=lambda r: r["val"][-1][1])
    if not rows:
        return "No run has a validation loss yet.\n"
    best = rows[0]["val"][-1][1]
    lines = [
        "| run | final val loss | vs best | train loss, last quarter | steps | tokens |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        step, loss = r["val"][-1]
        tail = tail_train_loss(r["records"])
        cells = [
            r["label"],
            f"{loss:.4f}",
            f"{loss - best:+.4f}",
            f"{tail:.4f}",
            str(step),
            f"{r['tokens'][step]:,}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    groups = {}
    for r in rows:
        if "seed" in r["config"]:
            groups.setdefault(r["seedless"], []).append(r)
    if any(len(g) > 1 for g in groups.values()):
        lines += [
            "",
            "| run, over seeds | seeds | mean val loss | max - min | per seed | train loss, last quarter |",
            "|---|---:|---:|---:|---|---:|",
        ]
        for label, group in sorted(
            groups.items(), key=lambda g: statistics.mean(r["val"][-1][1] for r in g[1])
        ):
            finals = [r["val"][-1][1] for r in group]
            per_seed = ", ".join(f"{r['config']['seed']}: {r['val'][-1][1]:.4f}" for r in group)
            spread = max(finals) - min(finals)
            tail = statistics.mean(tail_train_loss(r["records"]) for r in group)
            cells = [
                label,
                str(len(group)),
                f"{statistics.mean(finals):.4f}",
                f"{spread:.4f}",
                per_seed,
                f"{tail:.4f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + downstream_rows(rows)) + "\n"


def downstream_rows(runs):
    """Markdown lines: each scored run's newest downstream metrics, with their standard errors."""
    scored = [r for r in runs if r["evaluation"]]
    metrics = dict.fromkeys(
        name for r in scored for name in r["evaluation"]["metrics"] if not name.endswith("_stderr")
    )
    if not metrics:
        return []
    lines = [
        "",
        "| run | evaluated step | " + " | ".join(metrics) + " |",
        "|---|---:|" + "---:|" * len(metrics),
    ]
    for r in scored:
        values = r["evaluation"]["metrics"]
        cells = [r["label"], str(r["evaluation"]["step"])]
        for name in metrics:
            error = values.get(f"{name}_stderr")
            cell = "-" if name not in values else f"{values[name]:.4f}"
            if isinstance(error, float) and name in values:
                cell += f" ± {error:.4f}"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _styles(runs):
    """A color per configuration and a line style per seed, so that the seeds of one
    configuration read as one family."""
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(r["seedless"] for r in runs))
    colors = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20")
    seen = {}
    styles = []
    for r in runs:
        nth = seen[r["seedless"]] = seen.get(r["seedless"], -1) + 1
        styles.append(
            {"color": colors(groups.index(r["seedless"]) % colors.N), "ls": ("-", "--", "-.", ":")[nth % 4]}
        )
    return styles


def _legend_height(runs):
    """Inches under the panels for a two-column legend of the runs."""
    return 0.25 + 0.16 * math.ceil(len(runs) / 2)


def _legend_below(fig, ax, runs):
    """One legend for all panels, under them, so that long labels never cover a line."""
    height = fig.get_figheight()
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, _legend_height(runs) / height, 1, 1))


def plot_val_loss(runs, path, axis, zoom, title):
    """val loss against steps or tokens; with `zoom` a second panel of the last `zoom` of the x range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if zoom else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.5 + _legend_height(runs)), squeeze=False)
    for r, style in zip(runs, _styles(runs), strict=True):
        xs = [r["x"][s] for s, _ in r["val"]]
        for ax in axes[0]:
            ax.plot(xs, [v for _, v in r["val"]], label=r["label"], lw=1.4, **style)
    for ax in axes[0]:
        ax.set_xlabel(axis)
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
    axes[0][0].set_title(title)
    if zoom:
        xmax = max(r["x"][r["val"][-1][0]] for r in runs if r["val"])
        xmin = xmax * (1 - zoom)
        tail = [v for r in runs for s, v in r["val"] if r["x"][s] >= xmin]
        pad = 0.05 * (max(tail) - min(tail) or 1)
        zoomed = axes[0][1]
        zoomed.set_xlim(xmin, xmax * 1.01)
        zoomed.set_ylim(min(tail) - pad, max(tail) + pad)
        zoomed.set_title(f"last {zoom:.0%} of the run")
    _legend_below(fig, axes[0][0], runs)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_selection(runs, path):
    """Dion2's selection diagnostics over the steps: coverage (mean and min) and longest wait."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (cov, wait) = plt.subplots(1, 2, figsize=(13, 4.5 + _legend_height(runs)))
    for r, style in zip(runs, _styles(runs), strict=True):
        records = [x for x in r["records"] if DIAGNOSTICS[0] in x]
        steps = [x["step"] for x in records]
        cov.plot(steps, [x["selection_coverage_mean"] for x in records], label=r["label"], lw=1.6, **style)
        cov.plot(steps, [x["selection_coverage_min"] for x in records], lw=0.7, alpha=0.6, **style)
        wait.plot(steps, [x["selection_longest_wait"] for x in records], label=r["label"], **style)
    cov.set_title("slices selected at least once (thick: mean over matrices, thin: min)")
    cov.set_ylabel("coverage")
    wait.set_title("longest wait of any slice between selections")
    wait.set_ylabel("steps")
    for ax in (cov, wait):
        ax.set_xlabel("steps")
        ax.grid(alpha=0.3)
    _legend_below(fig, wait, runs)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_diagnostics(runs, path):
    """The optimizer diagnostics of the hidden matrices over the steps: update RMS, weight RMS,
    momentum norm, and Newton-Schulz's orthogonality error (the largest over the shapes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("update_rms/matrix", "update RMS"),
        ("weight_rms/matrix", "weight RMS"),
        ("momentum_norm/matrix", "momentum norm"),
        ("ortho_error", "Newton-Schulz's output: RMS of its sigma - 1 (the largest over the shapes)"),
    )
    fig, axes = plt.subplots(2, 2, figsize=(13, 8 + _legend_height(runs)))
    for r, style in zip(runs, _styles(runs), strict=True):
        records = [x for x in r["records"] if "update_rms/matrix" in x]
        for ax, (key, _) in zip(axes.flat, panels, strict=True):
            if key == "ortho_error":
                shown = [
                    (x["step"], max(v for k, v in x.items() if k.startswith("ortho_error/")))
                    for x in records
                    if any(k.startswith("ortho_error/") for k in x)
                ]
            else:
                shown = [(x["step"], x[key]) for x in records]
            if shown:
                ax.plot(*zip(*shown, strict=True), label=r["label"], lw=1.0, **style)
    for ax, (_, title) in zip(axes.flat, panels, strict=True):
        ax.set_title(f"hidden matrices: {title}", fontsize=9)
        ax.set_xlabel("steps")
        ax.grid(alpha=0.3)
    _legend_below(fig, axes.flat[0], runs)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv=None):
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run folders or folders of runs")
    parser.add_argument("--x", choices=("steps", "tokens"), default="steps", help="the x axis")
    parser.add_argument("--zoom", type=float, default=None, help="add a panel of the last ZOOM of the run")
    parser.add_argument("--out", type=Path, default=None, help="output folder; default: the first path")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    if args.zoom is not None and not 0 < args.zoom < 1:
        raise RunsError(f"--zoom must lie in (0, 1), got {args.zoom}")
    runs = load_runs(args.paths, args.x)
    if not any(r["val"] for r in runs):
        raise RunsError(f"no run under {', '.join(map(str, args.paths))} has a validation loss yet")
    out = args.out or (args.paths[0] if args.paths[0].is_dir() else Path("."))
    out.mkdir(parents=True, exist_ok=True)
    title = args.title or f"validation loss, {len(runs)} runs"
    plot_val_loss([r for r in runs if r["val"]], out / "val_loss.png", args.x, args.zoom, title)
    table = final_loss_tables(runs)
    (out / "final_losses.md").write_text(table)
    print(table, end="")
    written = ["val_loss.png", "final_losses.md"]
    with_diagnostics = [r for r in runs if any(DIAGNOSTICS[0] in x for x in r["records"])]
    if with_diagnostics:
        plot_selection(with_diagnostics, out / "selection.png")
        written.append("selection.png")
    with_optimizer_diagnostics = [r for r in runs if any("update_rms/matrix" in x for x in r["records"])]
    if with_optimizer_diagnostics:
        plot_diagnostics(with_optimizer_diagnostics, out / "diagnostics.png")
        written.append("diagnostics.png")
    print(f"wrote {', '.join(str(out / w) for w in written)}")


if __name__ == "__main__":
    try:
        main()
    except RunsError as e:
        sys.exit(f"error: {e}")
