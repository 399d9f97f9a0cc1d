"""Runs that meet trouble: a non-finite loss or gradient, a preemption signal, a damaged checkpoint."""

import json
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from parallel.layout import Layout
from parallel.process_group import init_distributed
from tests.conftest import REPO, TORCHRUN_ENV, run_train, torchrun, torchrun_command, train_argv
from tests.test_train import compared, run_cli
from training.checkpoint import list_checkpoints
from training.config import load_config
from training.exit_codes import ExitCode
from training.run_setup import Run, build_run
from training.step import NonFiniteError


def strict_records(run_dir):
    """metrics.jsonl read by a strict JSON parser: a bare NaN or Infinity is an error."""

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    text = (run_dir / "metrics.jsonl").read_text()
    return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]


def checkpoint_steps(run_dir):
    return [int(p.name.removeprefix("step_")) for p in list_checkpoints(run_dir)]


@pytest.mark.slow
def test_an_exploding_run_stops_at_its_first_nonfinite_step(tmp_path):
    argv = train_argv(
        tmp_path,
        "boom",
        lr=1e8,
        scalar_lr=1e8,
        grad_clip=0,
        checkpoint_every=1,
        keep_checkpoints=2,
        num_iterations=30,
    )
    result = run_cli(argv)
    assert result.returncode == ExitCode.NON_FINITE, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    stopped = re.fullmatch(
        r"error: step (\d+): (train_loss|grad_norm) is (nan|inf).* are kept\n", result.stderr
    )
    assert stopped, result.stderr
    bad_step = int(stopped[1])
    records = strict_records(tmp_path / "boom")
    first_bad = next(r["step"] for r in records if r["train_loss"] is None or r["grad_norm"] is None)
    assert bad_step == first_bad == records[-1]["step"]
    assert records[-1]["nonfinite"]
    # Nothing saved at or after the bad step; the good ones before it are still there.
    assert checkpoint_steps(tmp_path / "boom") == list(range(max(1, bad_step - 2), bad_step))


def poison_gradients(monkeypatch, at_calls):
    """Make the gradient of the first parameter NaN after the given calls of Run.accumulate."""
    calls = []
    accumulate = Run.accumulate

    def poisoned(run):
        loss = accumulate(run)
        calls.append(1)
        if len(calls) in at_calls:
            next(run.model.parameters()).grad.view(-1)[0] = float("nan")
        return loss

    monkeypatch.setattr(Run, "accumulate", poisoned)


def test_a_bad_gradient_is_skipped_when_allowed_and_stops_the_run_when_not(tmp_path, monkeypatch):
    poison_gradients(monkeypatch, at_calls={3})
    records = run_train(tmp_path, "skip", max_skipped_steps=1)
    assert [r["step"] for r in records] == list(range(1, 9))  # the run went on
    assert records[2]["nonfinite"] == ["grad_norm"] and records[2]["grad_norm"] is None
    assert records[2]["skipped_steps"] == 1 and "nonfinite" not in records[3]
    assert all(r["train_loss"] is not None for r in records)

    poison_gradients(monkeypatch, at_calls={2, 5})
    with pytest.raises(NonFiniteError, match=r"step 5: grad_norm is nan; .*max_skipped_steps 1"):
        run_train(tmp_path, "stop", max_skipped_steps=1, checkpoint_every=1)
    assert checkpoint_steps(tmp_path / "stop") == [3, 4]


def test_a_skipped_step_leaves_weights_and_optimizer_state_untouched():
    cfg = load_config(train_argv("unused", "unused", optimizer="dion2", lr=0.02, grad_clip=0))
    run = build_run(cfg, Layout(), init_distributed(cfg.device, cfg.timeout), data="random")
    model, optimizer = run.model, run.optimizer
    assert not run.apply(run.accumulate(), 1.0).nonfinite  # a real step
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    state = {
        p: {k: v.clone() for k, v in s.items() if torch.is_tensor(v)} for p, s in optimizer.state.items()
    }
    loss = run.accumulate()
    model.lm_head.weight.grad[0, 0] = float("inf")
    outcome = run.apply(loss, 1.0)
    assert outcome.nonfinite == ["grad_norm"] and outcome.grad_norm == float("inf")
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    for p, saved in state.items():
        assert all(torch.equal(optimizer.state[p][k], v) for k, v in saved.items())
    assert all(p.grad is None for p in model.parameters())


def wait_for_records(run_dir, count, proc, timeout=120):
    """Wait until the run has logged `count` steps; fail if it ended first."""
    path = run_dir / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) >= count:
            return
        time.sleep(0.005)
    raise AssertionError(f"the run ended or stalled before step {count}: {proc.poll()}")


PREEMPTED_RUN = {"num_iterations": 120, "val_loss_every": 50}


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_checkpoints_the_step_and_resume_gives_the_same_losses(tmp_path, signum):
    reference = run_train(tmp_path, "reference", **PREEMPTED_RUN)
    argv = train_argv(tmp_path, "stopped", **PREEMPTED_RUN)
    proc = subprocess.Popen(
        [sys.executable, "train.py", *argv],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_records(tmp_path / "stopped", 8, proc)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == ExitCode.PREEMPTED, err
    stopped_at = strict_records(tmp_path / "stopped")[-1]["step"]
    assert 8 <= stopped_at < PREEMPTED_RUN["num_iterations"]
    assert checkpoint_steps(tmp_path / "stopped") == [stopped_at]
    assert f"preempted after step {stopped_at}" in out
    resumed = run_cli([*argv, "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr
    assert compared(strict_records(tmp_path / "stopped")) == compared(reference)  # bit for bit


@pytest.mark.slow
def test_sigterm_to_torchrun_checkpoints_every_rank_and_resume_matches(tmp_path):
    settings = {
        "num_iterations": 40,
        "val_loss_every": 20,
        "optimizer": "dion2",
        "lr": 0.02,
        "scalar_lr": 0.01,
    }
    assert torchrun(2, train_argv(tmp_path, "reference", **settings)).returncode == 0
    argv = train_argv(tmp_path, "stopped", **settings)
    proc = subprocess.Popen(
        torchrun_command(2, argv),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=TORCHRUN_ENV,
    )
    wait_for_records(tmp_path / "stopped", 8, proc)
    proc.send_signal(signal.SIGTERM)  # as a scheduler does: torchrun passes it on to its workers
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0, out
    stopped_at = strict_records(tmp_path / "stopped")[-1]["step"]
    assert f"preempted after step {stopped_at}" in out, err[-3000:]
    assert 8 <= stopped_at < settings["num_iterations"]
    assert checkpoint_steps(tmp_path / "stopped") == [stopped_at]
    resumed = torchrun(2, [*argv, "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    records, reference = strict_records(tmp_path / "stopped"), strict_records(tmp_path / "reference")
    assert [r["step"] for r in records] == [r["step"] for r in reference]
    for a, b in zip(records, reference, strict=True):
        for key in ("train_loss", "val_loss", "grad_norm"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-6, abs=0), (a["step"], key)


@pytest.mark.slow
def test_a_truncated_checkpoint_is_one_line_and_auto_resume_falls_back(tmp_path):
    full = run_train(tmp_path, "full", checkpoint_every=4, keep_checkpoints=5)
    run = tmp_path / "full"
    newest = list_checkpoints(run)[-1]
    shard = next(newest.glob("*.distcp"))
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size // 2])
    explicit = run_cli(train_argv(tmp_path, "other", resume=str(newest)))
    assert explicit.returncode == ExitCode.BAD_INPUT
    assert (
        explicit.stderr
        == f"error: checkpoint {newest} cannot be resumed from: its file {shard.name} has "
        + (f"{shard.stat().st_size} bytes, not the {2 * shard.stat().st_size} it was written with\n")
    )
    assert not (tmp_path / "other").exists()  # refused before any work
    auto = run_cli(train_argv(tmp_path, "full", checkpoint_every=4, keep_checkpoints=5, resume="auto"))
    assert auto.returncode == 0, auto.stderr
    assert f"checkpoint {newest} is passed over" in auto.stdout
    assert "resumed from" in auto.stdout and "step_000004 at step 4" in auto.stdout
    assert compared(strict_records(run)) == compared(full)
