"""How a parameter is split over ranks: the local tensor of a DTensor, the rectangular block
of the full matrix that each rank holds, and norms of whole tensors from their pieces."""

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor import zeros as distributed_zeros
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset


class Block(NamedTuple):
    """The rectangle of a matrix that one rank holds: rows [row0, row0 + rows) and columns
    [col0, col0 + cols)."""

    row0: int
    rows: int
    col0: int
    cols: int

    @property
    def numel(self):
        """The number of elements in the block."""
        return self.rows * self.cols

    def transposed(self):
        """The same block of the transposed matrix."""
        return Block(self.col0, self.cols, self.row0, self.rows)


def block_rows(block, first, rows):
    """The part of `block` in rows [first, first + rows) of its matrix, in the coordinates of
    those rows (an empty block, at row 0, when they do not meet)."""
    lo, hi = max(first, block.row0), min(first + rows, block.row0 + block.rows)
    if hi <= lo:
        return Block(0, 0, block.col0, block.cols)
    return Block(lo - first, hi - lo, block.col0, block.cols)


def local_tensor(t):
    """The tensor this rank holds: a DTensor's local shard, a plain tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def distinct_shards(t):
    """Into how many distinct pieces t is split (1 for a plain or replicated tensor)."""
    if not isinstance(t, DTensor):
        return 1
    return math.prod(t.device_mesh.size(i) for i, pl in enumerate(t.placements) if pl.is_shard())


def global_squared_norms(tensors, placed_like=None):
    """The squared l2 norm of each tensor, whole over all ranks, the same on every rank: a 1-D
    fp32 tensor. Every rank sums the squares of its local pieces, each weighted by (distinct
    pieces / world size) so that copies held by several ranks count once, and one all-reduce
    over all ranks adds them up; tensors may live on different meshes. `placed_like[i]`, when
    given, is the DTensor (or plain tensor) split as tensors[i], which may be a local piece."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    norms = torch._foreach_norm([local_tensor(t) for t in tensors], dtype=torch.float32)
    # The weights multiply as Python numbers: a tensor of them would be a host-to-device copy,
    # which waits for the device's queue, every step.
    weights = [distinct_shards(t) / world for t in (tensors if placed_like is None else placed_like)]
    squares = torch.stack(torch._foreach_mul(torch._foreach_mul(norms, norms), weights))
    if world > 1:
        dist.all_reduce(squares)
    return squares


def is_block_sharded(p):
    """Whether p is a matrix whose ranks each hold one rectangular block (Shard(0), Shard(1) or
    Replicate on every mesh dimension; no strided shards)."""
    return p.ndim == 2 and all(pl in (Shard(0), Shard(1), Replicate()) for pl in p.placements)


def is_batch_sharded(p):
    """Whether p is a batch of matrices (E, m, n) whose ranks each hold whole matrices: split
    only along dim 0 (FSDP's Shard(0) of MoE experts), or replicated."""
    return (
        isinstance(p, DTensor)
        and p.ndim == 3
        and all(pl in (Shard(0), Replicate()) for pl in p.placements)
        and any(pl.is_shard() for pl in p.placements)
    )


def first_matrix(p):
    """The index, in the whole batch, of the first matrix of a batch-sharded p's local shard."""
    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return offset[0]


def per_matrix_zeros(p, batch, width, dtype=torch.float32):
    """Zeros (batch, width): a row of state for each of p's `batch` matrices, on p's device.
    For a batch-sharded p, a DTensor split like p, so that each rank keeps its own matrices'
    rows and a checkpoint holds every rank's."""
    if is_batch_sharded(p):
        return distributed_zeros(
            batch, width, dtype=dtype, device_mesh=p.device_mesh, placements=p.placements
        )
    return torch.zeros(batch, width, dtype=dtype, device=p.device)


def local_block(p):
    """The Block of the full matrix that a DTensor's local shard holds; all of a plain matrix."""
    if not isinstance(p, DTensor):
        return Block(0, p.shape[-2], 0, p.shape[-1])
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return Block(offset[0], shape[0], offset[1], shape[1])
