"""Atomic, sharded checkpoints of a whole training state, including every RNG, under
runs/<run>/checkpoints/."""

import contextlib
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

CHECKPOINT_RE = re.compile(r"^step_(\d+)$")
META = "meta.pt"


class CheckpointError(ValueError):
    """A checkpoint that is missing or cannot be read."""


def checkpoint_dir(run_dir):
    """Where the checkpoints of a run live."""
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir):
    """The run's complete checkpoints (folders step_NNNNNN), oldest first."""
    folder = checkpoint_dir(run_dir)
    found = [
        (int(m[1]), p) for p in folder.glob("step_*") if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()
    ]
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


@contextlib.contextmanager
def single_process_quiet():
    """Silence DCP's warning that one process without a process group saves alone: that is
    what a single-process run means."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(run_dir, step, model, optimizer, meta, keep):
    """Save a checkpoint as the folder step_{step:06d}; every rank must call it. Then delete
    all but the newest `keep`.

    The model and optimizer go through torch.distributed.checkpoint: each rank writes its own
    shards, keyed by parameter name, and any layout can load them back (DCP reshards).
    `meta` (step, data position, RNG states, config) is written by rank 0. Everything lands
    in a hidden temporary folder that rank 0 renames once complete, so a crash during a save
    leaves the previous checkpoint intact and never a partial one under a real name.
    """
    folder = checkpoint_dir(run_dir)
    final, tmp = folder / f"step_{step:06d}", folder / f".step_{step:06d}.tmp"
    main = not dist.is_initialized() or dist.get_rank() == 0
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    with single_process_quiet():
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.save(state, checkpoint_id=tmp, no_dist=not dist.is_initialized())
    if main:
        with open(tmp / META, "wb") as f:
            torch.save(meta, f)
            f.flush()
            os.fsync(f.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)
    _barrier()
    return final


def load_checkpoint(path):
    """The meta of a checkpoint folder written by `save_checkpoint` (checked before any work);
    `load_model_and_optimizer` reads the rest once the model is built."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not (path / ".metadata").is_file() or not (path / META).is_file():
        raise CheckpointError(f"checkpoint {path} cannot be read: it is not a complete checkpoint folder")
    try:
        # Not weights_only: the meta holds Python and NumPy RNG states. Load only trusted files.
        return torch.load(path / META, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} cannot be read: {e}") from None


def load_model_and_optimizer(path, model, optimizer):
    """Load a checkpoint's model and optimizer into a model and optimizer of any layout."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    with single_process_quiet():
        dcp.load(state, checkpoint_id=Path(path), no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


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
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint {path} does not exist (resume takes 'auto' or a checkpoint folder)"
        )
    return path
