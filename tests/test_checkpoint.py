"""Atomic checkpoint writes, pruning, and the resume rules."""

import pytest
import torch

from optimizers import AdamWLion
from training import checkpoint
from training.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    load_model_and_optimizer,
    resolve_resume,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def model_and_optimizer(value):
    model = torch.nn.Linear(3, 2, bias=False)
    torch.nn.init.constant_(model.weight, value)
    return model, AdamWLion(model.parameters())


def save(run_dir, step, keep=5):
    model, optimizer = model_and_optimizer(step)
    return save_checkpoint(run_dir, step, model, optimizer, {"step": step}, keep)


def test_save_load_and_prune(tmp_path):
    for step in (5, 10, 15):
        save(tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000010", "step_000015"]
    latest = list_checkpoints(tmp_path)[-1]
    assert load_checkpoint(latest) == {"step": 15}
    model, optimizer = model_and_optimizer(0)
    load_model_and_optimizer(latest, model, optimizer)
    assert model.weight.tolist() == [[15.0] * 3] * 2


def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    save(tmp_path, 1)

    def crash(*args):
        raise KeyboardInterrupt  # killed after writing, before the rename

    monkeypatch.setattr(checkpoint.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000001"]
    assert load_checkpoint(tmp_path / "checkpoints" / "step_000001")["step"] == 1
    monkeypatch.undo()
    save(tmp_path, 2)  # the next save clears the leftover temporary folder
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000001", "step_000002"]


def test_resume_rules(tmp_path):
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume("auto", tmp_path) is None  # nothing yet: start fresh
    save(tmp_path, 3)
    save(tmp_path, 12)
    assert resolve_resume("auto", tmp_path).name == "step_000012"
    with pytest.raises(CheckpointError, match="already holds checkpoints; pass --resume auto"):
        resolve_resume(None, tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_resume(str(tmp_path / "nope"), tmp_path)


def test_unreadable_checkpoint(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "meta.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a complete checkpoint folder"):
        load_checkpoint(bad)
    (bad / ".metadata").write_bytes(b"")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing")


def test_rng_round_trip():
    state = rng_state()
    a = torch.rand(3)
    set_rng_state(state)
    assert torch.equal(torch.rand(3), a)
