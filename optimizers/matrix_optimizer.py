"""The shared machinery of the orthonormal optimizers.

Every matrix update goes through `MatrixOptimizer._matrix_step`: it views each parameter as a
batch of matrices, buckets same-shape matrices together, and hands each bucket to the
algorithm's `_update_bucket`. The bucket is the unit that distributed runs partition.
"""

import math

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard

from optimizers.comm import Communicator, process_group
from optimizers.newton_schulz import newton_schulz
from optimizers.scalar import ScalarOptimizer

ADJUST_LR = ("spectral_norm", "rms_norm", None)


def matrix_shape(p, flatten):
    """(fan_out, fan_in) of the matrices a parameter stands for.

    With `flatten`, a tensor of 3 or more dimensions is one matrix (dim 0 x the rest);
    without it, its leading dimensions are a batch of independent matrices (MoE experts).
    """
    if p.ndim < 2:
        raise ValueError(
            f"a matrix algorithm needs tensors of 2 or more dimensions, got shape {tuple(p.shape)}"
        )
    if flatten and p.ndim > 2:
        return p.shape[0], math.prod(p.shape[1:])
    return p.shape[-2], p.shape[-1]


def as_matrices(t, flatten):
    """View t as (batch, fan_out, fan_in)."""
    return t.reshape(-1, *matrix_shape(t, flatten))


def lr_scale(adjust_lr, fan_out, fan_in):
    """The factor on lr for an orthonormal update of a fan_out x fan_in matrix."""
    if adjust_lr == "spectral_norm":
        return math.sqrt(fan_out / fan_in)
    if adjust_lr == "rms_norm":
        return 0.2 * math.sqrt(max(fan_out, fan_in))
    return 1.0


def default_ns_dtype(device):
    """bf16 on CUDA; fp32 elsewhere (on this project's CPUs bf16 made Muon's step 71x slower)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class MatrixOptimizer(ScalarOptimizer):
    """Base of Muon, NorMuon, Dion2 and Dion: the class's own algorithm for matrix groups,
    AdamW or Lion for the groups that ask for them."""

    def __init__(self, params, defaults, distributed_mesh=None, use_triton=False):
        if use_triton:
            raise NotImplementedError(f"{type(self).__name__}: use_triton=True has no kernels yet")
        super().__init__(params, defaults)
        group = process_group(distributed_mesh)
        self.comm = Communicator(group) if group is not None else None
        for p in self._matrix_params():
            if isinstance(p, DTensor) and not self._shards_supported(p):
                raise NotImplementedError(
                    f"{type(self).__name__}: this sharding of a parameter is not supported yet "
                    f"({p.ndim}-D, placements {p.placements})"
                )

    def _shards_supported(self, p):
        """Whether the algorithm handles this DTensor parameter (none by default)."""
        return False

    def _row_sharded(self, p):
        """Whether p is a matrix sharded by rows over distributed_mesh, as FSDP shards it."""
        placements = p.placements
        return (
            p.ndim == 2
            and self.comm is not None
            and sum(pl == Shard(0) for pl in placements) == 1
            and all(pl == Shard(0) or pl == Replicate() for pl in placements)
            and p.device_mesh.size(placements.index(Shard(0))) == self.comm.world_size
        )

    def _matrix_params(self):
        return [p for g in self.param_groups if g["algorithm"] == self.algorithm_name() for p in g["params"]]

    def comm_bytes(self):
        return self.comm.take_bytes() if self.comm is not None else 0

    @classmethod
    def algorithm_name(cls):
        return cls.__name__.lower()

    def _check_group(self, group):
        super()._check_group(group)
        if group["algorithm"] != self.algorithm_name():
            return
        if "adjust_lr" in group and group["adjust_lr"] not in ADJUST_LR:
            raise ValueError(
                f"unknown adjust_lr '{group['adjust_lr']}'; allowed: spectral_norm, rms_norm, None"
            )
        for p in group["params"]:
            matrix_shape(p, group.get("flatten", False))
        self._check_matrix_group(group)

    def _check_matrix_group(self, group):
        """Raise ValueError on a hyperparameter of the matrix algorithm that is out of range."""

    def _update_bucket(self, group, params):
        """Update a list of parameters whose matrices all have the same shape."""
        raise NotImplementedError

    def _matrix_step(self, group, params):
        flatten = group.get("flatten", False)
        buckets = {}
        for p in params:
            buckets.setdefault((matrix_shape(p, flatten), p.dtype, p.device), []).append(p)
        for bucket in buckets.values():
            self._update_bucket(group, bucket)

    def fsdp_rows(self, m):
        """The rows of an m-row matrix that each rank holds under FSDP: chunks of ceil(m / world)."""
        world = self.comm.world_size
        chunk = math.ceil(m / world)
        return [max(0, min(chunk, m - s * chunk)) for s in range(world)]

    def _orthonormalize_row_shards(self, group, shards, counts):
        """Newton-Schulz of whole matrices whose rows are spread over the ranks of
        distributed_mesh. shards[i] holds this rank's rows of matrix i, and counts[i][s] is how
        many rows of matrix i rank s holds (every rank knows all counts). Every matrix has the
        same total rows and width. Returns this rank's rows of each result.

        Matrix i is owned by rank i % world. One all-to-all brings each owner the rows of its
        matrices, in rank order; the owner orthonormalizes whole matrices; a second all-to-all
        returns every rank its rows. No matrix is orthonormalized twice.
        """
        comm = self.comm
        world, rank, total = comm.world_size, comm.rank, len(shards)
        n, height = shards[0].size(-1), sum(counts[0])
        owned = [list(range(o, total, world)) for o in range(world)]
        mine = owned[rank]
        dtype = group.get("ns_dtype") or default_ns_dtype(shards[0].device)
        device, out_dtype = shards[0].device, shards[0].dtype
        pieces = comm.exchange(
            [[shards[i] for i in owned[o]] for o in range(world)],
            [sum(counts[j][s] for j in mine) * n for s in range(world)],
            out_dtype,
            device,
        )
        parts = [piece.split([counts[j][s] * n for j in mine]) for s, piece in enumerate(pieces)]
        full = (
            torch.stack(
                [
                    torch.cat([parts[s][x].view(counts[j][s], n) for s in range(world)])
                    for x, j in enumerate(mine)
                ]
            )
            if mine
            else shards[0].new_empty(0, height, n)
        )
        ortho = newton_schulz(full, group["use_polar_express"], dtype, out_dtype=dtype) if mine else full
        starts = [[sum(counts[j][:s]) for s in range(world)] for j in mine]
        back = comm.exchange(
            [
                [ortho[x, starts[x][s] : starts[x][s] + counts[j][s]] for x, j in enumerate(mine)]
                for s in range(world)
            ],
            [sum(counts[i][rank] for i in owned[o]) * n for o in range(world)],
            dtype,
            device,
        )
        result = [None] * total
        for o, piece in enumerate(back):
            for i, block in zip(owned[o], piece.split([counts[i][rank] * n for i in owned[o]]), strict=True):
                result[i] = block.view(counts[i][rank], n).to(out_dtype)
        return result

    def _orthonormalize(self, group, stacked):
        """Newton-Schulz of a stack (B, m, n) of same-shape matrices, in the stack's dtype.

        With a process group, the matrices are replicated on every rank: each rank
        orthonormalizes its own contiguous share of the stack, and the shares are all-gathered
        in the compute dtype, so no matrix is orthonormalized twice.
        """
        dtype = group.get("ns_dtype") or default_ns_dtype(stacked.device)
        polar_express = group["use_polar_express"]
        if self.comm is None or self.comm.world_size == 1:
            return newton_schulz(stacked, polar_express, dtype)
        world, total = self.comm.world_size, stacked.size(0)
        share = math.ceil(total / world)
        mine = stacked[self.comm.rank * share : (self.comm.rank + 1) * share]
        if len(mine) < share:  # the last ranks' shares run short: pad with zero matrices
            mine = torch.cat([mine, mine.new_zeros(share - len(mine), *stacked.shape[1:])])
        ortho = newton_schulz(mine, polar_express, dtype, out_dtype=dtype)
        return self.comm.all_gather_stack(ortho, total).to(stacked.dtype)

    @staticmethod
    def _apply(group, params, updates, scale):
        """W <- W (1 - lr wd) - lr scale U, with cautious decay where the group asks for it."""
        lr, wd = group["lr"], group["weight_decay"]
        if group.get("cautious_wd", False):
            for p, u in zip(params, updates, strict=True):
                # Decay only where the update also pulls the weight towards zero.
                p.sub_(p * (u * p > 0), alpha=lr * wd)
        else:
            torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_add_(params, updates, alpha=-lr * scale)
