"""scripts/compare_runs.py on synthetic runs whose statistics are computed here by hand, and
scripts/plot_runs.py finding runs at any depth."""

import math
import statistics

import pytest

from scripts import compare_runs, plot_runs, reproduction_report
from scripts.run_records import RunsError, load_runs
from tests.conftest import fake_run

# Student's t, 97.5% quantiles, from a printed table.
T_975 = {2: 4.302653, 3: 3.182446}
MUON = [2.0, 2.1, 2.3]
DION2 = [2.2, 2.4, 2.25, 2.35]


def t_density(x, df):
    """Student's t density."""
    norm = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
    return norm * (1 + x * x / df) ** (-(df + 1) / 2)


def two_sided_p(t, df, intervals=20_000):
    """2 P(T > |t|), the density integrated by Simpson's rule from 0 to |t|."""
    h = abs(t) / intervals
    weights = [1 if i in (0, intervals) else 4 if i % 2 else 2 for i in range(intervals + 1)]
    area = h / 3 * sum(w * t_density(i * h, df) for i, w in enumerate(weights))
    return 2 * (0.5 - area)


def records(final_val, steps=20, step_time=1.0, slope=0.1):
    """A run whose train loss falls by `slope` a step from 5 and whose last val loss is `final_val`."""
    return [
        {
            "step": s,
            "tokens": 10 * s,
            "train_loss": 5 - slope * s,
            "step_time": step_time,
            **({"val_loss": final_val} if s in (10, steps) else {}),
        }
        for s in range(1, steps + 1)
    ]


@pytest.fixture
def runs(tmp_path):
    for seed, loss in enumerate(MUON):
        fake_run(tmp_path / "sweep", f"muon{seed}", records(loss), optimizer="muon", seed=seed)
    for seed, loss in enumerate(DION2):
        fake_run(tmp_path / "sweep", f"dion2_{seed}", records(loss, step_time=0.5, slope=0.05), seed=seed)
    return tmp_path / "sweep"


def test_the_interval_is_students(runs):
    mean, low, high = compare_runs.mean_interval(MUON)
    by_hand = T_975[2] * statistics.stdev(MUON) / math.sqrt(3)
    assert mean == pytest.approx(sum(MUON) / 3)
    assert (low, high) == pytest.approx((mean - by_hand, mean + by_hand), rel=1e-6)


def test_welch_against_a_hand_computation():
    va, vb = statistics.variance(DION2) / 4, statistics.variance(MUON) / 3
    t = (statistics.mean(DION2) - statistics.mean(MUON)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / 3 + vb**2 / 2)
    difference, low, high, p = compare_runs.welch(DION2, MUON)
    assert difference == pytest.approx(statistics.mean(DION2) - statistics.mean(MUON))
    assert p == pytest.approx(two_sided_p(t, df), abs=1e-6)
    # The interval of the difference is symmetric and excludes 0 exactly when p < 0.05.
    assert (high + low) / 2 == pytest.approx(difference)
    assert (low > 0) == (p < 0.05)


# Student's t, 95% quantiles (one-sided 0.05), from a printed table.
T_95 = {2: 2.919986}


def test_paired_against_a_hand_computation():
    values, baseline = [2.2, 2.4, 2.25], [2.0, 2.1, 2.3]
    differences = [0.2, 0.3, -0.05]
    mean, sd = statistics.mean(differences), statistics.stdev(differences)
    t = mean / (sd / math.sqrt(3))
    difference, low, high, p, flips = compare_runs.paired(values, baseline)
    assert difference == pytest.approx(mean)
    assert p == pytest.approx(two_sided_p(t, 2), abs=1e-6)
    half = T_975[2] * sd / math.sqrt(3)
    assert (low, high) == pytest.approx((mean - half, mean + half), rel=1e-6)
    # The 8 sign flips of (0.2, 0.3, -0.05) have means 0.45/3, 0.15/3, ...: |mean| >= 0.45/3 for
    # (+,+,-) as given, its negation, (+,+,+) and (-,-,-): 4 of 8.
    assert flips == pytest.approx(4 / 8)


def test_the_sign_flip_floor_is_reached_when_every_difference_has_one_sign():
    for n in (3, 4, 5):
        differences = [0.1 * (i + 1) for i in range(n)]
        assert compare_runs.sign_flip_p(differences) == pytest.approx(compare_runs.sign_flip_floor(n))
        assert compare_runs.sign_flip_floor(n) == 2 / 2**n
        assert compare_runs.sign_flip_p(differences, "greater") == pytest.approx(1 / 2**n)
    assert compare_runs.sign_flip_floor(5, "greater") == 1 / 32


def test_equivalence_is_two_one_sided_tests():
    values, baseline = [1.0, 1.02, 0.99, 1.01], [1.0, 1.0, 1.0, 1.0]
    differences = [0.0, 0.02, -0.01, 0.01]
    mean, sem = statistics.mean(differences), statistics.stdev(differences) / 2
    difference, low, high, p, flips = compare_runs.equivalence(values, baseline, 0.05)
    assert difference == pytest.approx(mean)
    # The larger one-sided p is the upper test's: (mean - 0.05) / sem, one tail.
    t_upper = (mean - 0.05) / sem
    assert p == pytest.approx(two_sided_p(t_upper, 3) / 2, abs=1e-6)
    # Every difference lies within the margin on both sides: each one-sided flip test is at its floor.
    assert flips == pytest.approx(1 / 16)
    # A margin the differences exceed: p above 0.05, and the 90% interval reaches past it.
    _, low, high, p, _ = compare_runs.equivalence(values, baseline, 0.01)
    assert p > 0.05 and high > 0.01
    _, low3, high3, _, _ = compare_runs.equivalence([1.1, 1.3, 0.95], [1.0, 1.0, 1.0], 0.5)
    half = T_95[2] * statistics.stdev([0.1, 0.3, -0.05]) / math.sqrt(3)
    assert (low3, high3) == pytest.approx((0.35 / 3 - half, 0.35 / 3 + half), rel=1e-6)


def test_holm_against_a_hand_computation():
    # sorted 0.01, 0.02, 0.03, 0.2: times 4, 3, 2, 1 -> 0.04, 0.06, 0.06, 0.2
    assert compare_runs.holm([0.03, 0.01, 0.2, 0.02]) == pytest.approx([0.06, 0.04, 0.2, 0.06])
    assert compare_runs.holm([0.5, float("nan")]) == pytest.approx([1.0, 1.0])
    # sorted 0.3, 0.4: times 2, 1 -> 0.6, 0.4, kept non-decreasing: 0.6, 0.6
    assert compare_runs.holm([0.3, 0.4]) == pytest.approx([0.6, 0.6])


def test_the_paired_table_pairs_by_seed(runs, tmp_path):
    table = compare_runs.comparison(load_runs([runs]), "optimizer=muon", pair=True)[0]
    # Dion2's seed 3 has no Muon run to pair with: seeds 0, 1, 2 pair.
    difference, low, high, p, flips = compare_runs.paired(DION2[:3], MUON)
    row = next(line for line in table.splitlines() if line.startswith("| optimizer=dion2"))
    assert f"| {difference:+.4f} [{low:+.4f}, {high:+.4f}] | {p:.3g} / {flips:.3g} |" in row
    assert "whose floor with 3 pairs is 0.25" in table
    compare_runs.main([str(runs), "--baseline", "optimizer=muon", "--paired", "--out", str(tmp_path / "p")])
    assert (tmp_path / "p" / "comparison.md").read_text() == table


def test_the_table_and_its_measures(runs, tmp_path):
    table, measured, baseline, target, seconds = compare_runs.comparison(load_runs([runs]), "optimizer=muon")
    assert baseline == "optimizer=muon"
    # Muon's train loss of the last quarter: steps 16..20 of 5 - 0.1 s, mean 5 - 1.8.
    assert target == pytest.approx(3.2)
    # The fastest run trains 20 steps of 0.5 s.
    assert seconds == pytest.approx(10.0)
    muon = measured["optimizer=muon"]
    assert [m["val"] for m in muon] == MUON
    # 5 - 0.1 s <= 3.25 first at step 18 (one-step window: 5% of 20 steps).
    measured_at = compare_runs.comparison(load_runs([runs]), "optimizer=muon", target=3.25)[1]
    assert {m["steps"] for m in measured_at["optimizer=muon"]} == {18}
    # Muon's 1 s steps reach 10 s at step 10.
    assert [m["at_time"] for m in muon] == pytest.approx([4.0] * 3)
    assert {m["steps"] for m in measured["optimizer=dion2"]} == {None}
    mean, low, high = compare_runs.mean_interval(DION2)
    p = compare_runs.welch(DION2, MUON)[3]
    row = next(line for line in table.splitlines() if line.startswith("| optimizer=dion2"))
    assert f"| 4 | {mean:.4f} [{low:.4f}, {high:.4f}] | {p:.3g} |" in row
    assert "| never |" in row
    compare_runs.main([str(runs), "--baseline", "optimizer=muon", "--out", str(tmp_path / "out")])
    assert (tmp_path / "out" / "comparison.md").read_text() == table
    assert (tmp_path / "out" / "comparison.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("seed=0", "must match one configuration, matched 2"),
        ("optimizer=adamw", "matched none"),
        ("no pairs", "neither a configuration's label nor key=value pairs"),
    ],
)
def test_a_bad_baseline_names_the_configurations(runs, name, message):
    with pytest.raises(RunsError, match=message):
        compare_runs.comparison(load_runs([runs]), name)


def test_runs_are_found_at_any_depth(tmp_path, capsys):
    fake_run(tmp_path / "runs" / "sweep_a" / "deeper", "one", records(2.0))
    fake_run(tmp_path / "runs" / "sweep_b", "two", records(2.5), ortho_fraction=0.25)
    plot_runs.main([str(tmp_path / "runs")])
    table = capsys.readouterr().out
    assert "| ortho_fraction=0.5 | 2.0000 |" in table
    assert "| ortho_fraction=0.25 | 2.5000 |" in table


def table_rows(text, name):
    """The cells of each row of the first table in section `name` of a report, header left out."""
    section = text.split(f"<!-- report:{name} -->\n")[1].split(f"<!-- /report:{name} -->")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[1:]]


# The long sweep's points, and each one's final val loss above Muon's 2.0 by seed: claim 1's steps
# are clearly worse, random equals l1 within far less than the margin, full decay is better.
LONG_POINTS = (
    ({"optimizer": "muon"}, (0.0, 0.01, -0.01)),
    ({"ortho_fraction": 0.5}, (0.05, 0.06, 0.05)),
    ({"ortho_fraction": 0.25}, (0.10, 0.11, 0.101)),
    ({"ortho_fraction": 0.125}, (0.15, 0.161, 0.15)),
    ({"ortho_fraction": 0.25, "selection": "random"}, (0.1001, 0.1099, 0.1012)),
    ({"ortho_fraction": 0.125, "selection": "random"}, (0.1501, 0.1608, 0.1499)),
    ({"ortho_fraction": 0.25, "decay": "full"}, (0.05, 0.061, 0.05)),
    ({"ortho_fraction": 0.25, "match_muon_rms": True}, (0.02, 0.03, 0.02)),
)


def long_records(final, steps=20):
    """A run whose val loss reaches 2 + `final` at the end, measured at every quarter."""
    out = records(2.0, steps=steps)
    for r in out:
        r.pop("val_loss", None)
        if r["step"] % (steps // 4) == 0:
            r["val_loss"] = 2.0 + final * r["step"] / steps
            r["update_rms/matrix"], r["ortho_error/4x8"] = 1e-3, 0.1
    return out


def test_the_long_report_applies_the_plan(tmp_path):
    base = {"num_iterations": 20, "selection": "l1", "decay": "selective", "match_muon_rms": False}
    for i, (point, finals) in enumerate(LONG_POINTS):
        for seed, final in enumerate(finals):
            fake_run(tmp_path / "runs", f"{i}_{seed}", long_records(final), **{**base, **point, "seed": seed})
    fake_run(tmp_path / "runs", "unfinished", long_records(0.0, steps=8), **{**base, "seed": 9})
    reproduction_report.main(["records", str(tmp_path / "runs"), str(tmp_path / "records")])
    assert len(list((tmp_path / "records").glob("*.json"))) == 24  # the unfinished run left out
    names = ("long_primary", "long_quarters", "long_runs", "long_exploratory", "long_diagnostics")
    doc = tmp_path / "doc.md"
    doc.write_text("".join(f"# {n}\n<!-- report:{n} -->\nold\n<!-- /report:{n} -->\n" for n in names))
    argv = ["report", str(tmp_path / "records"), "--doc", str(doc), "--out", str(tmp_path / "out")]
    reproduction_report.main(argv)
    text = doc.read_text()
    primary = table_rows(text, "long_primary")
    finals = {tuple(sorted(p.items())): f for p, f in LONG_POINTS}
    l1_05, l1_025 = finals[(("ortho_fraction", 0.5),)], finals[(("ortho_fraction", 0.25),)]
    difference, low, high, p, flips = compare_runs.paired([2 + x for x in l1_025], [2 + x for x in l1_05])
    tests = [reproduction_report.PRIMARY[k][1] for k in range(5)]
    assert primary[0][:4] == ["1", tests[0], "difference", f"{difference:+.4f} [{low:+.4f}, {high:+.4f}]"]
    assert primary[0][4] == f"{p:.3g}" and primary[0][6] == f"{flips:.3g}"

    # Holm over the five, by hand: the i-th smallest p times (5 - i), never below the one before.
    def final(**point):
        return [2 + x for x in finals[tuple(sorted(point.items()))]]

    l1 = {f: final(ortho_fraction=f) for f in (0.5, 0.25, 0.125)}
    ps = [
        compare_runs.paired(l1[0.25], l1[0.5])[3],
        compare_runs.paired(l1[0.125], l1[0.25])[3],
        *(
            compare_runs.equivalence(final(ortho_fraction=f, selection="random"), l1[f], 0.005)[3]
            for f in (0.25, 0.125)
        ),
        compare_runs.paired(final(ortho_fraction=0.25, decay="full"), l1[0.25])[3],
    ]
    adjusted, running = {}, 0.0
    for rank, i in enumerate(sorted(range(5), key=ps.__getitem__)):
        running = max(running, min(1.0, (5 - rank) * ps[i]))
        adjusted[i] = running
    assert [row[4] for row in primary[:5]] == [f"{p:.3g}" for p in ps]
    assert [row[5] for row in primary[:5]] == [f"{adjusted[i]:.3g}" for i in range(5)]
    # Test 3, random 0.25 - l1 0.25, is an equivalence test: its 90% interval, by Student's t.
    rand = [
        r - x
        for r, x in zip(finals[(("ortho_fraction", 0.25), ("selection", "random"))], l1_025, strict=True)
    ]
    half = T_95[2] * statistics.stdev(rand) / math.sqrt(3)
    mean = statistics.mean(rand)
    assert primary[2][3] == f"{mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}]"
    # The margin: 0.25% of Muon's mean final loss, 2.0.
    assert "+-0.0050" in text
    verdicts = [line for line in text.splitlines() if line.startswith("| ") and "**" in line]
    assert verdicts == [
        "| 1 | a smaller fraction is worse | **reproduced** |",
        "| 2 | l1 and random selection are about equal | **reproduced** |",
        "| 3 | decaying the whole momentum is worse | **not reproduced** |",
    ]
    quarters = table_rows(text, "long_quarters")
    assert len(quarters) == 5 * 4 and [row[1] for row in quarters[:4]] == ["1", "2", "3", "4"]
    assert len(table_rows(text, "long_runs")) == 8
    assert len(table_rows(text, "long_exploratory")) == len(reproduction_report.EXPLORATORY) * 4
    assert "![validation loss of the long sweep](out/val_loss.png)" in text
    assert (tmp_path / "out" / "val_loss.png").stat().st_size > 0
    assert (tmp_path / "out" / "effects.png").stat().st_size > 0


def test_the_long_report_refuses_configurations_without_every_seed(tmp_path):
    base = {"num_iterations": 20, "selection": "l1", "decay": "selective", "match_muon_rms": False}
    for i, (point, finals) in enumerate(LONG_POINTS):
        for seed, final in enumerate(finals[: 2 if i == 3 else 3]):
            fake_run(tmp_path / "runs", f"{i}_{seed}", long_records(final), **{**base, **point, "seed": seed})
    reproduction_report.main(["records", str(tmp_path / "runs"), str(tmp_path / "records")])
    doc = tmp_path / "doc.md"
    doc.write_text("untouched")
    with pytest.raises(RunsError, match=r"needs seeds \[0, 1, 2\]; these lack some: .*0.125.*seeds \[0, 1\]"):
        reproduction_report.main(["report", str(tmp_path / "records"), "--doc", str(doc)])
    assert doc.read_text() == "untouched"


def test_claim_2_is_not_reproduced_only_when_an_interval_lies_outside_the_margin():
    def test(low, high, adjusted):
        return {"claim": 2, "difference": (low + high) / 2, "interval_95": (low, high), "adjusted": adjusted}

    verdict = reproduction_report.verdict
    assert verdict(2, [test(-0.001, 0.001, 0.01), test(-0.002, 0.001, 0.02)], 0.005) == "reproduced"
    assert verdict(2, [test(-0.001, 0.001, 0.01), test(-0.002, 0.009, 0.3)], 0.005) == "not established"
    assert verdict(2, [test(-0.001, 0.001, 0.01), test(0.006, 0.02, 1.0)], 0.005) == "not reproduced"


def test_a_claim_of_worse_is_not_established_without_every_test():
    def test(difference, adjusted):
        return {"claim": 1, "difference": difference, "adjusted": adjusted}

    verdict = reproduction_report.verdict
    assert verdict(1, [test(0.02, 0.01), test(0.03, 0.2)], 0.005) == "not established"
    assert verdict(1, [test(0.02, 0.01), test(-0.03, 0.04)], 0.005) == "not reproduced"
    assert verdict(1, [test(0.02, 0.01), test(0.03, 0.04)], 0.005) == "reproduced"
