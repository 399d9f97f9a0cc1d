"""Compare configurations over their seeds, with confidence intervals and Welch or paired t-tests.

    python scripts/compare_runs.py runs/repro_cpu --baseline optimizer=muon
    python scripts/compare_runs.py runs --baseline "ortho_fraction=0.25,selection=l1,decay=selective" \\
        --target 1.55 --out docs/figures/compare

RUNS are run folders or folders with runs beneath them at any depth. Runs that differ only in
their seed are one configuration. `--baseline` names one configuration by key=value pairs
(comma-separated) that only it matches, or by its label. Per configuration, over its seeds:

- the final val loss and the mean train loss of the last quarter of the steps (each batch is
  scored before the model trains on it, so that is a held-out loss too): their mean, a 95%
  confidence interval (Student's t), and the p-value of Welch's t-test against the baseline;
- the steps until the train loss, averaged over a trailing window of 5% of the run, first
  reaches `--target` (default: the baseline's mean train loss of the last quarter);
- the train loss (the same trailing mean) at equal wall-clock time: when the slowest run's
  training steps had taken as long as the fastest run's whole training (the sum of
  `step_time`, which leaves out evaluation and checkpoints).

With `--paired`, each configuration's runs are paired with the baseline's by seed (a seed sets
the initial weights, and every run reads the same data in the same order): each measure gets
the mean paired difference with its 95% interval, the paired t-test's p-value and, beside it,
the exact sign-flip permutation p-value (all 2^n flips of n pairs), whose floor of 2 / 2^n the
table states.

When runs were scored on downstream tasks (scripts/evaluate.py), a second table gives each
task's metrics (of each run's newest evaluation) the same way: mean, interval and p-value.

Written to --out (default: the first folder given): comparison.md (also printed) and
comparison.png; with --write FILE, the table also to that results file.
"""

import argparse
import math
import statistics
import sys
from pathlib import Path

import numpy
import yaml
from scipy import stats

from scripts.results import results_file
from scripts.run_records import RunsError, load_runs, tail_train_loss

CONFIDENCE = 0.95
# The trailing window of the smoothed train loss, as a fraction of the run's steps.
WINDOW = 0.05


def mean_interval(values):
    """(mean, low, high): the mean and its 95% confidence interval by Student's t; with one
    value the interval is unknown (nan)."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    sem = statistics.stdev(values) / math.sqrt(len(values))
    if sem == 0:
        return mean, mean, mean
    low, high = stats.t.interval(CONFIDENCE, len(values) - 1, loc=mean, scale=sem)
    return mean, float(low), float(high)


def welch(values, baseline):
    """(difference of the means, its 95% interval low, high, p-value) of Welch's t-test of
    `values` against `baseline`; nan where either has fewer than 2 values."""
    difference = statistics.mean(values) - statistics.mean(baseline)
    if len(values) < 2 or len(baseline) < 2:
        return difference, math.nan, math.nan, math.nan
    if statistics.variance(values) == statistics.variance(baseline) == 0:  # no spread: no test
        return difference, difference, difference, math.nan
    result = stats.ttest_ind(values, baseline, equal_var=False)
    interval = result.confidence_interval(CONFIDENCE)
    return difference, float(interval.low), float(interval.high), float(result.pvalue)


def sign_flip_p(differences, alternative="two-sided"):
    """The exact permutation p-value of the mean of paired differences: the share of all 2^n
    sign flips whose mean is at least as extreme (scipy's permutation_test, every flip)."""
    result = stats.permutation_test(
        (numpy.asarray(differences, dtype=float),),
        lambda d, axis: numpy.mean(d, axis=axis),
        permutation_type="samples",
        n_resamples=math.inf,
        vectorized=True,
        alternative=alternative,
    )
    return float(result.pvalue)


def sign_flip_floor(pairs, alternative="two-sided"):
    """The smallest p-value `sign_flip_p` can give with `pairs` pairs: every difference of one
    sign is one flip of 2^n (two of them two-sided)."""
    return (2 if alternative == "two-sided" else 1) / 2**pairs


def paired(values, baseline):
    """The comparison of `values` with `baseline` paired by position (the same seed): (mean
    difference, its 95% interval low, high, the paired t-test's p-value, the sign-flip p-value);
    nan where there are fewer than 2 pairs, and no t-test where the differences do not vary."""
    differences = [v - b for v, b in zip(values, baseline, strict=True)]
    mean = statistics.mean(differences)
    if len(differences) < 2:
        return mean, math.nan, math.nan, math.nan, math.nan
    flips = sign_flip_p(differences)
    if statistics.variance(differences) == 0:
        return mean, mean, mean, math.nan, flips
    result = stats.ttest_rel(values, baseline)
    interval = result.confidence_interval(CONFIDENCE)
    return mean, float(interval.low), float(interval.high), float(result.pvalue), flips


def equivalence(values, baseline, margin):
    """Two one-sided paired tests (TOST) that the mean difference lies within (-margin, margin):
    (mean difference, its 90% interval low, high, the larger one-sided t p-value, the larger
    one-sided sign-flip p-value). The interval lies within the margin exactly when the t
    p-value is below 0.05. nan where there are fewer than 2 pairs or the differences do not vary."""
    differences = [v - b for v, b in zip(values, baseline, strict=True)]
    mean, n = statistics.mean(differences), len(differences)
    if n < 2 or statistics.variance(differences) == 0:  # no spread: no t-test
        return mean, math.nan, math.nan, math.nan, math.nan
    sem = statistics.stdev(differences) / math.sqrt(n)
    low, high = stats.t.interval(1 - 2 * (1 - CONFIDENCE), n - 1, loc=mean, scale=sem)
    above = stats.ttest_1samp(differences, -margin, alternative="greater").pvalue
    below = stats.ttest_1samp(differences, margin, alternative="less").pvalue
    flips = max(
        sign_flip_p([d + margin for d in differences], "greater"),
        sign_flip_p([d - margin for d in differences], "less"),
    )
    return mean, float(low), float(high), float(max(above, below)), flips


def holm(pvalues):
    """Holm's step-down adjustment, in the order given: the i-th smallest p-value (from 0) times
    (m - i), made non-decreasing in that order and capped at 1; nan counts as 1."""
    p = [1.0 if math.isnan(x) else x for x in pvalues]
    adjusted, running = [0.0] * len(p), 0.0
    for rank, i in enumerate(sorted(range(len(p)), key=p.__getitem__)):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        adjusted[i] = running
    return adjusted


def seed_pairs(group, baseline):
    """The runs of `group` and of `baseline` with a seed in common, in order of seed."""
    base = {r["config"].get("seed"): r for r in baseline}
    mine = {r["config"].get("seed"): r for r in group}
    seeds = sorted(set(base) & set(mine))
    return [mine[s] for s in seeds], [base[s] for s in seeds]


def smoothed_train_loss(records):
    """step -> the mean train loss of the trailing window of WINDOW of the run's steps."""
    losses = [(r["step"], r["train_loss"]) for r in records if r["train_loss"] is not None]
    window = max(1, round(WINDOW * records[-1]["step"]))
    out = {}
    for i, (step, _) in enumerate(losses):
        trail = [v for _, v in losses[max(0, i - window + 1) : i + 1]]
        out[step] = sum(trail) / len(trail)
    return out


def steps_to(records, target):
    """The first step whose smoothed train loss is at most `target`; None if none is."""
    return next((step for step, loss in smoothed_train_loss(records).items() if loss <= target), None)


def loss_at_time(records, seconds):
    """The smoothed train loss at the first step by which the training steps have taken
    `seconds`."""
    smoothed, elapsed = smoothed_train_loss(records), 0.0
    for r in records:
        elapsed += r["step_time"]
        if elapsed >= seconds and r["step"] in smoothed:
            return smoothed[r["step"]]
    return smoothed[records[-1]["step"]]


def configurations(runs):
    """{label over seeds: [runs]}, in the order first seen."""
    groups = {}
    for r in runs:
        groups.setdefault(r["seedless"], []).append(r)
    return groups


def find_configuration(groups, name):
    """The label of the one configuration that `name` names: its label, or key=value pairs
    (comma-separated) that only its runs match."""
    if name in groups:
        return name
    try:
        wanted = dict(pair.split("=", 1) for pair in name.replace(" ", "").split(","))
    except ValueError:
        raise RunsError(
            f"--baseline '{name}' is neither a configuration's label nor key=value pairs"
        ) from None
    matches = [
        label
        for label, group in groups.items()
        if all(str(group[0]["config"].get(k)) == str(yaml.safe_load(v)) for k, v in wanted.items())
    ]
    if len(matches) != 1:
        found = "none" if not matches else f"{len(matches)}: {'; '.join(matches)}"
        raise RunsError(
            f"--baseline '{name}' must match one configuration, matched {found}; the configurations: "
            + "; ".join(groups)
        )
    return matches[0]


def measures(runs, target, seconds):
    """Per run, the numbers compared: final val loss, last-quarter train loss, steps to
    `target`, and the smoothed train loss at `seconds` of training."""
    return [
        {
            "val": r["val"][-1][1],
            "train": tail_train_loss(r["records"]),
            "steps": steps_to(r["records"], target),
            "at_time": loss_at_time(r["records"], seconds),
        }
        for r in runs
    ]


def _interval_cell(values):
    mean, low, high = mean_interval(values)
    return f"{mean:.4f}" if math.isnan(low) else f"{mean:.4f} [{low:.4f}, {high:.4f}]"


def _p_cell(values, baseline, is_baseline):
    if is_baseline:
        return "baseline"
    p = welch(values, baseline)[3]
    return "-" if math.isnan(p) else f"{p:.3g}"


def _paired_cells(values, baseline, is_baseline):
    """[difference [95% CI], "t p / sign-flip p"] of seed-paired values."""
    if is_baseline:
        return ["baseline", "-"]
    if len(values) < 2:
        return ["-", "-"]
    difference, low, high, p, flips = paired(values, baseline)
    t = "-" if math.isnan(p) else f"{p:.3g}"
    return [f"{difference:+.4f} [{low:+.4f}, {high:+.4f}]", f"{t} / {flips:.3g}"]


def downstream_table(groups, baseline):
    """Markdown lines: per configuration, each downstream metric over the seeds that were
    scored, with the p-value against the baseline; [] when no run was scored."""
    metrics = dict.fromkeys(
        name
        for group in groups.values()
        for r in group
        if r["evaluation"]
        for name in r["evaluation"]["metrics"]
        if not name.endswith("_stderr")
    )
    if not metrics:
        return []

    def scores(group, name):
        return [
            r["evaluation"]["metrics"][name]
            for r in group
            if name in (r["evaluation"] or {}).get("metrics", {})
        ]

    lines = [
        "",
        "Downstream (scripts/evaluate.py, each run's newest evaluation): mean [95% interval] over the "
        "scored seeds, and p against the baseline.",
        "",
        "| configuration | scored | " + " | ".join(f"{name} | p" for name in metrics) + " |",
        "|---|---:|" + "---:|---:|" * len(metrics),
    ]
    for label, group in groups.items():
        cells = [label, str(sum(r["evaluation"] is not None for r in group))]
        for name in metrics:
            values, base = scores(group, name), scores(groups[baseline], name)
            if not values:
                cells += ["-", "-"]
                continue
            cells += [_interval_cell(values), _p_cell(values, base, label == baseline) if base else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def comparison(runs, baseline_name, target=None, pair=False):
    """(markdown table, {label: measures}, baseline label, target, seconds) for the runs; with
    `pair`, the tests are paired by seed."""
    runs = [r for r in runs if r["val"]]
    if not runs:
        raise RunsError("no run has a validation loss yet")
    groups = configurations(runs)
    baseline = find_configuration(groups, baseline_name)
    if target is None:
        target = statistics.mean(tail_train_loss(r["records"]) for r in groups[baseline])
    seconds = min(sum(x["step_time"] for x in r["records"]) for r in runs)
    measured = {label: measures(group, target, seconds) for label, group in groups.items()}
    if pair:
        pairs = {label: seed_pairs(group, groups[baseline]) for label, group in groups.items()}
        n = min(len(mine) for mine, _ in pairs.values())
        test = (
            f"paired by seed: the mean difference from the baseline [its 95% interval]; p: the paired "
            f"t-test / the exact sign-flip test, whose floor with {n} pairs is {sign_flip_floor(n):.3g}"
        )
        tested = ("difference [95% CI]", "p: t / flips")
    else:
        test = "p: Welch's t-test against the baseline"
        tested = ("p",)
    lines = [
        f"Over seeds: mean [95% confidence interval]; {test}; the baseline: {baseline}. Target train "
        f"loss {target:.4f}; equal time {seconds:.1f} s of training steps.",
        "",
        "| configuration | seeds | final val loss | "
        + " | ".join(tested)
        + " | train loss, last quarter | "
        + " | ".join(tested)
        + " | steps to target (reached) | train loss at equal time | "
        + " | ".join(tested)
        + " |",
        "|---|---:|" + "---:|" * (3 * (1 + len(tested)) + 1),
    ]
    for label, values in measured.items():
        column = {key: [v[key] for v in values] for key in values[0]}
        if pair:
            mine, base = pairs[label]
            mine, base = measures(mine, target, seconds), measures(base, target, seconds)
        else:
            mine, base = values, measured[baseline]
        reached = [s for s in column["steps"] if s is not None]
        steps = f"{statistics.mean(reached):.0f} ({len(reached)}/{len(values)})" if reached else "never"
        cells = [label, str(len(values))]
        for key in ("val", "train", "at_time"):
            if key == "at_time":
                cells.append(steps)
            mine_values, base_values = [v[key] for v in mine], [v[key] for v in base]
            cells.append(_interval_cell(column[key]))
            if pair:
                cells += _paired_cells(mine_values, base_values, label == baseline)
            else:
                cells.append(_p_cell(mine_values, base_values, label == baseline))
        lines.append("| " + " | ".join(cells) + " |")
    lines += downstream_table(groups, baseline)
    return "\n".join(lines) + "\n", measured, baseline, target, seconds


def plot_comparison(measured, baseline, path):
    """Each configuration's mean with its 95% interval: final val loss and last-quarter train loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(measured)
    fig, axes = plt.subplots(1, 2, figsize=(13, 1.2 + 0.45 * len(labels)), sharey=True)
    for ax, (key, title) in zip(
        axes, (("val", "final val loss"), ("train", "train loss, last quarter")), strict=True
    ):
        for y, label in enumerate(labels):
            mean, low, high = mean_interval([v[key] for v in measured[label]])
            error = [[0], [0]] if math.isnan(low) else [[mean - low], [high - mean]]
            color = "black" if label == baseline else "tab:blue"
            ax.errorbar(mean, y, xerr=error, fmt="o", color=color, capsize=4)
            ax.scatter(
                [v[key] for v in measured[label]], [y] * len(measured[label]), s=8, color=color, alpha=0.4
            )
        base_mean = statistics.mean(v[key] for v in measured[baseline])
        ax.axvline(base_mean, color="black", lw=0.8, ls="--")
        ax.set_title(f"{title}: mean, 95% CI, seeds")
        ax.grid(alpha=0.3)
    axes[0].set_yticks(range(len(labels)), labels, fontsize=7)
    axes[0].invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv=None):
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run folders or folders with runs beneath them")
    parser.add_argument("--baseline", required=True, help="key=value pairs or the label of one configuration")
    parser.add_argument("--target", type=float, default=None, help="train loss for 'steps to target'")
    parser.add_argument(
        "--paired", action="store_true", help="pair the runs by seed (paired t and sign flips)"
    )
    parser.add_argument("--out", type=Path, default=None, help="output folder; default: the first path")
    parser.add_argument("--write", default=None, help="also write the table to this results file (markdown)")
    args = parser.parse_args(argv)
    table, measured, baseline, _, _ = comparison(
        load_runs(args.paths), args.baseline, args.target, args.paired
    )
    out = args.out or (args.paths[0] if args.paths[0].is_dir() else Path("."))
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.md").write_text(table)
    plot_comparison(measured, baseline, out / "comparison.png")
    with results_file(
        args.write, "compare_runs.py", sys.argv[1:] if argv is None else argv, None, markdown=True
    ):
        print(table, end="")
    print(f"wrote {out / 'comparison.md'}, {out / 'comparison.png'}")


if __name__ == "__main__":
    try:
        main()
    except RunsError as e:
        sys.exit(f"error: {e}")
