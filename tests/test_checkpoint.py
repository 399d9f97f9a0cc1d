"""Atomic checkpoint writes, pruning, the resume rules, integrity and safe loading."""

import io
import json
import os
import pickle

import numpy as np
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
    assert resolve_resume(None, tmp_path) == (None, [])
    assert resolve_resume("auto", tmp_path) == (None, [])  # nothing yet: start fresh
    save(tmp_path, 3)
    save(tmp_path, 12)
    assert resolve_resume("auto", tmp_path)[0].name == "step_000012"
    with pytest.raises(CheckpointError, match="already holds checkpoints; pass --resume auto"):
        resolve_resume(None, tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_resume(str(tmp_path / "nope"), tmp_path)


def test_unreadable_checkpoint(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "meta.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="has no manifest.json, so its save never finished"):
        load_checkpoint(bad)
    (bad / ".metadata").write_bytes(b"")  # now it looks like a legacy checkpoint
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing")


def damage(folder, how):
    """Truncate the largest shard file of a checkpoint by one byte, or delete it."""
    shard = max(folder.glob("*.distcp"), key=lambda p: p.stat().st_size)
    if how == "truncated":
        shard.write_bytes(shard.read_bytes()[:-1])
    else:
        shard.unlink()
    return shard.name


@pytest.mark.parametrize("how", ["truncated", "deleted"])
def test_a_damaged_checkpoint_is_named_and_auto_resume_falls_back(tmp_path, how):
    save(tmp_path, 4)
    newest = save(tmp_path, 8)
    name = damage(newest, how)
    problem = r"has \d+ bytes, not the \d+ it was written with" if how == "truncated" else "is missing"
    with pytest.raises(
        CheckpointError, match=f"checkpoint {newest} cannot be resumed from: its file {name} {problem}"
    ):
        load_checkpoint(newest)
    path, notes = resolve_resume("auto", tmp_path)
    assert path.name == "step_000004"
    assert len(notes) == 1 and notes[0].startswith(f"checkpoint {newest} is passed over: its file {name}")
    damage(path, how)
    with pytest.raises(CheckpointError, match="no complete checkpoint in .*step_000008 is passed over"):
        resolve_resume("auto", tmp_path)


def test_a_manifest_lists_every_file_with_its_size(tmp_path):
    folder = save(tmp_path, 1)
    sizes = json.loads((folder / "manifest.json").read_text())
    assert {".metadata", "meta.json"} <= set(sizes) and any(n.endswith(".distcp") for n in sizes)
    assert sizes == {p.name: p.stat().st_size for p in folder.iterdir() if p.name != "manifest.json"}


class Exploit:
    """Unpickling this runs a shell command: what a malicious checkpoint would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_malicious_legacy_meta_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "step_000001"
    folder.mkdir()
    (folder / ".metadata").write_bytes(b"")
    torch.save({"step": 1, "rng": Exploit(marker)}, folder / "meta.pt")
    with pytest.raises(CheckpointError, match="never unpickled"):
        load_checkpoint(folder)
    assert not marker.exists()


def test_a_malicious_dcp_metadata_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    folder = save(tmp_path, 1)
    (folder / ".metadata").write_bytes(pickle.dumps(Exploit(marker)))
    sizes = json.loads((folder / "manifest.json").read_text())
    sizes[".metadata"] = (folder / ".metadata").stat().st_size  # a consistent, hostile folder
    (folder / "manifest.json").write_text(json.dumps(sizes))
    model, optimizer = model_and_optimizer(0)
    with pytest.raises(
        CheckpointError, match=r"(posix|os)\.system is not allowed in a checkpoint's \.metadata"
    ):
        load_model_and_optimizer(folder, model, optimizer)
    assert not marker.exists()


def test_malicious_bytes_in_a_shard_run_no_code(tmp_path):
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

    marker = tmp_path / "pwned"
    payload = io.BytesIO()
    torch.save(Exploit(marker), payload)
    payload.seek(0)
    item = ReadItem(
        LoadItemType.BYTE_IO,
        MetadataIndex("x"),
        torch.Size([0]),
        MetadataIndex("x"),
        torch.Size([0]),
        torch.Size([0]),
    )
    with pytest.raises(pickle.UnpicklingError):
        checkpoint._SafePlanner().load_bytes(item, payload)
    assert not marker.exists()


def test_a_checkpoint_of_the_older_meta_pt_format_still_loads(tmp_path):
    folder = save(tmp_path, 7)
    (folder / "meta.json").unlink()
    (folder / "manifest.json").unlink()
    np.random.seed(5)
    old_rng = {
        "python": __import__("random").getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    torch.save({"step": 7, "rng": old_rng}, folder / "meta.pt")
    meta = load_checkpoint(folder)
    assert meta["step"] == 7
    expected = np.random.rand(3)
    set_rng_state(meta["rng"])
    assert np.array_equal(np.random.rand(3), expected)


def test_rng_round_trip_through_json():
    import random

    state = json.loads(json.dumps(rng_state(), allow_nan=False))
    a, b, c = torch.rand(3), np.random.rand(3), random.random()
    set_rng_state(state)
    assert torch.equal(torch.rand(3), a) and np.array_equal(np.random.rand(3), b) and random.random() == c
