"""Atomic checkpoints of a whole training state, including every RNG, under runs/<run>/checkpoints/."""

import os
import random
import re
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

CHECKPOINT_RE = re.compile(r"^step_(\d+)\.pt$")


class CheckpointError(ValueError):
    """A checkpoint that is missing or cannot be read."""


def checkpoint_dir(run_dir):
    """Where the checkpoints of a run live."""
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir):
    """The run's checkpoints, oldest first."""
    folder = checkpoint_dir(run_dir)
    found = [(int(m[1]), p) for p in folder.glob("step_*.pt") if (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def rng_state():
    """The state of every random number generator a run may draw from."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore what `rng_state()` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def full_state(model, optimizer):
    """(model, optimizer) state dicts with full, unsharded tensors on the CPU, keyed by
    parameter name: what any layout can load. Every rank must call it; rank 0 gets the dicts."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(
        model, optimizer, options=options
    )


def load_full_state(model, optimizer, model_state, optimizer_state):
    """Load what `full_state` produced into a model and optimizer of any layout."""
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


def save_checkpoint(run_dir, step, state, keep):
    """Write `state` as step_{step}.pt atomically, then delete all but the newest `keep`.

    The file is written under a temporary name, synced, then renamed, so a crash during the
    save leaves the previous checkpoint intact and never a partial file under a real name.
    """
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:06d}.pt"
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink()
    return path


def load_checkpoint(path):
    """Read a checkpoint written by `save_checkpoint`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        # Not weights_only: the state holds Python and NumPy RNG states. Load only trusted files.
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} cannot be read: {e}") from None


def resolve_resume(resume, run_dir):
    """The checkpoint to start from (None for a fresh run), checked before any work starts.

    resume=None refuses to start over a run folder that already holds checkpoints, so a
    forgotten flag never overwrites a run; "auto" takes the newest checkpoint if there is one.
    """
    existing = list_checkpoints(run_dir)
    if resume is None:
        if existing:
            raise CheckpointError(
                f"{run_dir} already holds checkpoints; pass --resume auto to continue that run, "
                "or choose another --run_name"
            )
        return None
    if resume == "auto":
        return existing[-1] if existing else None
    path = Path(resume)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (resume takes 'auto' or a checkpoint path)")
    return path
