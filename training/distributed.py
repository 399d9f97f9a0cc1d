"""Process-group setup: one process with no launcher, or one per rank under torchrun."""

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from training.config import ConfigError


@dataclass
class DistContext:
    """Who this process is and which device it computes on."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def group(self):
        """The process group of all ranks, or None in a single process."""
        return dist.group.WORLD if self.world_size > 1 else None


def pick_device(device, local_rank=0):
    """Resolve the `device` key: "auto" is CUDA when present, else the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{local_rank}"
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or mps, got '{device}'") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{device}' was asked for, but CUDA is not available here")
    return resolved


def init_distributed(device):
    """Start the process group when launched by torchrun (NCCL on CUDA, gloo otherwise)."""
    if "RANK" not in os.environ:
        return DistContext(rank=0, world_size=1, device=pick_device(device))
    local_rank = int(os.environ["LOCAL_RANK"])
    resolved = pick_device(device, local_rank)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    dist.init_process_group(backend="nccl" if resolved.type == "cuda" else "gloo")
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), device=resolved)


def mean_over_ranks(value, ctx):
    """Average a 0-d tensor over all ranks (identity in one process)."""
    if ctx.world_size > 1:
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= ctx.world_size
    return value


def leave_process_group():
    """Leave the process groups together: a barrier, then destroy them all.

    Every rank enters the barrier after its own collectives (on any group) have completed, so
    past it no peer has one in flight. A rank that destroyed its groups earlier could close
    connections under a peer's collective."""
    dist.barrier()
    dist.destroy_process_group()


def shutdown(ctx):
    """Tear the process group down cleanly, so no rank aborts at exit."""
    if ctx.world_size > 1:
        leave_process_group()


@contextlib.contextmanager
def process_group(device, agreed_errors=()):
    """The DistContext of this process for the `with` block, torn down cleanly when every rank
    leaves it together: normally, or by an error that all ranks raise alike (`agreed_errors`).

    Any other exception leaves the group alone: the other ranks may be waiting in a
    collective, and a barrier here would wait for them until the timeout."""
    ctx = init_distributed(device)
    try:
        yield ctx
    except agreed_errors:
        shutdown(ctx)
        raise
    shutdown(ctx)


def wrap_model(model, ctx, unsynced=()):
    """Wrap the model for DDP when there is more than one rank and FSDP does not shard it.
    DDP leaves the gradients of the parameters named in `unsynced` alone (compressed sync
    averages them in the optimizer)."""
    if ctx.world_size == 1 or isinstance(model, FSDPModule):
        return model
    DDP = torch.nn.parallel.DistributedDataParallel
    DDP._set_params_and_buffers_to_ignore_for_model(model, list(unsynced))
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DDP(model, device_ids=device_ids)


def grad_sync(model, sync):
    """A context for one micro-batch's backward: gradients are reduced only when `sync`, so
    they sync once per optimizer step rather than once per micro-batch (DDP and FSDP)."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)
    elif not sync and isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()
