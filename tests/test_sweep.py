"""scripts/sweep.py and scripts/plot_runs.py: a two-point sweep of a few steps, run, re-run,
resumed and plotted; the shipped sweep files and the paper's configs."""

import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from scripts import plot_runs, run_records, sweep
from scripts.sweep import SweepError, grid_points, load_sweep, point_name
from tests.conftest import REPO, TINY, fake_run
from training.checkpoint import list_checkpoints
from training.config import load_config
from training.metrics import read_metrics

POINTS = ["optimizer=dion2", "optimizer=muon"]


def write_sweep(folder, grid, **overrides):
    """A tiny base config and a sweep file over it, in `folder`; return the sweep file."""
    base = folder / "tiny.yaml"
    base.write_text(yaml.safe_dump({**TINY, "lr": 0.02, "scalar_lr": 0.01, "checkpoint_every": 2}))
    path = folder / "two.yaml"
    path.write_text(yaml.safe_dump({"base": str(base), "overrides": overrides, "grid": grid}))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A two-point sweep (Dion2 and Muon, 4 steps each), run once: (sweep file, runs folder, output)."""
    folder = tmp_path_factory.mktemp("sweep")
    path = write_sweep(folder, {"optimizer": ["dion2", "muon"]}, num_iterations=4)
    rc = sweep.main([str(path), "--runs_dir", str(folder / "runs")])
    assert rc == 0
    return path, folder / "runs" / "two"


def test_grid_points_are_the_union_of_products_without_repeats():
    grid = [
        {"optimizer": ["muon"]},
        {"optimizer": ["dion2"], "ortho_fraction": [0.5, 0.25]},
        {"optimizer": ["muon"]},
    ]
    points = grid_points(grid, "s.yaml")
    assert [point_name(p) for p in points] == [
        "optimizer=muon",
        "optimizer=dion2,ortho_fraction=0.5",
        "optimizer=dion2,ortho_fraction=0.25",
    ]
    assert point_name({"data_dir": "data/x", "compile": True, "scalar_lr": None}) == (
        "data_dir=data_x,compile=true,scalar_lr=null"
    )


def test_a_sweep_runs_every_point_and_prints_a_summary(finished, capsys):
    path, runs = finished
    assert sorted(p.name for p in runs.iterdir()) == POINTS
    for name in POINTS:
        records = read_metrics(runs / name)
        assert [r["step"] for r in records] == [1, 2, 3, 4]
        assert yaml.safe_load((runs / name / "config.yaml").read_text())["optimizer"] == name.split("=")[1]
        assert "val_loss" in (runs / name / "train.log").read_text()
    # Run again: both points are finished, so nothing trains and the summary still shows them.
    logs = {n: (runs / n / "train.log").read_text() for n in POINTS}
    assert sweep.main([str(path), "--runs_dir", str(runs.parent)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^\[1/2\] optimizer=dion2: finished before, skipped$", out, flags=re.MULTILINE)
    assert re.search(r"^\[2/2\] optimizer=muon: finished before, skipped$", out, flags=re.MULTILINE)
    for name in POINTS:
        val = read_metrics(runs / name)[-1]["val_loss"]
        assert re.search(rf"^{re.escape(name)}\s+skipped\s+{val:.4f}\s+512\s+\d+$", out, flags=re.MULTILINE)
        assert (runs / name / "train.log").read_text() == logs[name]


@pytest.mark.slow
def test_an_interrupted_point_resumes_from_its_checkpoint(finished, tmp_path, capsys):
    path, runs = finished
    copy = tmp_path / "two"
    shutil.copytree(runs, copy)
    # As a crash after step 3 leaves it: the checkpoint of step 2 and the metrics of steps 1-3.
    point = copy / "optimizer=muon"
    shutil.rmtree(point / "checkpoints" / "step_000004")
    lines = (point / "metrics.jsonl").read_text().splitlines()
    (point / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n")
    assert [p.name for p in list_checkpoints(point)] == ["step_000002"]
    assert sweep.main([str(path), "--runs_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "[1/2] optimizer=dion2: finished before, skipped" in out
    assert re.search(r"\[2/2\] optimizer=muon: running \(resuming from step_000002\)", out)
    assert re.search(r"\[2/2\] optimizer=muon: done in \d+ s, val_loss [\d.]+", out)
    assert "resumed from" in (point / "train.log").read_text()
    exact = [
        {k: r.get(k) for k in ("step", "train_loss", "val_loss")}
        for r in read_metrics(runs / "optimizer=muon")
    ]
    assert [{k: r.get(k) for k in ("step", "train_loss", "val_loss")} for r in read_metrics(point)] == exact


def test_dry_run_prints_torchrun_commands_and_runs_nothing(finished, tmp_path, capsys):
    path, runs = finished
    assert sweep.main([str(path), "--runs_dir", str(tmp_path), "--dry-run", "--gpus_per_run", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and not list(tmp_path.iterdir())
    for line, name in zip(lines, POINTS, strict=True):
        assert line.startswith("torchrun --standalone --nproc_per_node=4 train.py --config ")
        assert f"--run_name {name} --resume auto" in line
    # Against the finished runs, the dry run names them instead.
    assert sweep.main([str(path), "--runs_dir", str(runs.parent), "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"# {name}: finished" for name in POINTS]


def test_a_folder_holding_another_config_is_refused(finished):
    path, runs = finished
    (path.parent / "changed").mkdir()
    changed = write_sweep(path.parent / "changed", {"optimizer": ["dion2", "muon"]}, num_iterations=6)
    before = sorted(p for p in runs.rglob("*"))
    with pytest.raises(SweepError, match=r"holds a run with num_iterations 4 but the sweep asks for 6"):
        sweep.main([str(changed), "--runs_dir", str(runs.parent)])
    assert sorted(p for p in runs.rglob("*")) == before


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "base: configs/tiny_cpu.yaml\ngrids: {}\n",
            "unknown key 'grids'; a sweep file has base, overrides, grid",
        ),
        ("grid: {optimizer: [muon]}\n", "base must name a config file, got None"),
        ("base: configs/none.yaml\n", "base config configs/none.yaml does not exist"),
        (
            "base: configs/tiny_cpu.yaml\ngrid: {lr: 0.1}\n",
            "grid key lr must map to a non-empty list, got 0.1",
        ),
        (
            "base: configs/tiny_cpu.yaml\ngrid: {learning_rate: [0.1]}\n",
            "unknown key '--learning_rate'; did you mean 'lr'",
        ),
        (
            "base: configs/tiny_cpu.yaml\ngrid: {ortho_fraction: [0.5, 1.5]}\n",
            "ortho_fraction must lie in \\(0, 1\\], got 1.5",
        ),
        ("base: configs/tiny_cpu.yaml\noverrides: {run_name: x}\n", "run_name is set by the sweep itself"),
        ("base: configs/tiny_cpu.yaml\ngrid: [[1]]\n", "each grid must be a mapping"),
        ("- 1\n", "the sweep file must be a mapping"),
    ],
)
def test_bad_sweep_files_are_refused_before_any_run(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SweepError, match=message):
        sweep.main([str(path), "--runs_dir", str(tmp_path / "runs")])
    assert not (tmp_path / "runs").exists()


def test_shipped_sweep_files_load():
    for path in sorted((REPO / "configs" / "sweeps").glob("*.yaml")):
        _, runs = load_sweep(path, REPO / "runs")
        assert runs, path
    _, runs = load_sweep(REPO / "configs" / "sweeps" / "repro_cpu.yaml", REPO / "runs")
    names = [name for name, _, _ in runs]
    assert len(names) == 32
    seeds = (0, 1, 2, 3)
    for fraction in ("0.5", "0.25", "0.125"):
        for selection in ("l1", "random"):
            for seed in seeds:
                assert f"optimizer=dion2,ortho_fraction={fraction},selection={selection},seed={seed}" in names
    for seed in seeds:
        assert {
            f"optimizer=muon,seed={seed}",
            f"optimizer=dion2,ortho_fraction=0.25,decay=full,seed={seed}",
        } < set(names)
    assert {cfg.tokenizer for _, _, cfg in runs} == {"bytes"}
    for scale in ("304m", "1b"):
        _, runs = load_sweep(REPO / "configs" / "sweeps" / f"paper_{scale}.yaml", REPO / "runs")
        optimizers = {cfg.optimizer for _, _, cfg in runs}
        assert optimizers == {"muon", "normuon", "dion", "dion2", "nordion2"}
        dion2 = {(cfg.ortho_fraction, cfg.selection) for _, _, cfg in runs if cfg.optimizer == "dion2"}
        assert {(f, s) for f in (0.5, 0.25, 0.125) for s in ("l1", "random")} <= dion2


@pytest.mark.parametrize(
    ("scale", "dim", "heads", "steps"), [("304m", 1024, 8, 10_000), ("1b", 2048, 16, 50_000)]
)
def test_paper_configs_follow_table_1(scale, dim, heads, steps):
    cfg = load_config(["--config", str(REPO / "configs" / "paper" / f"{scale}.yaml")])
    assert (cfg.model_dim, cfg.n_layer, cfg.n_head, cfg.sequence_length) == (dim, 16, heads, 2048)
    assert cfg.batch_size * cfg.sequence_length == 2**21  # the 2M-token batch
    assert cfg.num_iterations == steps and cfg.lr == 0.02
    assert (cfg.warmup_ratio, cfg.warmdown_ratio) == (0.0, 0.25)  # constant, then a 25% linear decay


def test_plot_runs_draws_the_sweep(finished, tmp_path, capsys):
    _, runs = finished
    plot_runs.main([str(runs), "--out", str(tmp_path), "--zoom", "0.5", "--x", "tokens"])
    table = (tmp_path / "final_losses.md").read_text()
    assert capsys.readouterr().out.startswith(table)
    finals = {name: read_metrics(runs / name)[-1]["val_loss"] for name in POINTS}
    rows = re.findall(
        r"^\| (optimizer=\w+) \| ([\d.]+) \| ([+-][\d.]+) \| ([\d.]+) \| 4 \| 512 \|$",
        table,
        flags=re.MULTILINE,
    )
    assert {label: float(loss) for label, loss, _, _ in rows} == pytest.approx(finals, abs=1e-4)
    assert rows[0][2] == "+0.0000" and float(rows[0][1]) <= float(rows[1][1])
    for label, _, _, tail in rows:  # step 4 alone is the last quarter of 4 steps
        assert float(tail) == pytest.approx(read_metrics(runs / label)[-1]["train_loss"], abs=1e-4)
    for png in ("val_loss.png", "selection.png"):  # the Dion2 run logged its selection diagnostics
        assert (tmp_path / png).stat().st_size > 5000


def curve(*losses):
    """Records of a run whose val loss goes through `losses`; its train loss is 1 lower."""
    return [
        {"step": 10 * i, "tokens": 100 * i, "train_loss": v - 1, "val_loss": v}
        for i, v in enumerate(losses, 1)
    ]


def test_plot_labels_show_only_keys_that_differ_and_matter(tmp_path, capsys):
    fake_run(tmp_path, "a", curve(5.0, 4.0), seed=0)
    fake_run(tmp_path, "b", curve(5.0, 4.2), seed=1)
    fake_run(tmp_path, "c", curve(5.0, 3.9), ortho_fraction=0.25)
    fake_run(tmp_path, "m", curve(5.0, 4.5), optimizer="muon")
    plot_runs.main([str(tmp_path)])
    table = capsys.readouterr().out
    # Muon reads neither ortho_fraction nor selection, so its label leaves them out.
    assert "| optimizer=muon, seed=0 | 4.5000 | +0.6000 | 3.5000 | 20 | 200 |" in table
    assert "| optimizer=dion2, ortho_fraction=0.25, seed=0 | 3.9000 | +0.0000 | 2.9000 | 20 | 200 |" in table
    # a and b differ only in their seed: averaged in the second table.
    assert (
        "| optimizer=dion2, ortho_fraction=0.5 | 2 | 4.1000 | 0.2000 | 0: 4.0000, 1: 4.2000 | 3.1000 |"
        in table
    )
    assert not (tmp_path / "selection.png").exists()  # no run logged diagnostics


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["empty"], "neither a run folder"),
        (["runs", "--zoom", "1.5"], "--zoom must lie in \\(0, 1\\), got 1.5"),
        (["runs"], "has a validation loss yet"),
    ],
)
def test_plot_errors(tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    fake_run(tmp_path / "runs", "a", [{"step": 1, "tokens": 8, "train_loss": 9.0}])
    with pytest.raises(plot_runs.RunsError, match=message):
        plot_runs.main([str(tmp_path / args[0]), *args[1:], "--out", str(tmp_path / "out")])


@pytest.mark.slow
def test_stopping_the_sweep_stops_its_run(tmp_path):
    path = write_sweep(tmp_path, {"optimizer": ["adamw"]}, num_iterations=100_000, checkpoint_every=0)
    metrics = tmp_path / "runs" / "two" / "optimizer=adamw" / "metrics.jsonl"
    cmd = [sys.executable, "scripts/sweep.py", str(path), "--runs_dir", str(tmp_path / "runs")]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 3) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metrics.is_file(), "the run never started"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    time.sleep(1)  # a run left behind would keep appending steps of a few milliseconds each
    written = metrics.read_text()
    time.sleep(2)
    assert metrics.read_text() == written


def test_the_tail_train_loss_leaves_out_skipped_steps():
    # The last quarter of 8 steps is steps 7 and 8; step 7 was skipped (null), step 6 lies before.
    losses = [9.0, 8.0, 7.0, 6.0, 5.0, 100.0, None, 3.0]
    records = [{"step": s, "train_loss": loss} for s, loss in enumerate(losses, start=1)]
    assert run_records.tail_train_loss(records) == 3.0
