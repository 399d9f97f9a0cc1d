"""Process groups: this process's rank and device (one process with no launcher, or one per
rank under torchrun), leaving the groups together, and the group of a mesh."""

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh


class DeviceError(ValueError):
    """A device that this machine or this rank cannot compute on."""


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


def pick_device(device, local_rank=None):
    """Resolve the `device` key: "auto" is CUDA when present, else the CPU.

    Under torchrun (`local_rank` given) a CUDA rank computes on GPU LOCAL_RANK of its node:
    "cuda" and "auto" become cuda:LOCAL_RANK, and an explicit cuda:N that names another GPU is
    refused, since ranks sharing a GPU stop NCCL ("Duplicate GPU detected"). A single process
    takes cuda:0 for "cuda".
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise DeviceError(f"device must be auto, cpu, cuda, cuda:N or mps, got '{device}'") from None
    if resolved.type != "cuda":
        return resolved
    if not torch.cuda.is_available():
        raise DeviceError(f"device '{device}' was asked for, but CUDA is not available here")
    if local_rank is not None and resolved.index not in (None, local_rank):
        raise DeviceError(
            f"device '{device}' contradicts LOCAL_RANK {local_rank}: under torchrun each rank computes "
            "on cuda:LOCAL_RANK; pass --device cuda or auto"
        )
    index = local_rank if local_rank is not None else resolved.index or 0
    visible = torch.cuda.device_count()
    if index >= visible:
        raise DeviceError(
            f"device cuda:{index} was asked for (device '{device}', LOCAL_RANK {local_rank}), but this "
            f"process sees {visible} CUDA device(s): cuda:0 to cuda:{visible - 1}"
        )
    return torch.device("cuda", index)


def init_distributed(device, timeout):
    """Start the process group when launched by torchrun (NCCL on CUDA, gloo otherwise), whose
    collectives fail after `timeout` seconds without every rank.

    A CUDA process makes its device the current one, so that work which follows the current
    device (Triton's launches, NCCL's communicators, torch.cuda calls without a device) runs on
    the device its tensors live on. It also binds the group to that device (`device_id`): NCCL
    then connects at once, barriers name the device instead of guessing it from the rank, and
    the sub-meshes' groups split the world's communicator instead of making new ones."""
    launched = "RANK" in os.environ
    resolved = pick_device(device, int(os.environ["LOCAL_RANK"]) if launched else None)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    if not launched:
        return DistContext(rank=0, world_size=1, device=resolved)
    dist.init_process_group(
        backend="nccl" if resolved.type == "cuda" else "gloo",
        timeout=datetime.timedelta(seconds=timeout),
        device_id=resolved if resolved.type == "cuda" else None,
    )
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
def process_group(device, timeout, agreed_errors=()):
    """The DistContext of this process for the `with` block, torn down cleanly when every rank
    leaves it together: normally, or by an error that all ranks raise alike (`agreed_errors`).

    Any other exception leaves the group alone: the other ranks may be waiting in a
    collective, and a barrier here would wait for them until the timeout."""
    ctx = init_distributed(device, timeout)
    try:
        yield ctx
    except agreed_errors:
        shutdown(ctx)
        raise
    shutdown(ctx)


def mesh_group(mesh):
    """The ProcessGroup of a 1-D DeviceMesh, or a ProcessGroup itself (None stays None, and so
    does anything in a process with no process group)."""
    if mesh is None or not dist.is_initialized():
        return None
    if isinstance(mesh, DeviceMesh):
        if mesh.ndim != 1:
            raise ValueError(f"distributed_mesh must be 1-D, got a {mesh.ndim}-D mesh")
        return mesh.get_group()
    return mesh
