"""Atomic, sharded checkpoints of a whole training state, including every RNG, under
runs/<run>/checkpoints/."""

import contextlib
import json
import os
import pickle
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from training.config import KEYS

CHECKPOINT_RE = re.compile(r"^step_(\d+)$")
META = "meta.json"
MANIFEST = "manifest.json"
# Checkpoints written before meta.json: their meta.pt holds NumPy arrays among plain values.
LEGACY_META = "meta.pt"
LEGACY_NUMPY_GLOBALS = (np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)))


# Keys that shape the weights or the optimizer state: a checkpoint only resumes into the same values.
RESUME_KEYS = ("tokenizer", "model_dim", "n_layer", "n_head", "sequence_length", "optimizer", "scalar_opt")


class CheckpointError(ValueError):
    """A checkpoint that is missing or cannot be read."""


def checkpoint_dir(run_dir):
    """Where the checkpoints of a run live."""
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir):
    """The run's checkpoint folders (step_NNNNNN), oldest first; `verify_checkpoint` says
    whether each is still complete."""
    folder = checkpoint_dir(run_dir)
    found = [
        (int(m[1]), p) for p in folder.glob("step_*") if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()
    ]
    return [p for _, p in sorted(found)]


def rng_state():
    """The state of every random number generator a run may draw from, as plain JSON values.

    On CUDA, that is the generator of this process's own device (the current one): a resume
    may see fewer or more GPUs, so no state is tied to another device's index."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": keys.tolist(), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def _bytes(values):
    return values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.uint8)


def set_rng_state(state):
    """Restore what `rng_state()` captured (or a checkpoint of the older meta.pt format)."""
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    numpy = state["numpy"]
    if isinstance(numpy, dict):
        keys = np.array(numpy["keys"], dtype=np.uint32)
        numpy = ("MT19937", keys, numpy["pos"], numpy["has_gauss"], numpy["gauss"])
    np.random.set_state(numpy)
    torch.set_rng_state(_bytes(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if not isinstance(cuda[0], int):
            # Older checkpoints kept every visible GPU's state, as rank 0 saw them; the first
            # is the only one it drew from.
            cuda = cuda[0]
        torch.cuda.set_rng_state(_bytes(cuda))


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
        _write_durably(tmp / META, json.dumps(meta, allow_nan=False))
        # Written last: the size of every other file, so a later truncation or deletion shows.
        sizes = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        _write_durably(tmp / MANIFEST, json.dumps(sizes, indent=0))
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


def _write_durably(path, text):
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def verify_checkpoint(path):
    """Why the checkpoint folder `path` cannot be resumed from, or None when it is complete:
    every file its manifest lists is there, at the size it was written with."""
    path = Path(path)
    if not path.is_dir():
        return "it does not exist"
    if not (path / MANIFEST).is_file():
        if (path / LEGACY_META).is_file() and (path / ".metadata").is_file():
            return None  # written before manifests: nothing to check the files against
        return f"it has no {MANIFEST}, so its save never finished"
    try:
        sizes = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        return f"its {MANIFEST} cannot be read ({e})"
    for name, size in sizes.items():
        file = path / name
        if not file.is_file():
            return f"its file {name} is missing"
        if file.stat().st_size != size:
            return f"its file {name} has {file.stat().st_size} bytes, not the {size} it was written with"
    return None


def load_checkpoint(path):
    """The meta of a checkpoint folder written by `save_checkpoint`, checked for completeness
    before any work; `load_model_and_optimizer` reads the rest once the model is built.

    Nothing is unpickled beyond plain values: the meta is JSON, and a legacy meta.pt is read
    with weights_only=True (plus the NumPy arrays of its RNG state)."""
    path = Path(path)
    problem = verify_checkpoint(path)
    if problem:
        raise CheckpointError(f"checkpoint {path} cannot be resumed from: {problem}")
    try:
        if (path / META).is_file():
            return json.loads((path / META).read_text())
        with torch.serialization.safe_globals(LEGACY_NUMPY_GLOBALS):
            return torch.load(path / LEGACY_META, map_location="cpu", weights_only=True)
    except (OSError, ValueError, pickle.UnpicklingError, RuntimeError) as e:
        raise CheckpointError(
            f"checkpoint {path} cannot be read: {str(e).splitlines()[0]} (it is damaged, or holds objects "
            "other than tensors and plain values, which are never unpickled)"
        ) from None


# What DCP's .metadata may name: its own dataclasses, tensor shapes and dtypes, paths.
SAFE_METADATA_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
SAFE_METADATA_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's .metadata, refusing any global but its own record types."""

    def find_class(self, module, name):
        if (
            module in SAFE_METADATA_MODULES
            or (module, name) in SAFE_METADATA_GLOBALS
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint's .metadata")


class _SafeReader(dcp.FileSystemReader):
    """DCP's file reader, with .metadata read by `_MetadataUnpickler` instead of pickle.load."""

    _metadata = None

    def read_metadata(self, *args, **kwargs):
        # Read once: the caller validates it before dcp.load, which asks again.
        if self._metadata is None:
            with open(Path(self.path) / ".metadata", "rb") as f:
                self._metadata = _MetadataUnpickler(f).load()
            if getattr(self._metadata, "storage_meta", None) is None:
                self._metadata.storage_meta = StorageMeta()
            self._metadata.storage_meta.load_id = self.load_id
        return self._metadata


class _SafePlanner(dcp.DefaultLoadPlanner):
    """DCP's load planner, with its non-tensor values (the optimizer's hyperparameters) read
    with weights_only=True instead of unpickled."""

    def load_bytes(self, read_item, value):
        torch.load(value, weights_only=True)  # raises on anything but tensors and plain values
        value.seek(0)
        super().load_bytes(read_item, value)


def _load(path, state):
    """Fill `state` (a dict of state dicts keyed as saved) from the checkpoint folder `path`."""
    reader = _SafeReader(Path(path))
    try:
        reader.read_metadata()  # a refused .metadata is named here rather than inside DCP's retries
    except (OSError, EOFError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"checkpoint {path} cannot be read: {e}") from None
    try:
        with single_process_quiet():
            dcp.load(state, storage_reader=reader, planner=_SafePlanner(), no_dist=not dist.is_initialized())
    except CheckpointException as e:
        first = next(iter(e.failures.values()), e)
        raise CheckpointError(
            f"checkpoint {path} cannot be read: {getattr(first, 'exception', first)}"
        ) from None


def check_resumes_into(checkpoint, path, cfg):
    """A CheckpointError unless the checkpoint read from `path` ran at the config's RESUME_KEYS."""
    # A checkpoint written before a key existed ran at that key's default.
    saved = {k: checkpoint["config"].get(k, KEYS[k].default) for k in RESUME_KEYS}
    changed = [k for k in RESUME_KEYS if saved[k] != getattr(cfg, k)]
    if changed:
        raise CheckpointError(
            f"checkpoint {path} has a different {changed[0]} ({saved[changed[0]]}, config says "
            f"{getattr(cfg, changed[0])})"
        )


def load_model_and_optimizer(path, model, optimizer):
    """Load a checkpoint's model and optimizer into a model and optimizer of any layout."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    _load(path, state)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def load_model(path, model):
    """Load only a checkpoint's model (no optimizer state is read) into a model of any layout."""
    state = {"model": get_model_state_dict(model)}
    _load(path, state)
    set_model_state_dict(model, state["model"])


def resolve_resume(resume, run_dir):
    """(checkpoint to start from or None for a fresh run, notes to print), checked before any
    work starts.

    resume=None refuses to start over a run folder that already holds checkpoints, so a
    forgotten flag never overwrites a run. "auto" takes the newest complete checkpoint; each
    newer one that is damaged (truncated or missing files) is passed over with a note.
    """
    existing = list_checkpoints(run_dir)
    if resume is None:
        if existing:
            raise CheckpointError(
                f"{run_dir} already holds checkpoints; pass --resume auto to continue that run, "
                "or choose another --run_name"
            )
        return None, []
    if resume == "auto":
        notes = []
        for path in reversed(existing):
            problem = verify_checkpoint(path)
            if problem is None:
                return path, notes
            notes.append(f"checkpoint {path} is passed over: {problem}")
        if existing:
            raise CheckpointError(
                f"no complete checkpoint in {checkpoint_dir(run_dir)}: {notes[0].removeprefix('checkpoint ')}"
            )
        return None, []
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint {path} does not exist (resume takes 'auto' or a checkpoint folder)"
        )
    return path, []
