"""Dion2 (Ahn, Amsel, Langford, 2025), Algorithm 1: orthonormalize only a selected fraction of
the momentum's rows (or columns, along the shorter side), and decay only those.

One step runs the same stages on replicated and on sharded matrices; only where the data
comes from differs. Everything works on slice-major views (batch, slices, other) of this
rank's tensors: a replicated matrix is all of itself, a sharded one is this rank's block.

1. accumulate: M <- M + G, and each local slice's l1 norm;
2. select: the chosen slices of the whole matrix (l1 norms of split slices are summed over
   distributed_mesh first), and which of them this rank holds;
3. exchange: gather the chosen slices and orthonormalize them, split over the ranks when
   replicated, or assembled from every rank's blocks when sharded;
4. decay and apply: M[K] <- mu M[K]; W <- W (1 - lr wd); W[K] <- W[K] - lr s O.
"""

import math

import torch
from torch.distributed.tensor import DTensor

from optimizers.hyperparameters import check_compressed_sync
from optimizers.matrix_optimizer import MatrixOptimizer, as_matrices, cautious_decay, lr_scale, row_blocks
from parallel.sharding import Block, per_matrix_zeros


def num_selected(fraction, slices):
    """k = ceil(fraction * slices)."""
    return math.ceil(fraction * slices)


def slice_view(t, flatten, rows):
    """t as (batch, slices, other): its matrices, transposed when the slices are columns."""
    matrices = as_matrices(t, flatten)
    return matrices if rows else matrices.mT


def take_slices(slices, index):
    """slices[b, index[b]] for each b: (batch, k, other). A single matrix, the usual case, takes
    them with index_select, several times faster on the CPU than a gather by an expanded index."""
    if len(slices) == 1:
        return slices[0].index_select(0, index[0]).unsqueeze(0)
    return slices.gather(1, index.unsqueeze(-1).expand(-1, -1, slices.size(-1)))


def put_slices(slices, index, values):
    """slices[b, index[b]] = values[b], in place."""
    if len(slices) == 1:
        slices[0].index_copy_(0, index[0], values[0])
    else:
        slices.scatter_(1, index.unsqueeze(-1).expand_as(values), values)


def add_slices(slices, index, values):
    """slices[b, index[b]] += values[b], in place."""
    if len(slices) == 1:
        slices[0].index_add_(0, index[0], values[0])
    else:
        slices.scatter_add_(1, index.unsqueeze(-1).expand_as(values), values)


def to_device(tensors, device):
    """Host tensors on `device`. On CUDA they travel in one copy from pinned memory that the
    host does not wait for: a copy from pageable memory would wait for the device's queue."""
    if device.type != "cuda":
        return [t.to(device) for t in tensors]
    flat = torch.cat([t.reshape(-1) for t in tensors]).pin_memory().to(device, non_blocking=True)
    return [
        part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors, strict=True)
    ]


def accumulate(momenta, grads, flatten, rows, l1):
    """M <- M + G for each tensor; with `l1`, returns each slice's l1 norm (batch, slices)."""
    torch._foreach_add_(momenta, grads)
    if not l1:
        return None
    # abs().sum() rather than an ord-1 vector_norm: on the CPU 2x faster on rows and 8x on
    # the strided columns of a tall matrix.
    return [slice_view(m, flatten, rows).abs().sum(-1) for m in momenta]


def gather_slices(momenta, indices, flatten, rows):
    """The slices at `indices` (batch, k) of each momentum: a list of (batch, k, other)."""
    return [
        take_slices(slice_view(m, flatten, rows), index) for m, index in zip(momenta, indices, strict=True)
    ]


def decay_and_apply(
    params,
    momenta,
    indices,
    selected,
    ortho,
    mu,
    lr,
    weight_decay,
    scale,
    full_decay,
    cautious,
    flatten,
    rows,
):
    """M[K] <- mu M[K] (all of M with `full_decay`); W <- W (1 - lr wd); W[K] <- W[K] - lr
    scale O, with K, M[K] and O per tensor; mu, lr and weight_decay may be 0-d tensors. With
    `cautious`, W[K] takes `cautious_decay`'s decay instead (the rest of W, whose update is
    zero, the plain one)."""
    if full_decay:
        torch._foreach_mul_(momenta, mu)
    else:
        for momentum, index, values in zip(momenta, indices, selected, strict=True):
            put_slices(slice_view(momentum, flatten, rows), index, values * mu)
    views = [slice_view(p, flatten, rows) for p in params]
    if cautious:
        kept = [take_slices(view, index) for view, index in zip(views, indices, strict=True)]
    torch._foreach_mul_(params, 1 - lr * weight_decay)
    for x, (view, index, update) in enumerate(zip(views, indices, ortho, strict=True)):
        if cautious:
            put_slices(view, index, cautious_decay(kept[x], update, lr, weight_decay) - update * (lr * scale))
        else:
            add_slices(view, index, update * (-lr * scale))


def slice_ranges(span):
    """The distinct, non-empty slice ranges (start, count) of a matrix's rank blocks, in order."""
    return sorted({(b.row0, b.rows) for b in span if b.rows})


def selected_runs_local(fraction, spans):
    """Where each rank's slices sit in each matrix's sorted selection, [(first, count) per rank]
    per matrix, when every slice range selects ceil(fraction x its slices) on its own: known
    from the ranges alone, without looking at the selection."""
    runs = []
    for span in spans:
        runs_of_ranges, first = {}, 0
        for a, la in slice_ranges(span):
            runs_of_ranges[(a, la)] = (first, num_selected(fraction, la))
            first += runs_of_ranges[(a, la)][1]
        runs.append([runs_of_ranges[(b.row0, b.rows)] if b.rows else (0, 0) for b in span])
    return runs


def selected_runs_global(chosen, spans):
    """As `selected_runs_local`, for selections of the whole matrix: how many of the chosen
    slices fall in each rank's range depends on the norms, so the counts of every matrix are
    found on the device and read back in one transfer."""
    # The chosen slices come to the host, the bounds are the host's own: one wait for the device.
    bounds = torch.tensor([[[b.row0, b.row0 + b.rows] for b in span] for span in spans]).flatten(1)
    ends = torch.searchsorted(torch.cat(chosen).cpu(), bounds).view(len(spans), -1, 2).tolist()
    return [[(lo, hi - lo) for lo, hi in matrix] for matrix in ends]


class Dion2(MatrixOptimizer):
    """M <- M + G; K = the top-k slices by l1 norm (or k random ones); O = NS(M[K]);
    M[K] <- ef_decay M[K]; W <- W (1 - lr wd); W[K] <- W[K] - lr s O.

    `decay="full"` decays all of M instead (the paper's ablation). Random selection draws
    from (seed, parameter index, step), so every replica and every resume draws the same rows.

    Sharded matrices (FSDP, TP, or both): with selection_scope "local", each distinct slice
    range (one shard of the slices) selects ceil(fraction x its slices) on its own; "global"
    selects the top k of the whole matrix. Only the selected slices travel.

    Compressed data-parallel sync (paper Section 3.2): with random selection, a
    `replicate_mesh` and `replicate_mesh_grad_sync`, the replicas skip the matrices' gradient
    all-reduce and average only the selected slices M[K] before orthonormalizing. Each
    replica's momentum drifts apart elsewhere, but their mean stays the momentum of the
    synchronized run, so every replica applies the same update.
    """

    # The param-group key of the error-feedback decay.
    ef_decay_key = "ef_decay"

    def __init__(
        self,
        params,
        distributed_mesh=None,
        lr=0.01,
        fraction=0.25,
        ef_decay=0.95,
        betas=(0.9, 0.95),
        weight_decay=0.01,
        epsilon=1e-8,
        adjust_lr="spectral_norm",
        flatten=False,
        use_triton=False,
        use_polar_express=True,
        use_gram_newton_schulz="auto",
        cautious_wd=False,
        scheduled_wd=False,
        match_muon_rms=False,
        selection_scope="local",
        selection="l1",
        decay="selective",
        seed=0,
        ns_dtype=None,
        replicate_mesh=None,
        replicate_mesh_grad_sync=True,
        compile=False,
        **extra_defaults,
    ):
        defaults = {
            "lr": lr,
            "fraction": fraction,
            self.ef_decay_key: ef_decay,
            "betas": betas,
            "weight_decay": weight_decay,
            "epsilon": epsilon,
            "adjust_lr": adjust_lr,
            "flatten": flatten,
            "use_polar_express": use_polar_express,
            "use_gram_newton_schulz": use_gram_newton_schulz,
            "cautious_wd": cautious_wd,
            "scheduled_wd": scheduled_wd,
            "match_muon_rms": match_muon_rms,
            "selection_scope": selection_scope,
            "selection": selection,
            "decay": decay,
            "seed": seed,
            "ns_dtype": ns_dtype,
            **extra_defaults,
        }
        super().__init__(params, defaults, distributed_mesh, use_triton, replicate_mesh, compile)
        if self.replicas is not None and replicate_mesh_grad_sync:
            for group in self.param_groups:
                if group["algorithm"] == self.algorithm_name():
                    check_compressed_sync(group["selection"])
            self.compressed = True

    @staticmethod
    def selects_rows(m, n):
        """Whether the slices of an m x n matrix are its rows: the shorter side."""
        return m <= n

    def _block_slices(self, group, p):
        # Each row block's slices, one after another: its rows, or its columns when tall.
        ranges, first = [], 0
        for _, rows in row_blocks(group, p.shape[0]):
            count = rows if self.selects_rows(rows, p.shape[1]) else p.shape[1]
            ranges.append(slice(first, first + count))
            first += count
        return ranges

    def _slot_state(self, state, rows, local_rows, slices):
        return {
            **super()._slot_state(state, rows, local_rows, slices),
            "step": state["step"],
            "last_selected": state["last_selected"][:, slices],
            "longest_wait": state["longest_wait"],
        }

    def _new_matrix_state(self, p, group):
        batch, m, n = as_matrices(p, group["flatten"]).shape
        blocks = row_blocks(group, m) if p.ndim == 2 else None
        if blocks is None:
            slices = m if self.selects_rows(m, n) else n
        else:
            slices = self._block_slices(group, p)[-1].stop
        return {
            "momentum": torch.zeros_like(p),
            "step": torch.zeros((), dtype=torch.int64),
            # The step at which each slice was last selected (0: never), and the longest wait.
            "last_selected": per_matrix_zeros(p, batch, slices, torch.int64),
            "longest_wait": torch.zeros((), dtype=torch.int64, device=p.device),
        }

    @classmethod
    def _matrix_state_bytes(cls, shape, local_numel, dtype, arguments):
        slices = shape[0] if cls.selects_rows(*shape) else shape[1]
        # the momentum's block; each slice's last selection, the step and the longest wait (int64)
        return local_numel * dtype.itemsize + slices * 8 + 16

    @classmethod
    def plan_bucket(cls, planner, names, shape):
        m, n = shape
        rows = cls.selects_rows(m, n)
        slices, other = (m, n) if rows else (n, m)
        fraction = planner.arguments["fraction"]
        traffic = planner.traffic
        if not planner.layout.sharded:
            k = num_selected(fraction, slices)
            if planner.compressed:
                traffic.all_reduce(len(planner.replicas), len(names) * k * other, planner.param_bytes, "dp")
            planner.orthonormalize(len(names), k, other)
            return
        spans = [[b if rows else b.transposed() for b in planner.blocks(name, shape)] for name in names]
        if planner.arguments["selection"] == "l1":
            traffic.all_reduce(planner.world, len(names) * slices, 4, "distributed")
        if planner.arguments["selection_scope"] == "global":
            # Where the top k of a whole matrix fall depends on its norms: the caller says, or
            # they are taken to fall as a local selection's would.
            runs = [
                planner.selection_runs.get(name) or selected_runs_local(fraction, [span])[0]
                for name, span in zip(names, spans, strict=True)
            ]
            counts = [num_selected(fraction, slices)] * len(names)
        else:
            runs = selected_runs_local(fraction, spans)
            counts = [sum(num_selected(fraction, la) for _, la in slice_ranges(span)) for span in spans]
        if planner.compressed:
            me = planner.group_rank
            mine = sum(run[me][1] * span[me].cols for run, span in zip(runs, spans, strict=True))
            traffic.all_reduce(len(planner.replicas), mine, planner.param_bytes, "dp")
        by_k = {}
        for x, k in enumerate(counts):
            by_k.setdefault(k, []).append(x)
        for k, members in by_k.items():
            blocks = [
                [
                    Block(first, count, b.col0, b.cols)
                    for (first, count), b in zip(runs[x], spans[x], strict=True)
                ]
                for x in members
            ]
            planner.orthonormalize_blocks(blocks, (k, other))
        cls._plan_orthonormalized(planner, counts)

    @classmethod
    def _plan_orthonormalized(cls, planner, counts):
        """The planner's hook for what `_orthonormalized` sends of a sharded bucket whose
        matrices selected `counts` slices each (nothing for Dion2 itself)."""

    def _generator(self, group, p, step, salt=()):
        """The random selection's generator for parameter p at `step`: the same on every rank,
        replica and resume."""
        return torch.Generator().manual_seed(hash((group["seed"], self._index[p], step, *salt)) % 2**63)

    def _record_selection(self, state, indices, step):
        """Diagnostics: indices (batch, k) of the slices selected at `step`."""
        waited = step - 1 - state["last_selected"].gather(1, indices)
        torch.maximum(state["longest_wait"], waited.max(), out=state["longest_wait"])
        state["last_selected"].scatter_(1, indices, step)

    def _begin_step(self, group, params):
        for p in params:
            self.state[p]["step"] += 1

    def _sync_replicas(self, selected):
        """Average each replica's selected slices, in place (compressed sync only)."""
        if not self.compressed or not selected:
            return
        flat = self.replicas.all_reduce_sum(torch.cat([t.reshape(-1) for t in selected]))
        flat /= self.replicas.world_size
        for t, part in zip(selected, flat.split([t.numel() for t in selected]), strict=True):
            t.copy_(part.view_as(t))

    def _select(self, group, slots, steps, norms, spans, slices, device):
        """The chosen slices of each matrix, sorted: (batch, k) indices into the whole matrix.

        Each slice range selects on its own: the whole matrix when replicated or under the
        global scope, else each rank block's slices (`slice_ranges`). Random draws are salted
        by the range when there are several, so that the ranges draw independently.
        """
        fraction, chosen = group["fraction"], []
        for x, (slot, step) in enumerate(zip(slots, steps, strict=True)):
            whole = spans is None or group["selection_scope"] == "global"
            ranges = [(0, slices)] if whole else slice_ranges(spans[x])
            picks = []
            for a, la in ranges:
                k = num_selected(fraction, la)
                if norms is not None:
                    picks.append(norms[x][:, a : a + la].topk(k, dim=-1, sorted=False).indices + a)
                else:
                    salt = (*slot.salt, *((a,) if len(ranges) > 1 else ()))
                    generator = self._generator(group, slot.param, step, salt)
                    # A batch-sharded rank draws for the matrices before its own too, so that
                    # each matrix gets the draw it gets in one process.
                    first = slot.first_matrix or 0
                    batch = first + len(as_matrices(slot.weight, group["flatten"]))
                    draws = [torch.randperm(la, generator=generator)[:k] + a for _ in range(batch)]
                    picks.append(torch.stack(draws[first:]))
            chosen.append(torch.cat(picks, dim=-1).sort(dim=-1).values)
        return chosen if norms is not None else to_device(chosen, device)

    def _orthonormalized(self, group, states, chosen, runs, ortho, shape, sharded):
        """Hook for variants: adjust the orthonormalized slices in place. ortho[i] is this
        rank's part (batch, count, other) of matrix i's orthonormalized selection: the run
        runs[i] = (first, count) of the sorted chosen slices chosen[i] (batch, k), cut to this
        rank's block of the other side; `shape` is the full matrix's (m, n), and `sharded`
        says the parts are blocks of matrices spread over distributed_mesh."""

    def _update_bucket(self, group, slots):
        sharded = slots[0].blocks is not None
        flatten = group["flatten"] and not sharded
        m, n = slots[0].shape
        rows = self.selects_rows(m, n)
        slices, other = (m, n) if rows else (n, m)
        l1 = group["selection"] == "l1"
        global_scope = group["selection_scope"] == "global"
        # The counts a rank holds vary from step to step only for sharded global selections;
        # everything else compiles once per bucket.
        run = self._run if not (sharded and global_scope) else (lambda fn, *args: fn(*args))
        states = [s.state for s in slots]
        weights = [s.weight for s in slots]
        momenta = [s["momentum"] for s in states]
        device = momenta[0].device
        steps = [int(s["step"]) for s in states]

        # 1. accumulate
        norms = run(accumulate, momenta, [s.grad for s in slots], flatten, rows, l1)
        spans = None
        if sharded:
            # Each rank's block in slice-major coordinates (slice0, slices, other0, others).
            spans = [[b if rows else b.transposed() for b in s.blocks] for s in slots]
            if l1:
                full = torch.zeros(len(slots), slices, device=device)
                for x, (norm, span) in enumerate(zip(norms, spans, strict=True)):
                    mine = span[self.comm.rank]
                    full[x, mine.row0 : mine.row0 + mine.rows] = norm[0]
                norms = list(self.comm.all_reduce_sum(full).unsqueeze(1).unbind())

        # 2. select
        chosen = self._select(group, slots, steps, norms, spans, slices, device)
        if sharded:
            runs = (
                selected_runs_global(chosen, spans)
                if global_scope
                else selected_runs_local(group["fraction"], spans)
            )
            mine = [run_[self.comm.rank] for run_ in runs]
            local_index = [
                c[:, first : first + count] - span[self.comm.rank].row0
                for c, (first, count), span in zip(chosen, mine, spans, strict=True)
            ]
        else:
            mine = [(0, c.size(-1)) for c in chosen]
            local_index = chosen
        for state, indices, step in zip(states, chosen, steps, strict=True):
            self._record_selection(state, indices, step)

        # 3. exchange
        selected = run(gather_slices, momenta, local_index, flatten, rows)
        self._sync_replicas(selected)
        if sharded:
            ortho = [None] * len(slots)
            by_k = {}
            for x, c in enumerate(chosen):
                by_k.setdefault(c.size(-1), []).append(x)
            for k, members in by_k.items():
                blocks = [
                    [
                        Block(first, count, b.col0, b.cols)
                        for (first, count), b in zip(runs[x], spans[x], strict=True)
                    ]
                    for x in members
                ]
                done = yield from self._orthonormalize_blocks(
                    group, [selected[x][0] for x in members], blocks, (k, other)
                )
                for x, update in zip(members, done, strict=True):
                    ortho[x] = update.unsqueeze(0)
        else:
            shared = slots[0].first_matrix is None
            stacked = yield from self._orthonormalize(group, torch.cat(selected), shared=shared)
            ortho = list(stacked.split([len(s) for s in selected]))
        self._orthonormalized(group, states, chosen, mine, ortho, (m, n), sharded)

        # 4. decay and apply
        h = self._hyperparameters(group, device, self.ef_decay_key, "lr", "weight_decay")
        run(
            decay_and_apply,
            weights,
            momenta,
            local_index,
            selected,
            ortho,
            h[self.ef_decay_key],
            h["lr"],
            h["weight_decay"],
            lr_scale(group["adjust_lr"], m, n) * self._rms_factor(group, chosen[0].size(-1), slices, other),
            group["decay"] == "full",
            group["cautious_wd"],
            flatten,
            rows,
        )

    @staticmethod
    def _rms_factor(group, k, slices, other):
        """With `match_muon_rms`, the factor that gives the update Muon's RMS: O of k slices
        has min(k, other) unit singular values where Muon's has min(slices, other), so the
        factor is sqrt(min(slices, other) / min(k, other)), about 1 / sqrt(fraction)."""
        if not group["match_muon_rms"]:
            return 1.0
        return math.sqrt(min(slices, other) / min(k, other))

    def selection_metrics(self):
        """The selection's diagnostics over all matrices: mean and least coverage, and the
        longest wait of any slice. Every rank must call it."""
        stats = self.selection_stats()
        coverage = [s["coverage"] for s in stats]
        return {
            "selection_coverage_mean": sum(coverage) / len(coverage),
            "selection_coverage_min": min(coverage),
            "selection_longest_wait": max(s["longest_wait"] for s in stats),
        }

    def selection_stats(self):
        """Per matrix: the fraction of slices selected at least once so far, and the longest
        run of steps any slice has gone unselected (including waits still going on). Every rank
        must call it: a batch-sharded parameter's record is gathered from all."""
        rows = []
        for group in self.param_groups:
            if group["algorithm"] != self.algorithm_name():
                continue
            for p in group["params"]:
                state = self.state[p]
                last, step = state["last_selected"], int(state["step"])  # the step lives on the host
                if isinstance(last, DTensor):
                    last = last.full_tensor()
                ongoing = (step - last).max() if step else torch.zeros_like(state["longest_wait"])
                wait = torch.maximum(state["longest_wait"], ongoing)
                rows.append(torch.stack([(last > 0).double().mean(), wait.double()]))
        # One copy to the host for every matrix, rather than two reads each.
        values = torch.stack(rows).tolist() if rows else []
        return [{"coverage": coverage, "longest_wait": int(wait)} for coverage, wait in values]
