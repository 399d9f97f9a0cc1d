"""Shared fixtures: small shard folders and a helper that runs train.py in-process."""

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist
import yaml

from data.shards import write_shard
from parallel.process_group import leave_process_group

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
# Triton's CPU interpreter, for the kernel tests. It must be on before anything imports triton
# (torch._dynamo does): triton's own helpers, such as tl.cdiv, only run in the interpreter
# when it was on at their definition.
os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO / "data" / "shakespeare"

# A model small enough that a training step takes milliseconds; the data is the real
# embedded Shakespeare, so the loss has something to learn.
TINY = {
    "data_dir": str(SHAKESPEARE),
    "model_dim": 32,
    "n_layer": 1,
    "n_head": 2,
    "sequence_length": 16,
    "batch_size": 8,
    "device_batch_size": 4,
    "optimizer": "adamw",
    "lr": 0.01,
    "num_iterations": 8,
    "val_tokens": 1024,
    "val_loss_every": 4,
    "sample_tokens": 0,
    "device": "cpu",
    "warmdown_ratio": 0.25,
}


def make_shards(folder, prefix, sizes, seed=0):
    """Write a val shard and train shards of the given token counts; return the token arrays."""
    rng = np.random.default_rng(seed)
    tokens = {}
    for i, size in enumerate(sizes):
        split = "val" if i == 0 else "train"
        tokens[i] = rng.integers(0, 50257, size=size, dtype=np.int64)
        write_shard(Path(folder) / f"{prefix}_{split}_{i:06d}.bin", tokens[i])
    return tokens


def cuda_only_bf16(device):
    """The tests' `native_bf16`: Newton-Schulz defaults to fp32 on every CPU, so that fp32's
    tolerances hold on a CPU with native bf16 too (which would otherwise default to bf16)."""
    return device.type == "cuda"


@pytest.fixture(autouse=True)
def _fp32_newton_schulz(monkeypatch):
    import optimizers.matrix_optimizer as matrix_optimizer

    monkeypatch.setattr(matrix_optimizer, "native_bf16", cuda_only_bf16)


def train_argv(runs_dir, run_name, **overrides):
    """The argv for a tiny in-process run under `runs_dir`, with Newton-Schulz in fp32 (the
    processes torchrun starts run with it too)."""
    from optimizers.registry import reads

    values = {**TINY, "runs_dir": str(runs_dir), "run_name": run_name, **overrides}
    if reads(values["optimizer"], "ns_dtype"):
        values.setdefault("ns_dtype", "fp32")
    return [item for k, v in values.items() for item in (f"--{k}", str(v))]


def run_train(runs_dir, run_name, **overrides):
    """Run train.main in this process and return the run's metric records."""
    import train
    from training.metrics import read_metrics

    train.main(train_argv(runs_dir, run_name, **overrides))
    return read_metrics(Path(runs_dir) / run_name)


@pytest.fixture
def python():
    """The interpreter running the tests, for subprocesses."""
    return sys.executable


def torchrun_command(nproc, argv):
    """The command that runs train.py on `nproc` gloo ranks."""
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return [*run, "train.py", *argv]


TORCHRUN_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(nproc, argv):
    """Run train.py on `nproc` gloo ranks; return the completed process."""
    return subprocess.run(
        torchrun_command(nproc, argv), cwd=REPO, capture_output=True, text=True, timeout=120, env=TORCHRUN_ENV
    )


@contextlib.contextmanager
def gloo(rank, world_size, init_file):
    """A gloo process group for one spawned worker. On success the ranks leave it together
    (a barrier, then destroy), so none closes its connections under a peer's collective.
    Whatever holds the group (a DDP model, an optimizer's communicators) must be freed inside
    the block, in a function it calls: freed after, it would destroy the group at the worker's
    exit, under the GIL that gloo's thread needs, and hang."""
    import optimizers.matrix_optimizer as matrix_optimizer

    matrix_optimizer.native_bf16 = cuda_only_bf16  # a spawned worker does not inherit the fixture's
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        yield
    except BaseException:
        dist.destroy_process_group()  # the peers fail too; mp.spawn reports this rank's error
        raise
    leave_process_group()


def fake_run(folder, name, records, **config):
    """A run folder with a config and metrics, as train.py writes them."""
    run = folder / name
    run.mkdir(parents=True)
    values = {"run_name": name, "optimizer": "dion2", "ortho_fraction": 0.5, "selection": "l1", "seed": 0}
    (run / "config.yaml").write_text(yaml.safe_dump({**values, **config}, sort_keys=False))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run
