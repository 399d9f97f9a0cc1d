"""Atomic checkpoint writes, pruning, and the resume rules."""

import pytest
import torch

from training import checkpoint
from training.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def test_save_load_and_prune(tmp_path):
    for step in (5, 10, 15):
        save_checkpoint(tmp_path, step, {"step": step, "w": torch.full((3,), step)}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000010.pt", "step_000015.pt"]
    assert load_checkpoint(list_checkpoints(tmp_path)[-1])["w"].tolist() == [15, 15, 15]


def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, {"step": 1}, keep=5)

    def crash(*args):
        raise KeyboardInterrupt  # killed after writing, before the rename

    monkeypatch.setattr(checkpoint.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, {"step": 2}, keep=5)
    files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert files == ["step_000001.pt"]
    assert load_checkpoint(tmp_path / "checkpoints" / "step_000001.pt")["step"] == 1


def test_resume_rules(tmp_path):
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume("auto", tmp_path) is None  # nothing yet: start fresh
    save_checkpoint(tmp_path, 3, {"step": 3}, keep=5)
    save_checkpoint(tmp_path, 12, {"step": 12}, keep=5)
    assert resolve_resume("auto", tmp_path).name == "step_000012.pt"
    with pytest.raises(CheckpointError, match="already holds checkpoints; pass --resume auto"):
        resolve_resume(None, tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_resume(str(tmp_path / "nope.pt"), tmp_path)


def test_unreadable_checkpoint(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(bad)


def test_rng_round_trip():
    state = rng_state()
    a = torch.rand(3)
    set_rng_state(state)
    assert torch.equal(torch.rand(3), a)
