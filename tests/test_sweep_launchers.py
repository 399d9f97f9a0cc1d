"""scripts/sweep_launchers.py: points run two at a time, and as submitit jobs (its local
executor standing in for Slurm) that are preempted, requeued and resumed."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from scripts import sweep
from scripts.sweep_launchers import LaunchError, command, device_slots
from tests.conftest import REPO, TINY
from training.metrics import read_metrics

LOSSES = ("step", "train_loss", "val_loss")


def write_sweep(folder, grid, **overrides):
    """A tiny base config and a sweep file over it; return the sweep file."""
    base = folder / "tiny.yaml"
    base.write_text(yaml.safe_dump({**TINY, "lr": 0.02, "scalar_lr": 0.01}))
    path = folder / "scale.yaml"
    path.write_text(yaml.safe_dump({"base": str(base), "overrides": overrides, "grid": grid}))
    return path


def losses(run_dir):
    """The run's (step, train_loss, val_loss) records."""
    return [{k: r.get(k) for k in LOSSES} for r in read_metrics(run_dir)]


def alone(path, runs_dir, name, threads=None):
    """Train one point of a sweep by itself, under another run name, in a process with
    `threads` threads (default: as many as the environment gives); return its losses."""
    _, runs = sweep.load_sweep(path, runs_dir)
    argv = next(argv for point, argv, _ in runs if point == name)
    argv = [*argv[: argv.index("--run_name")], "--run_name", f"alone-{name}"]
    env = dict(os.environ)
    if threads is not None:
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    subprocess.run(command(argv, 1), cwd=REPO, env=env, check=True, capture_output=True)
    return losses(Path(runs_dir) / path.stem / f"alone-{name}")


@pytest.mark.slow
def test_two_points_at_once_match_each_alone(tmp_path, capsys):
    path = write_sweep(tmp_path, {"optimizer": ["dion2", "muon"]}, num_iterations=30)
    assert sweep.main([str(path), "--runs_dir", str(tmp_path / "runs"), "--parallel", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    events = [line for line in out if re.match(r"\[\d/2\] optimizer=\w+: (running|done)", line)]
    # Both points were started before either finished.
    assert [e.split(": ")[1].split(",")[0].split(" ")[0] for e in events] == [
        "running",
        "running",
        "done",
        "done",
    ]
    threads = int(device_slots(2, 1)[0]["OMP_NUM_THREADS"])
    for name in ("optimizer=dion2", "optimizer=muon"):
        together = losses(tmp_path / "runs" / "scale" / name)
        assert [r["step"] for r in together] == list(range(1, 31))
        assert together == alone(path, tmp_path / "runs", name, threads)


@pytest.mark.slow
def test_status_lists_each_points_state_step_and_loss(tmp_path, capsys):
    path = write_sweep(tmp_path, {"optimizer": ["adamw", "muon"]}, num_iterations=4)
    runs = tmp_path / "runs"
    assert sweep.main([str(path), "--runs_dir", str(runs), "--status"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert re.match(r"run\s+state\s+step\s+train_loss\s+val_loss\s+launch", lines[0])
    assert all(re.match(r"optimizer=\w+\s+new\s+0/4\s+-\s+-\s+-$", line) for line in lines[1:])
    subprocess.run(
        command(sweep.load_sweep(path, runs)[1][0][1], 1), cwd=REPO, check=True, capture_output=True
    )
    assert sweep.main([str(path), "--runs_dir", str(runs), "--status"]) == 0
    record = read_metrics(runs / "scale" / "optimizer=adamw")[-1]
    done = capsys.readouterr().out.splitlines()[1]
    assert re.match(
        rf"optimizer=adamw\s+done\s+4/4\s+{record['train_loss']:.4f}\s+{record['val_loss']:.4f}\s+-$", done
    )


def test_a_machine_too_small_for_the_parallel_runs_is_refused(tmp_path):
    cores = len(os.sched_getaffinity(0))
    with pytest.raises(LaunchError, match=rf"--parallel {cores + 1} x --gpus_per_run 1 processes need"):
        device_slots(cores + 1, 1)
    path = write_sweep(tmp_path, {"optimizer": ["adamw"]}, num_iterations=4)
    with pytest.raises(sweep.SweepError, match="--parallel must be >= 1, got 0"):
        sweep.main([str(path), "--runs_dir", str(tmp_path / "runs"), "--parallel", "0"])
    assert not (tmp_path / "runs").exists()


def train_pid(run_dir, deadline):
    """The pid of the train.py process writing into `run_dir`, found among this machine's."""
    while time.monotonic() < deadline:
        for proc in Path("/proc").iterdir():
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            except (FileNotFoundError, ProcessLookupError, PermissionError, NotADirectoryError):
                continue
            named = b"train.py" in cmdline and str(run_dir.name).encode() in cmdline
            if named and str(run_dir.parent).encode() in b" ".join(cmdline):
                return int(proc.name)
        time.sleep(0.05)
    raise AssertionError(f"no train.py process for {run_dir}")


def wait_for(condition, deadline, what):
    """Poll `condition` until it holds or the deadline passes."""
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_slurm_job_stopped_by_sigterm_is_requeued_and_resumes_exactly(tmp_path, capsys):
    steps = 200
    path = write_sweep(tmp_path, {"optimizer": ["dion2"]}, num_iterations=steps, val_loss_every=50)
    runs = tmp_path / "runs"
    args = [str(path), "--runs_dir", str(runs), "--launcher", "slurm", "--submitit_cluster", "local"]
    assert sweep.main(args) == 0
    out = capsys.readouterr().out
    assert re.search(r"^optimizer=dion2: submitted as job \d+$", out, flags=re.MULTILINE)
    run_dir = runs / "scale" / "optimizer=dion2"
    deadline = time.monotonic() + 120
    pid = train_pid(run_dir, deadline)
    metrics = run_dir / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and metrics.read_text().count("\n") >= 3, deadline, "step 3")
    # As Slurm preempts a job: SIGTERM to its processes. The job's own process ignores it
    # (submitit), and train.py checkpoints its step and exits.
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: read_metrics(run_dir)[-1]["step"] == steps, deadline, "the requeued job")
    log = (run_dir / "train.log").read_text()
    stopped = int(re.search(r"preempted after step (\d+)", log).group(1))
    assert 3 <= stopped < steps
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stopped:06d}'} at step {stopped}" in log
    job_log = "".join(p.read_text() for p in (runs / "scale" / "submitit").glob("*_log.*"))
    assert "Requeued job" in job_log
    assert losses(run_dir) == alone(path, runs, "optimizer=dion2")
    assert sweep.main([*args[:3], "--status"]) == 0
    assert re.search(r"optimizer=dion2\s+done\s+200/200 .* slurm \d+: ended$", capsys.readouterr().out)
    # Submitting again skips the finished point.
    assert sweep.main(args) == 0
    assert "optimizer=dion2: finished before, skipped" in capsys.readouterr().out


def test_the_multi_node_command_meets_at_the_first_host():
    cmd = command(["--config", "c.yaml"], 8, nodes=2, node_rank=1, master="node-a", job_id="77")
    # torchrun would kill the ranks 30 s after passing a preemption signal on, mid-checkpoint.
    assert cmd[:2] == ["env", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=170"]
    assert cmd[2:5] == [sys.executable, "-m", "torch.distributed.run"]
    assert {"--nnodes=2", "--node_rank=1", "--rdzv_endpoint=node-a:29500", "--rdzv_id=77"} <= set(cmd)
    assert "--nproc_per_node=8" in cmd and cmd[-3:] == ["train.py", "--config", "c.yaml"]
