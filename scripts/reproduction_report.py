"""The long reproduction of docs/reproduction.md: compact records of its runs, and its report.

    python scripts/reproduction_report.py records runs/repro_long docs/records/repro_long
    python scripts/reproduction_report.py report docs/records/repro_long

`records` writes one JSON file per finished run (its config, seed, val curve, the train loss of
each quarter, the diagnostics summary and its training time), so that the report regenerates
from the repository without the runs. `report` applies the analysis plan of the doc, fixed
before the sweep ran: five primary tests on the final val loss, paired by seed (paired t, and
the exact sign-flip test beside it), Holm's correction over them, and each claim's verdict by
its rule; the same comparisons at every quarter and the rest as exploratory. The tables replace
the text between `<!-- report:NAME -->` and `<!-- /report:NAME -->` in --doc; the figures go to
--out.
"""

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
from pathlib import Path

from scripts.compare_runs import (
    CONFIDENCE,
    configurations,
    equivalence,
    find_configuration,
    holm,
    mean_interval,
    paired,
    sign_flip_floor,
)
from scripts.run_records import RunsError, labels, load_runs, mean_train_loss

L1 = "optimizer=dion2,selection=l1,decay=selective,match_muon_rms=false,ortho_fraction="
RANDOM = "optimizer=dion2,selection=random,ortho_fraction="
FULL = "optimizer=dion2,decay=full"
MUON_RMS = "optimizer=dion2,match_muon_rms=true"
MUON = "optimizer=muon"
# Claim 2's margin: l1 and random are equal within this share of Muon's mean final val loss.
MARGIN = 0.0025
# The paper's gaps to Muon as shares of Muon's final val loss (its 1B runs, the only ones with
# Muon beside Dion2: Muon 2.623, Dion2 at 0.25 2.635), by exploratory comparison.
PAPER_SHARES = {"l1 0.25 - Muon": (2.635 - 2.623) / 2.623}
ALPHA = 0.05
QUARTERS = 4
# The primary tests of the plan: (claim, label, configuration, baseline, kind).
PRIMARY = (
    (1, "l1 0.25 - l1 0.5", f"{L1}0.25", f"{L1}0.5", "difference"),
    (1, "l1 0.125 - l1 0.25", f"{L1}0.125", f"{L1}0.25", "difference"),
    (2, "random 0.25 - l1 0.25", f"{RANDOM}0.25", f"{L1}0.25", "equivalence"),
    (2, "random 0.125 - l1 0.125", f"{RANDOM}0.125", f"{L1}0.125", "equivalence"),
    (3, "full - selective decay, l1 0.25", FULL, f"{L1}0.25", "difference"),
)
CLAIMS = {
    1: "a smaller fraction is worse",
    2: "l1 and random selection are about equal",
    3: "decaying the whole momentum is worse",
}
# Exploratory comparisons beyond the primary ones: (label, configuration, baseline).
EXPLORATORY = (
    ("l1 0.5 - Muon", f"{L1}0.5", MUON),
    ("l1 0.25 - Muon", f"{L1}0.25", MUON),
    ("l1 0.125 - Muon", f"{L1}0.125", MUON),
    ("random 0.25 - Muon", f"{RANDOM}0.25", MUON),
    ("random 0.125 - Muon", f"{RANDOM}0.125", MUON),
    ("full decay 0.25 - Muon", FULL, MUON),
    ("l1 0.25 at Muon's RMS - Muon", MUON_RMS, MUON),
    ("l1 0.25 at Muon's RMS - l1 0.25", MUON_RMS, f"{L1}0.25"),
)
DIAGNOSTICS = ("selection_coverage_mean", "selection_coverage_min", "selection_longest_wait")


def compact_record(run):
    """A finished run's record: config, seed, val curve, the train loss of each quarter, the
    diagnostics summary (the selection's at the end, the means of the rest over the run) and
    the time of its training steps."""
    records, steps = run["records"], run["records"][-1]["step"]
    logged = [r for r in records if "update_rms/matrix" in r]
    errors = [max(v for k, v in r.items() if k.startswith("ortho_error/")) for r in logged]
    diagnostics = {key: logged[-1][key] for key in DIAGNOSTICS if logged and key in logged[-1]}
    if logged:
        diagnostics["update_rms"] = statistics.mean(r["update_rms/matrix"] for r in logged)
    if errors:
        diagnostics["ortho_error"] = statistics.mean(errors)
    return {
        "config": run["config"],
        "seed": run["config"]["seed"],
        "steps": steps,
        "train_time": sum(r["step_time"] for r in records),
        "val": [list(pair) for pair in run["val"]],
        "train_quarters": [
            mean_train_loss(records, steps * q // QUARTERS, steps * (q + 1) // QUARTERS)
            for q in range(QUARTERS)
        ],
        "diagnostics": diagnostics,
    }


def write_records(runs_dir, out):
    """One record per finished run under `runs_dir` (its last step is its config's last) into
    `out`; returns (written, unfinished) counts."""
    runs = load_runs([runs_dir])
    done = [r for r in runs if r["records"] and r["records"][-1]["step"] == r["config"]["num_iterations"]]
    out.mkdir(parents=True, exist_ok=True)
    for r in done:
        path = out / f"{r['config']['run_name']}.json"
        path.write_text(json.dumps(compact_record(r), indent=1, sort_keys=True) + "\n")
    return len(done), len(runs) - len(done)


def load_records(folder):
    """The records in `folder`, each with `seedless`, its configuration's label over seeds."""
    paths = sorted(Path(folder).glob("*.json"))
    if not paths:
        raise RunsError(f"{folder} holds no run records (*.json)")
    records = [json.loads(p.read_text()) for p in paths]
    seedless = labels([{k: v for k, v in r["config"].items() if k != "seed"} for r in records])
    for record, label in zip(records, seedless, strict=True):
        record["seedless"] = label
    return records


def val_at(record, step):
    """The record's val loss at `step`."""
    found = dict((s, v) for s, v in record["val"]).get(step)
    if found is None:
        raise RunsError(f"run {record['config']['run_name']} has no val loss at step {step}")
    return found


def check_seeds(groups):
    """Refuse a sweep whose configurations do not all hold the same seeds: the plan pairs them all."""
    seeds = {label: sorted(r["seed"] for r in records) for label, records in groups.items()}
    every = sorted(set().union(*map(set, seeds.values())))
    short = [f"{label} (seeds {s})" for label, s in seeds.items() if s != every]
    if short:
        raise RunsError(f"every configuration needs seeds {every}; these lack some: " + "; ".join(short))


def pairs(groups, name, base_name):
    """The records of configuration `name` and of `base_name`, paired by seed."""
    mine = sorted(groups[find_configuration(groups, name)], key=lambda r: r["seed"])
    base = sorted(groups[find_configuration(groups, base_name)], key=lambda r: r["seed"])
    return mine, base


def quarter_steps(records):
    """The steps that end each quarter of the run."""
    steps = records[0]["steps"]
    return [steps * q // QUARTERS for q in range(1, QUARTERS + 1)]


def primary_tests(groups, margin):
    """Each primary test at the end of the run, with Holm's adjusted p-values and its outcome."""
    results = []
    for claim, label, name, base_name, kind in PRIMARY:
        mine, base = pairs(groups, name, base_name)
        end = mine[0]["steps"]
        values, baseline = [val_at(r, end) for r in mine], [val_at(r, end) for r in base]
        if kind == "equivalence":
            difference, low, high, p, flips = equivalence(values, baseline, margin)
            wide = paired(values, baseline)[1:3]
        else:
            difference, low, high, p, flips = paired(values, baseline)
            wide = (low, high)
        results.append(
            {
                "claim": claim,
                "label": label,
                "kind": kind,
                "n": len(values),
                "difference": difference,
                "interval": (low, high),
                "interval_95": wide,
                "p": p,
                "flips": flips,
            }
        )
    for result, adjusted in zip(results, holm([r["p"] for r in results]), strict=True):
        result["adjusted"] = adjusted
    return results


def verdict(claim, tests, margin):
    """'reproduced', 'not reproduced' or 'not established' by the plan's rule for `claim`."""
    mine = [t for t in tests if t["claim"] == claim]
    significant = [t for t in mine if t["adjusted"] < ALPHA]
    if claim == 2:
        if len(significant) == len(mine):
            return "reproduced"
        outside = [t for t in mine if t["interval_95"][0] > margin or t["interval_95"][1] < -margin]
        return "not reproduced" if outside else "not established"
    if any(t["difference"] < 0 for t in significant):
        return "not reproduced"
    if len(significant) == len(mine) and all(t["difference"] > 0 for t in mine):
        return "reproduced"
    return "not established"


def _p(p):
    return "-" if math.isnan(p) else f"{p:.3g}"


def primary_table(tests, margin, muon_loss):
    """Markdown: the five primary tests and the verdict of each claim."""
    n = tests[0]["n"]
    lines = [
        f"Final val loss (nats per byte), paired by seed over {n} seeds. Difference: its mean, with "
        f"its {CONFIDENCE:.0%} interval for a difference test and its 90% interval for an equivalence "
        f"test (TOST), whose margin is +-{MARGIN:.2%} of Muon's mean final val loss {muon_loss:.4f}: "
        f"+-{margin:.4f}. p: the paired t-test (TOST: the larger one-sided p), Holm-adjusted over "
        f"the five tests beside it; flips: the exact sign-flip test, whose floor with {n} pairs is "
        f"{sign_flip_floor(n):.3g} two-sided and {sign_flip_floor(n, 'greater'):.3g} one-sided.",
        "",
        "| claim | test | kind | difference [interval] | p | Holm-adjusted p | flips p |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for t in tests:
        low, high = t["interval"]
        lines.append(
            f"| {t['claim']} | {t['label']} | {t['kind']} | {t['difference']:+.4f} [{low:+.4f}, {high:+.4f}] "
            f"| {_p(t['p'])} | {_p(t['adjusted'])} | {_p(t['flips'])} |"
        )
    lines += ["", "| claim | the paper's | verdict by the plan's rule |", "|---:|---|---|"]
    for claim, text in CLAIMS.items():
        lines.append(f"| {claim} | {text} | **{verdict(claim, tests, margin)}** |")
    return "\n".join(lines) + "\n"


def quarter_rows(groups, comparisons, margin, muon_loss=None):
    """Markdown rows and effects: each comparison (label, configuration, baseline, kind) at
    every quarter: the paired val difference with its 95% interval and both p-values, and for an
    equivalence comparison the TOST's two. With `muon_loss`, the final difference as a share of
    Muon's mean final val loss, beside the paper's share where it has one."""
    share = muon_loss is not None
    lines = [
        "| comparison | quarter | val loss difference [95% CI] | t p | flips p | TOST t p | TOST flips p"
        + (" | share of Muon's loss | the paper's |" if share else " |"),
        "|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if share else ""),
    ]
    effects = {}
    for label, name, base_name, kind in comparisons:
        mine, base = pairs(groups, name, base_name)
        for q, step in enumerate(quarter_steps(mine), start=1):
            values, baseline = [val_at(r, step) for r in mine], [val_at(r, step) for r in base]
            difference, low, high, p, flips = paired(values, baseline)
            tost = equivalence(values, baseline, margin)[3:] if kind == "equivalence" else (math.nan,) * 2
            effects.setdefault(label, []).append((difference, low, high))
            cells = [label, str(q), f"{difference:+.4f} [{low:+.4f}, {high:+.4f}]", _p(p), _p(flips)]
            cells += [_p(x) for x in tost]
            if share:
                last = q == QUARTERS
                cells.append(f"{difference / muon_loss:+.2%}" if last else "")
                cells.append(f"{PAPER_SHARES[label]:+.2%}" if last and label in PAPER_SHARES else "")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", effects


def runs_table(groups):
    """Markdown: per configuration, its seeds, the mean val loss at each quarter with the final
    one's 95% interval, the train loss of the last quarter and the time of its training steps."""
    lines = [
        "| configuration | seeds | val, quarter 1 | 2 | 3 | final val loss [95% CI] | train loss, last "
        "quarter (not held out) | training time, mean (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, records in groups.items():
        steps = quarter_steps(records)
        cells = [label, str(len(records))]
        cells += [f"{statistics.mean(val_at(r, s) for r in records):.4f}" for s in steps[:-1]]
        mean, low, high = mean_interval([val_at(r, steps[-1]) for r in records])
        cells.append(f"{mean:.4f}" if math.isnan(low) else f"{mean:.4f} [{low:.4f}, {high:.4f}]")
        cells.append(f"{statistics.mean(r['train_quarters'][-1] for r in records):.4f}")
        cells.append(f"{statistics.mean(r['train_time'] for r in records):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    total = sum(r["train_time"] for records in groups.values() for r in records)
    lines += ["", f"Training steps of all {sum(map(len, groups.values()))} runs: {total / 3600:.2f} hours."]
    return "\n".join(lines) + "\n"


def diagnostics_table(groups):
    """Markdown: per configuration, means over seeds of the diagnostics summary."""
    lines = [
        "| configuration | coverage at the end, mean / worst matrix | longest wait (steps), mean over "
        "seeds of each run's longest | orthogonality error, mean over the run | update RMS, matrices |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, records in groups.items():
        d = [r["diagnostics"] for r in records]
        coverage = wait = error = "-"
        if "selection_coverage_mean" in d[0]:
            coverage = (
                f"{statistics.mean(x['selection_coverage_mean'] for x in d):.3f} / "
                f"{statistics.mean(x['selection_coverage_min'] for x in d):.3f}"
            )
            wait = f"{statistics.mean(x['selection_longest_wait'] for x in d):.0f}"
        if "ortho_error" in d[0]:
            error = f"{statistics.mean(x['ortho_error'] for x in d):.3f}"
        update = f"{statistics.mean(x['update_rms'] for x in d):.2e}" if "update_rms" in d[0] else "-"
        lines.append(f"| {label} | {coverage} | {wait} | {error} | {update} |")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def figure(path, size):
    """The axes of a one-panel figure of `size` inches, saved to `path` when the block ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    yield ax
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_curves(groups, path):
    """The mean val loss of each configuration over the run, its seeds' range shaded."""
    with figure(path, (8, 5)) as ax:
        for label, records in groups.items():
            steps = [s for s, _ in records[0]["val"]]
            values = [[val_at(r, s) for r in records] for s in steps]
            ax.plot(steps, [statistics.mean(v) for v in values], marker="o", ms=3, label=label)
            ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], alpha=0.15)
        ax.set_xlabel("step")
        ax.set_ylabel("val loss (nats per byte)")
        ax.set_ylim(top=min(ax.get_ylim()[1], 2.6))
        ax.legend(fontsize=6)


def plot_effects(effects, path):
    """Each primary comparison's paired val difference at every quarter, with its 95% interval."""
    with figure(path, (8, 4.5)) as ax:
        for k, (label, per_quarter) in enumerate(effects.items()):
            xs = [q + 0.06 * (k - (len(effects) - 1) / 2) for q in range(1, QUARTERS + 1)]
            means = [d for d, _, _ in per_quarter]
            errors = [[d - lo for d, lo, _ in per_quarter], [hi - d for d, _, hi in per_quarter]]
            ax.errorbar(xs, means, yerr=errors, fmt="o-", capsize=3, label=label)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(1, QUARTERS + 1))
        ax.set_xlabel("quarter of the run")
        ax.set_ylabel("val loss difference, paired (positive: worse)")
        ax.legend(fontsize=7)


def replace_sections(doc, sections):
    """The doc's text with each `<!-- report:NAME -->` ... `<!-- /report:NAME -->` filled."""
    text = doc.read_text()
    for name, body in sections.items():
        start, end = f"<!-- report:{name} -->\n", f"<!-- /report:{name} -->"
        if start not in text or end not in text:
            raise RunsError(f"{doc} has no section {start.strip()} ... {end}")
        head, rest = text.split(start, 1)
        text = head + start + body + end + rest.split(end, 1)[1]
    return text


def report(records_dir, doc, out):
    """Fill the doc's long-sweep sections and draw its figures from the records."""
    groups = configurations(load_records(records_dir))
    check_seeds(groups)
    muon_loss = statistics.mean(val_at(r, r["steps"]) for r in groups[find_configuration(groups, MUON)])
    margin = MARGIN * muon_loss
    tests = primary_tests(groups, margin)
    primary = [(label, name, base, kind) for _, label, name, base, kind in PRIMARY]
    quarters, effects = quarter_rows(groups, primary, margin)
    exploratory = [(*comparison, "difference") for comparison in EXPLORATORY]
    explored, _ = quarter_rows(groups, exploratory, margin, muon_loss)
    figures = Path(os.path.relpath(out, doc.parent))
    sections = {
        "long_primary": primary_table(tests, margin, muon_loss),
        "long_quarters": f"![the primary comparisons at every quarter]({figures / 'effects.png'})\n\n"
        + quarters,
        "long_runs": f"![validation loss of the long sweep]({figures / 'val_loss.png'})\n\n"
        + runs_table(groups),
        "long_exploratory": explored,
        "long_diagnostics": diagnostics_table(groups),
    }
    text = replace_sections(doc, sections)  # every section found before anything is written
    out.mkdir(parents=True, exist_ok=True)
    plot_curves(groups, out / "val_loss.png")
    plot_effects(effects, out / "effects.png")
    doc.write_text(text)
    return sections


def main(argv=None):
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    records = commands.add_parser("records", help="write the compact records of a sweep's finished runs")
    records.add_argument("runs", type=Path, help="the sweep's folder of runs")
    records.add_argument("out", type=Path, help="the folder of records")
    build = commands.add_parser("report", help="fill the doc's tables and draw its figures from the records")
    build.add_argument("records", type=Path, help="the folder of records")
    build.add_argument("--doc", type=Path, default=Path("docs/reproduction.md"))
    build.add_argument("--out", type=Path, default=Path("docs/figures/repro_long"))
    args = parser.parse_args(argv)
    if args.command == "records":
        written, unfinished = write_records(args.runs, args.out)
        print(f"wrote {written} records in {args.out}; {unfinished} runs not finished, left out")
    else:
        sections = report(args.records, args.doc, args.out)
        print(f"wrote {len(sections)} tables in {args.doc} and 2 figures in {args.out}")


if __name__ == "__main__":
    try:
        main()
    except RunsError as e:
        sys.exit(f"error: {e}")
