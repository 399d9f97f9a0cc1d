"""The shared machinery of the orthonormal optimizers.

Every matrix update goes through `MatrixOptimizer._matrix_step`: it views each parameter as a
batch of matrices, buckets same-shape matrices together, and hands each bucket to the
algorithm's `_update_bucket`. The bucket is the unit that distributed runs partition.

Replicated matrices (DDP) split a bucket's Newton-Schulz work over the ranks and all-gather
the results. Sharded matrices (FSDP, TP, or both) are DTensors whose ranks each hold one
rectangular block of the full matrix: one all-to-all brings each matrix's blocks to one owner
rank, which orthonormalizes whole matrices, and a second returns the blocks.
"""

import importlib.util
import math
import warnings
from collections import deque
from typing import NamedTuple

import torch
from torch.distributed.tensor import DTensor

from optimizers.base import BaseOptimizer
from optimizers.comm import Communicator
from optimizers.comm_plan import exchange_sizes, replica_assignment, replica_sizes, replicated_share
from optimizers.compiled import run_compiled
from optimizers.newton_schulz import newton_schulz, use_gram
from parallel.process_group import mesh_group
from parallel.sharding import (
    Block,
    block_rows,
    first_matrix,
    is_batch_sharded,
    is_block_sharded,
    local_block,
    local_tensor,
)


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
    """View t as (batch, fan_out, fan_in); an empty shard too."""
    m, n = matrix_shape(t, flatten)
    batch = 1 if flatten or t.ndim == 2 else math.prod(t.shape[:-2])
    return t.reshape(batch, m, n)


def lr_scale(adjust_lr, fan_out, fan_in):
    """The factor on lr for an orthonormal update of a fan_out x fan_in matrix."""
    if adjust_lr == "spectral_norm":
        return math.sqrt(fan_out / fan_in)
    if adjust_lr == "rms_norm":
        return 0.2 * math.sqrt(max(fan_out, fan_in))
    return 1.0


def row_blocks(group, rows):
    """The row blocks (first row, rows) a group's `num_heads` or `split_sizes` cut a matrix of
    `rows` rows into, or None when it cuts none."""
    heads = group.get("num_heads")
    if heads and heads > 1:
        return [(h * (rows // heads), rows // heads) for h in range(heads)]
    sizes = group.get("split_sizes")
    if sizes:
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        return list(zip(starts, sizes, strict=True))
    return None


def run_overlapped(tasks, depth):
    """Run the buckets' update tasks, keeping up to `depth` in flight: a task is a generator
    that yields where it has launched an asynchronous collective, so that while one bucket's
    collective runs, the next bucket computes (its Newton-Schulz), and it waits only when it
    resumes. A task that is None already ran. Each bucket's arithmetic is the serial one, so
    the results are bit-identical. Every rank launches its collectives in one order, the tasks
    being resumed in a fixed rotation, as long as each task yields as often on every rank,
    also where a rank has nothing to send."""
    queue, waiting = deque(task for task in tasks if task is not None), deque()
    while queue or waiting:
        while queue and len(waiting) < depth:
            waiting.append(queue.popleft())
        task = waiting.popleft()
        try:
            next(task)
        except StopIteration:
            continue
        waiting.append(task)


class Slot(NamedTuple):
    """One matrix, or batch of matrices, that an algorithm updates: a whole parameter, or one
    row block of a 2-D one (a head, or a block of `split_sizes`), which is then a matrix of its
    own. Its tensors are views of this rank's local tensors: updating them updates the
    parameter and its state."""

    param: torch.Tensor
    shape: tuple  # (fan_out, fan_in) of its matrices
    weight: torch.Tensor
    grad: torch.Tensor
    state: dict
    blocks: list | None  # every rank's Block of it, when it is sharded over distributed_mesh
    salt: tuple  # () for a whole parameter, (first row,) for a row block
    # Where its matrices start in the parameter's batch when this rank holds only some of
    # them (a batch-sharded parameter), else None: no other rank shares their work.
    first_matrix: int | None = None


def native_bf16(device):
    """Whether `device` multiplies bf16 matrices natively: CUDA, and CPUs with AVX512-BF16 or
    AMX. Elsewhere bf16 is emulated, and slow: on an AVX2-only CPU it made Muon's step 71x
    slower than fp32."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    return any(
        getattr(torch.cpu, probe, lambda: False)()
        for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )


def default_ns_dtype(device):
    """Newton-Schulz's compute dtype when a group sets none: bf16 where the hardware has it."""
    return torch.bfloat16 if native_bf16(device) else torch.float32


def decay_rate(group):
    """The group's weight decay this step: `weight_decay`, times the lr schedule's factor
    (lr / base_lr) with `scheduled_wd` (AdamC's correction), so that the decay lr wd falls
    with the square of the factor rather than with the factor alone."""
    if group.get("scheduled_wd") and group["base_lr"]:
        return group["weight_decay"] * group["lr"] / group["base_lr"]
    return group["weight_decay"]


def cautious_decay(weights, updates, lr, weight_decay):
    """W (1 - lr wd) where U W >= 0, W elsewhere: cautious weight decay, which leaves a weight
    undecayed where the update pushes it away from zero (and decays it plainly where the
    update is zero, as outside Dion2's selected slices)."""
    return weights - weights * (updates * weights >= 0) * (lr * weight_decay)


def apply_update(params, updates, lr, weight_decay, scale, cautious):
    """W <- W (1 - lr wd) - lr scale U on lists of tensors; lr and weight_decay may be 0-d
    tensors. With `cautious`, the decay is `cautious_decay`'s."""
    if cautious:
        for p, u in zip(params, updates, strict=True):
            p.copy_(cautious_decay(p, u, lr, weight_decay))
    else:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_add_(params, torch._foreach_mul(updates, -lr * scale))


def ns_dtype(group, device):
    """The group's Newton-Schulz compute dtype: its `ns_dtype`, else the device's default."""
    return group.get("ns_dtype") or default_ns_dtype(device)


class MatrixOptimizer(BaseOptimizer):
    """Base of Muon, NorMuon, Dion2 and Dion: the class's own algorithm for matrix groups,
    AdamW or Lion for the groups that ask for them."""

    # Whether the replicas average the update's inputs themselves (compressed sync: Dion, Dion2).
    compressed = False

    def __init__(
        self, params, defaults, distributed_mesh=None, use_triton=False, replicate_mesh=None, compile=False
    ):
        if use_triton and importlib.util.find_spec("triton") is None:
            raise ValueError(
                f"{type(self).__name__}: use_triton=True needs the triton package, which is not installed"
            )
        super().__init__(params, defaults)
        for group in self.param_groups:
            # The lr the schedule scales, for scheduled_wd; our training loop sets it itself.
            group.setdefault("base_lr", group["lr"])
        self.use_triton = use_triton
        # How many buckets are in flight at once (1: one after another; see run_overlapped).
        self.overlap = 2
        self._warned_no_kernels = False
        self.compile = compile
        self._scalars = {}
        group = mesh_group(distributed_mesh)
        self.comm = Communicator(group) if group is not None else None
        # The data-parallel replicas of sharded matrices (HSDP's dp): they split the work.
        replicas = mesh_group(replicate_mesh)
        self.replicas = Communicator(replicas) if replicas is not None else None
        for group in self.param_groups:
            if group["algorithm"] != self.algorithm_name():
                continue
            for p in group["params"]:
                if isinstance(p, DTensor) and not self._shards_supported(p, group):
                    raise NotImplementedError(
                        f"{type(self).__name__}: this sharding of a parameter is not supported "
                        f"({p.ndim}-D, placements {p.placements}); sharded matrices must be 2-D blocks "
                        "(Shard(0), Shard(1) or Replicate on each mesh dimension) with a distributed_mesh, "
                        "or batches of matrices split along dim 0 without flatten"
                    )
        sharded = [p for p in self._matrix_params() if isinstance(p, DTensor) and is_block_sharded(p)]
        self.blocks = self._gather_blocks(sharded) if sharded and self.comm is not None else {}

    def _shards_supported(self, p, group):
        """Whether the algorithm handles this DTensor parameter: 2-D blocks exchanged over
        distributed_mesh, or a batch of whole matrices on each rank, unless a subclass has its
        own sharded path."""
        if is_batch_sharded(p):
            return not group.get("flatten")
        return self.comm is not None and is_block_sharded(p)

    def _gather_blocks(self, params):
        """Every rank's Block of each sharded matrix: {p: [Block per rank]}.

        The blocks of the ranks of distributed_mesh must tile each matrix exactly: a matrix
        sharded over other ranks too would otherwise be orthonormalized from a part.
        """
        mine = torch.tensor([local_block(p) for p in params], dtype=torch.int64, device=params[0].device)
        every = self.comm.all_gather_stack(mine.unsqueeze(0), self.comm.world_size).tolist()
        self.comm.take_bytes()  # a one-time exchange, not part of any step's traffic
        blocks = {}
        for i, p in enumerate(params):
            blocks[p] = [Block(*every[s][i]) for s in range(self.comm.world_size)]
            if sum(block.numel for block in blocks[p]) != p.numel():
                raise ValueError(
                    f"a parameter of shape {tuple(p.shape)} (placements {p.placements}) is not tiled by "
                    f"the {self.comm.world_size} ranks of distributed_mesh; pass the mesh that shards it"
                )
        return blocks

    def _matrix_params(self):
        return [p for g in self.param_groups if g["algorithm"] == self.algorithm_name() for p in g["params"]]

    def _communicators(self):
        return [self.comm, self.replicas]

    def comm_bytes(self):
        return sum(c.take_bytes() for c in self._communicators() if c is not None)

    def synchronize_for_checkpoint(self):
        """Average the matrices' momenta over the replicas, which compressed sync lets drift
        apart, so that a checkpoint holds one momentum. A no-op without compressed sync."""
        if not self.compressed:
            return
        for p in self._matrix_params():
            momentum = local_tensor(self.state[p]["momentum"])
            self.replicas.all_reduce_sum(momentum).div_(self.replicas.world_size)

    @classmethod
    def algorithm_name(cls):
        return cls.__name__.lower()

    def _check_group(self, group):
        super()._check_group(group)
        if group["algorithm"] != self.algorithm_name():
            return
        for p in group["params"]:
            matrix_shape(p, group.get("flatten", False))
        self._check_row_blocks(group)

    # Whether the algorithm takes the `num_heads` and `split_sizes` group options.
    splits_rows = True

    def _check_row_blocks(self, group):
        """Raise ValueError on `num_heads` or `split_sizes` options that do not cut every
        matrix of the group into row blocks."""
        heads, sizes = group.get("num_heads"), group.get("split_sizes")
        if heads is None and sizes is None:
            return
        name = type(self).__name__
        if not self.splits_rows:
            raise ValueError(
                f"{name} has no per-head or split update: num_heads and split_sizes are not allowed"
            )
        if heads is not None and sizes is not None:
            raise ValueError("num_heads and split_sizes cannot both be set: heads are equal row blocks")
        if group.get("flatten"):
            raise ValueError("num_heads and split_sizes cut 2-D matrices; they cannot be used with flatten")
        if heads is not None and (isinstance(heads, bool) or not isinstance(heads, int) or heads < 1):
            raise ValueError(f"num_heads must be a positive integer, got {heads!r}")
        if sizes is not None and not (
            isinstance(sizes, list | tuple)
            and len(sizes) >= 2
            and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in sizes)
        ):
            raise ValueError(f"split_sizes must be a list of 2 or more positive integers, got {sizes!r}")
        for p in group["params"]:
            if p.ndim != 2:
                raise ValueError(f"num_heads and split_sizes cut 2-D matrices, got shape {tuple(p.shape)}")
            if heads is not None and p.shape[0] % heads:
                raise ValueError(
                    f"num_heads {heads} does not divide the {p.shape[0]} rows of a {tuple(p.shape)} matrix"
                )
            if sizes is not None and sum(sizes) != p.shape[0]:
                raise ValueError(
                    f"split_sizes {list(sizes)} must add up to the {p.shape[0]} rows of a "
                    f"{tuple(p.shape)} matrix"
                )

    def _slot_state(self, state, rows, local_rows, slices):
        """The views of a parameter's state that belong to one of its row blocks: `rows` are its
        rows of the full matrix, `local_rows` its rows of this rank's local tensors, and
        `slices` the range of the parameter's slice-indexed state that is its own."""
        return {"momentum": local_tensor(state["momentum"])[local_rows]}

    def _block_slices(self, group, p):
        """The ranges of a parameter's slice-indexed state that belong to each of its row blocks."""
        return [slice(r0, r0 + rows) for r0, rows in row_blocks(group, p.shape[0])]

    def _slots(self, group, params):
        """The Slots of a group's parameters: each parameter whole, or its row blocks."""
        flatten = group.get("flatten", False)
        slots = []
        for p in params:
            state, sharded = self.state[p], isinstance(p, DTensor)
            blocks = row_blocks(group, p.shape[0]) if p.ndim == 2 else None
            if blocks is None:
                local_state = {k: local_tensor(v) for k, v in state.items()}
                first = first_matrix(p) if is_batch_sharded(p) else None
                slots.append(
                    Slot(
                        p,
                        matrix_shape(p, flatten),
                        local_tensor(p),
                        local_tensor(p.grad),
                        local_state,
                        self.blocks.get(p),
                        (),
                        first,
                    )
                )
                continue
            every = self.blocks[p] if sharded else [local_block(p)]
            me = self.comm.rank if sharded else 0
            for (r0, rows), slices in zip(blocks, self._block_slices(group, p), strict=True):
                cut = [block_rows(b, r0, rows) for b in every]
                start = cut[me].row0 + r0 - every[me].row0 if cut[me].rows else 0
                local = slice(start, start + cut[me].rows)
                slots.append(
                    Slot(
                        p,
                        (rows, p.shape[1]),
                        local_tensor(p)[local],
                        local_tensor(p.grad)[local],
                        self._slot_state(state, slice(r0, r0 + rows), local, slices),
                        cut if sharded else None,
                        (r0,),
                    )
                )
        return slots

    def _update_bucket(self, group, slots):
        """Update a list of Slots whose matrices all have the same shape: a generator that
        yields where it has launched a collective whose result it needs next (see
        `run_overlapped`), or a plain function that runs at once."""
        raise NotImplementedError

    @classmethod
    def plan_bucket(cls, planner, names, shape):
        raise NotImplementedError(f"{cls.__name__} has no plan_bucket")

    def _begin_step(self, group, params):
        """Per-parameter bookkeeping once per step, before the updates (nothing here)."""

    def _matrix_step(self, group, params):
        self._begin_step(group, params)
        buckets = {}
        for slot in self._slots(group, params):
            kind = (slot.blocks is not None, slot.first_matrix is not None)
            buckets.setdefault((slot.shape, slot.weight.dtype, slot.weight.device, kind), []).append(slot)
        run_overlapped([self._update_bucket(group, bucket) for bucket in buckets.values()], self.overlap)

    def _orthonormalize_blocks(self, group, pieces, blocks, shape):
        """Newton-Schulz of whole matrices spread in blocks over the ranks of distributed_mesh,
        with the work split over the replicas when there are some (see `_exchange_blocks`).

        Replica d takes the matrices whose index is d modulo the replicas, so that even small
        buckets spread over them; an all-gather over the replicas then gives every rank its
        blocks of all results (the replicas hold the same blocks). No matrix is
        orthonormalized twice. The results travel in the compute dtype, which holds them
        exactly, and come back in the pieces' dtype.
        """
        if self.replicas is None or self.replicas.world_size == 1:
            done = yield from self._exchange_blocks(group, pieces, blocks, shape)
            return [d.to(p.dtype) for d, p in zip(done, pieces, strict=True)]
        replicas = self.replicas
        assigned = replica_assignment(len(pieces), replicas.world_size)
        mine = assigned[replicas.rank]
        done = yield from self._exchange_blocks(
            group, [pieces[i] for i in mine], [blocks[i] for i in mine], shape
        )
        sizes, longest = replica_sizes(blocks, assigned, self.comm.rank)
        flat = pieces[0].new_zeros(longest, dtype=ns_dtype(group, pieces[0].device))
        if done:
            flat[: sum(sizes[replicas.rank])] = torch.cat([d.reshape(-1) for d in done])
        pending = replicas.all_gather_stack(flat.unsqueeze(0), replicas.world_size, async_op=True)
        yield
        gathered = pending.wait()
        result = [None] * len(pieces)
        for d, indices in enumerate(assigned):
            parts = gathered[d, : sum(sizes[d])].split(sizes[d])
            for i, part in zip(indices, parts, strict=True):
                result[i] = part.view_as(pieces[i]).to(pieces[i].dtype)
        return result

    def _exchange_blocks(self, group, pieces, blocks, shape):
        """Newton-Schulz of whole matrices spread in blocks over the ranks of distributed_mesh.

        pieces[i] is this rank's block of matrix i, and blocks[i][s] is the Block of rank s
        (every rank knows all blocks). Every matrix has `shape`. Returns this rank's block of
        each result, in the compute dtype.

        Matrix i is owned by rank i % world. One all-to-all brings each owner the blocks of its
        matrices; the owner assembles and orthonormalizes whole matrices; a second all-to-all
        returns every rank its blocks. No matrix is orthonormalized twice, nothing is padded,
        and a rank with empty blocks simply sends and receives nothing for them. Both ways the
        blocks travel in the compute dtype: Newton-Schulz's first step casts its input to it,
        so sending fp32 blocks would move twice the bytes for the same bits.
        """
        comm = self.comm
        world, rank, total = comm.world_size, comm.rank, len(pieces)
        if not total:
            # No exchange, but the same two yields as one: every rank must resume the buckets
            # in one order, or the collectives of different process groups (HSDP's fs and dp)
            # would be launched in different orders on different replicas, and deadlock.
            yield
            yield
            return []
        owned, outgoing, incoming = exchange_sizes(blocks, world, rank)
        mine = owned[rank]
        device = pieces[0].device
        dtype = ns_dtype(group, device)
        pending = comm.exchange(
            [[pieces[i] for i in owned[o]] for o in range(world)],
            incoming,
            dtype,
            device,
            async_op=True,
        )
        yield
        received = pending.wait()
        full = torch.zeros(len(mine), *shape, dtype=dtype, device=device)
        for s, flat in enumerate(received):
            for x, (j, part) in enumerate(
                zip(mine, flat.split([blocks[j][s].numel for j in mine]), strict=True)
            ):
                r0, rows, c0, cols = blocks[j][s]
                full[x, r0 : r0 + rows, c0 : c0 + cols] = part.view(rows, cols)
        ortho = self._newton_schulz(group, full, out_dtype=dtype) if mine else full
        back = comm.exchange(
            [
                [
                    ortho[x, r0 : r0 + rows, c0 : c0 + cols]
                    for x, (r0, rows, c0, cols) in enumerate(blocks[j][s] for j in mine)
                ]
                for s in range(world)
            ],
            outgoing,
            dtype,
            device,
            async_op=True,
        )
        yield
        back = back.wait()
        result = [None] * total
        for o, flat in enumerate(back):
            for i, part in zip(owned[o], flat.split([blocks[i][rank].numel for i in owned[o]]), strict=True):
                result[i] = part.view(blocks[i][rank].rows, blocks[i][rank].cols)
        return result

    def _orthonormalize(self, group, stacked, shared=True):
        """Newton-Schulz of a stack (B, m, n) of same-shape matrices, in the stack's dtype.

        With a process group and `shared` matrices (replicated on every rank), each rank
        orthonormalizes its own contiguous share of the stack, and the shares are all-gathered
        in the compute dtype, so no matrix is orthonormalized twice. Matrices that are this
        rank's alone (a batch-sharded parameter's) are orthonormalized here.
        """
        if self.comm is None or self.comm.world_size == 1 or not shared:
            return self._newton_schulz(group, stacked)
        world, total = self.comm.world_size, stacked.size(0)
        share = replicated_share(total, world)
        mine = stacked[self.comm.rank * share : (self.comm.rank + 1) * share]
        if len(mine) < share:  # the last ranks' shares run short: pad with zero matrices
            mine = torch.cat([mine, mine.new_zeros(share - len(mine), *stacked.shape[1:])])
        dtype = ns_dtype(group, stacked.device)
        ortho = self._newton_schulz(group, mine, out_dtype=dtype)
        pending = self.comm.all_gather_stack(ortho, total, async_op=True)
        yield
        return pending.wait().to(stacked.dtype)

    def _newton_schulz(self, group, x, out_dtype=None):
        """Newton-Schulz in the group's compute dtype, in the Gram form where the group's
        `use_gram_newton_schulz` picks it for x's shape, through the Triton kernels when they
        were asked for and can run on x's device (otherwise PyTorch, with one warning)."""
        dtype = ns_dtype(group, x.device)
        use_triton = False
        if self.use_triton:
            from optimizers.triton_ns import kernels_usable  # lazy: triton is optional

            use_triton = kernels_usable(x.device)
            if not use_triton and not self._warned_no_kernels:
                self._warned_no_kernels = True
                warnings.warn(
                    f"{type(self).__name__}: use_triton=True, but Triton cannot run on {x.device} "
                    "(no CUDA, TRITON_INTERPRET unset): using the PyTorch Newton-Schulz",
                    stacklevel=3,
                )
        polar = group["use_polar_express"]
        gram = use_gram(group["use_gram_newton_schulz"], *x.shape[-2:], dtype, polar)
        if self.compile and not use_triton:  # the kernels run as they are, uncompiled
            out = run_compiled(newton_schulz, x, polar, dtype, out_dtype, False, gram)
        else:
            out = newton_schulz(x, polar, dtype, out_dtype, use_triton, gram)
        if self._orthogonality is not None:
            # Kept, not measured: a read here would make the host wait inside the overlapped
            # collectives. Whether the input is zero is kept too, since a rank whose share is
            # only padding holds zero matrices, with nothing to measure.
            self._orthogonality.setdefault(tuple(x.shape[-2:]), []).append((x[0].any(), out[0].clone()))
        return out

    def _run(self, fn, *args):
        """fn(*args), compiled per input signature when the optimizer compiles."""
        return run_compiled(fn, *args) if self.compile else fn(*args)

    def _hyperparameters(self, group, device, *names):
        """The group's values of `names` (weight_decay as `decay_rate`): 0-d float32 tensors on
        `device` when compiling (so that a scheduled lr does not recompile), plain numbers
        otherwise.

        Each tensor is kept and refilled: a fill is an asynchronous kernel, where a new tensor
        made from a number is a host-to-device copy that waits for the device's queue.
        """
        values = {name: decay_rate(group) if name == "weight_decay" else group[name] for name in names}
        if not self.compile:
            return values
        for name in names:
            key = (id(group), name, device)
            if key not in self._scalars:
                self._scalars[key] = torch.zeros((), dtype=torch.float32, device=device)
            values[name] = self._scalars[key].fill_(values[name])
        return values

    def _apply(self, group, params, updates, scale):
        """W <- W (1 - lr wd) - lr scale U, with cautious decay where the group asks for it."""
        h = self._hyperparameters(group, params[0].device, "lr", "weight_decay")
        cautious = group.get("cautious_wd", False)
        self._run(apply_update, params, updates, h["lr"], h["weight_decay"], scale, cautious)
