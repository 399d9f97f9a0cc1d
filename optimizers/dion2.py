"""Dion2 (Ahn, Amsel, Langford, 2025), Algorithm 1: orthonormalize only a selected fraction of
the momentum's rows (or columns, along the shorter side), and decay only those."""

import math

import torch
from torch.distributed.tensor import DTensor

from optimizers.matrix_optimizer import MatrixOptimizer, as_matrices, lr_scale, matrix_shape

SELECTIONS = ("l1", "random")
DECAYS = ("selective", "full")
SCOPES = ("local", "global")


def slice_major(matrices):
    """View (batch, m, n) so that its rows are the slices Dion2 selects: the shorter side."""
    return matrices if matrices.size(-2) <= matrices.size(-1) else matrices.mT


def num_selected(fraction, slices):
    """k = ceil(fraction * slices)."""
    return math.ceil(fraction * slices)


def expand_index(indices, slices):
    """Indices (batch, k) of slices, as an index (batch, k, slice length) for gather/scatter."""
    return indices.unsqueeze(-1).expand(-1, -1, slices.size(-1))


def to_device(tensors, device):
    """Host tensors on `device`. On CUDA they travel in one copy from pinned memory that the
    host does not wait for: a copy from pageable memory would wait for the device's queue."""
    if device.type != "cuda":
        return [t.to(device) for t in tensors]
    flat = torch.cat(tensors).pin_memory().to(device, non_blocking=True)
    return list(flat.split([len(t) for t in tensors]))


def accumulate_and_select_l1(momenta, grads, k, flatten):
    """M <- M + G for each matrix; returns the sorted indices (batch, k) of each M's k slices
    with the largest l1 norm."""
    torch._foreach_add_(momenta, grads)
    chosen = []
    for momentum in momenta:
        norms = torch.linalg.vector_norm(slice_major(as_matrices(momentum, flatten)), ord=1, dim=-1)
        chosen.append(norms.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values)
    return chosen


def gather_selected(momenta, chosen, flatten):
    """The chosen slices of every momentum, stacked: (sum of batches, k, slice length)."""
    parts = []
    for momentum, indices in zip(momenta, chosen, strict=True):
        slices = slice_major(as_matrices(momentum, flatten))
        parts.append(slices.gather(1, expand_index(indices, slices)))
    return torch.cat(parts)


def decay_and_apply(
    params, momenta, chosen, selected, ortho, mu, lr, weight_decay, scale, full_decay, flatten
):
    """M[K] <- mu M[K] (all of M with `full_decay`); W <- W (1 - lr wd); W[K] <- W[K] - lr
    scale O. selected and ortho stack every matrix's chosen slices; mu, lr and weight_decay
    may be 0-d tensors."""
    sizes = [len(indices) for indices in chosen]
    if full_decay:
        torch._foreach_mul_(momenta, mu)
    else:
        for momentum, indices, rows in zip(momenta, chosen, selected.split(sizes), strict=True):
            slices = slice_major(as_matrices(momentum, flatten))
            slices.scatter_(1, expand_index(indices, slices), rows * mu)
    torch._foreach_mul_(params, 1 - lr * weight_decay)
    for p, indices, update in zip(params, chosen, ortho.split(sizes), strict=True):
        slices = slice_major(as_matrices(p, flatten))
        slices.scatter_add_(1, expand_index(indices, slices), update * (-lr * scale))


def slice_ranges(span):
    """The distinct, non-empty slice ranges (start, count) of a matrix's rank blocks, in order."""
    return sorted({(a, la) for a, la, _, _ in span if la})


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
        runs.append([runs_of_ranges[(a, la)] if la else (0, 0) for a, la, _, _ in span])
    return runs


def selected_runs_global(chosen, spans):
    """As `selected_runs_local`, for selections of the whole matrix: how many of the chosen
    slices fall in each rank's range depends on the norms, so the counts of every matrix are
    found on the device and read back in one transfer."""
    bounds = torch.tensor(
        [[[a, a + la] for a, la, _, _ in span] for span in spans], device=chosen[0].device
    ).flatten(1)
    ends = torch.searchsorted(torch.stack(chosen), bounds).view(len(spans), -1, 2).tolist()
    return [[(lo, hi - lo) for lo, hi in matrix] for matrix in ends]


class Dion2(MatrixOptimizer):
    """M <- M + G; K = the top-k slices by l1 norm (or k random ones); O = NS(M[K]);
    M[K] <- ef_decay M[K]; W <- W (1 - lr wd); W[K] <- W[K] - lr s O.

    `decay="full"` decays all of M instead (the paper's ablation). Random selection draws
    from (seed, parameter index, step), so every replica and every resume draws the same rows.

    Compressed data-parallel sync (paper Section 3.2): with random selection, a
    `replicate_mesh` and `replicate_mesh_grad_sync`, the replicas skip the matrices' gradient
    all-reduce and average only the selected slices M[K] before orthonormalizing. Each
    replica's momentum drifts apart elsewhere, but their mean stays the momentum of the
    synchronized run, so every replica applies the same update.
    """

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
        selection_scope="local",
        selection="l1",
        decay="selective",
        seed=0,
        ns_dtype=None,
        replicate_mesh=None,
        replicate_mesh_grad_sync=True,
        compile=False,
    ):
        defaults = dict(
            lr=lr,
            fraction=fraction,
            ef_decay=ef_decay,
            betas=betas,
            weight_decay=weight_decay,
            epsilon=epsilon,
            adjust_lr=adjust_lr,
            flatten=flatten,
            use_polar_express=use_polar_express,
            selection_scope=selection_scope,
            selection=selection,
            decay=decay,
            seed=seed,
            ns_dtype=ns_dtype,
        )
        super().__init__(params, defaults, distributed_mesh, use_triton, replicate_mesh, compile)
        if self.replicas is not None and replicate_mesh_grad_sync:
            if any(g["selection"] != "random" for g in self.param_groups if g["algorithm"] == "dion2"):
                raise ValueError(
                    "replicate_mesh_grad_sync needs selection='random': every replica must select the "
                    "same slices without the full momentum"
                )
            self.compressed = True

    def _sync_replicas(self, selected):
        """Average each replica's selected slices, in place (compressed sync only)."""
        if not self.compressed or not selected:
            return
        flat = self.replicas.all_reduce_sum(torch.cat([t.reshape(-1) for t in selected]))
        flat /= self.replicas.world_size
        for t, part in zip(selected, flat.split([t.numel() for t in selected]), strict=True):
            t.copy_(part.view_as(t))

    def _check_matrix_group(self, group):
        if not 0 < group["fraction"] <= 1:
            raise ValueError(f"fraction must lie in (0, 1], got {group['fraction']}")
        if not 0 <= group["ef_decay"] < 1:
            raise ValueError(f"ef_decay must lie in [0, 1), got {group['ef_decay']}")
        for key, allowed in (("selection", SELECTIONS), ("decay", DECAYS), ("selection_scope", SCOPES)):
            if group[key] not in allowed:
                raise ValueError(f"unknown {key} '{group[key]}'; allowed: {', '.join(allowed)}")

    def _new_matrix_state(self, p, group):
        batch, m, n = as_matrices(p, group["flatten"]).shape
        return {
            "momentum": torch.zeros_like(p),
            "step": torch.zeros((), dtype=torch.int64),
            # The step at which each slice was last selected (0: never), and the longest wait.
            "last_selected": torch.zeros(batch, min(m, n), dtype=torch.int64, device=p.device),
            "longest_wait": torch.zeros((), dtype=torch.int64, device=p.device),
        }

    def _generator(self, group, p, step, salt=()):
        """The random selection's generator for parameter p at `step`: the same on every rank,
        replica and resume."""
        return torch.Generator().manual_seed(hash((group["seed"], self._index[p], step, *salt)) % 2**63)

    def _random_slices(self, group, p, step, count, k, salt=()):
        return torch.randperm(count, generator=self._generator(group, p, step, salt))[:k].sort().values

    def _record_selection(self, state, indices, step):
        """Diagnostics: indices (batch, k) of the slices selected at `step`."""
        waited = step - 1 - state["last_selected"].gather(1, indices)
        state["longest_wait"] = torch.maximum(state["longest_wait"], waited.max())
        state["last_selected"].scatter_(1, indices, step)

    def _update_sharded(self, group, params):
        """Dion2 on matrices spread in blocks over distributed_mesh (FSDP, TP, or both).

        Work in slice-major coordinates: each rank's block covers a range of slices and a
        range of the other side. With selection_scope "local", each distinct slice range
        (one FSDP or TP shard of the slices) selects ceil(fraction x its slices) on its own;
        "global" selects the top k of the whole matrix. l1 norms of slices spread over several
        ranks are summed over distributed_mesh, so every rank knows every choice. Only the
        selected slices are exchanged and orthonormalized.
        """
        comm, mu, fraction = self.comm, group["ef_decay"], group["fraction"]
        m, n = matrix_shape(params[0], False)
        by_rows = m <= n
        slices, other = (m, n) if by_rows else (n, m)
        # Each rank's block as (slice0, slices, other0, others).
        spans = [[b if by_rows else (b[2], b[3], b[0], b[1]) for b in self.blocks[p]] for p in params]
        states = [self.state[p] for p in params]
        momenta = [s["momentum"].to_local() for s in states]
        torch._foreach_add_(momenta, [p.grad.to_local() for p in params])
        major = [mom if by_rows else mom.T for mom in momenta]
        steps = []
        for state in states:
            state["step"] += 1
            steps.append(int(state["step"]))
        norms = None
        if group["selection"] == "l1":
            partial = torch.zeros(len(params), slices, device=momenta[0].device)
            for x, (view, span) in enumerate(zip(major, spans, strict=True)):
                start, count = span[comm.rank][:2]
                partial[x, start : start + count] = torch.linalg.vector_norm(view, ord=1, dim=1)
            norms = comm.all_reduce_sum(partial)
        global_scope = group["selection_scope"] == "global"
        chosen = []
        for x, (p, t, span) in enumerate(zip(params, steps, spans, strict=True)):
            ranges = [(0, slices)] if global_scope else slice_ranges(span)
            salt = len(ranges) > 1
            picks = []
            for a, la in ranges:
                k = num_selected(fraction, la)
                if norms is not None:
                    picks.append(norms[x, a : a + la].topk(k, sorted=False).indices.sort().values + a)
                else:
                    picks.append(self._random_slices(group, p, t, la, k, (a,) if salt else ()) + a)
            chosen.append(torch.cat(picks))
        if norms is None:
            chosen = to_device(chosen, momenta[0].device)
        runs = selected_runs_global(chosen, spans) if global_scope else selected_runs_local(fraction, spans)
        # Each rank's piece of the selected matrix (k x other), and its local slice indices.
        pieces, local_index, selected_blocks = [], [], []
        for view, span, c, run in zip(major, spans, chosen, runs, strict=True):
            blocks = [(first, count, b, lb) for (first, count), (_, _, b, lb) in zip(run, span, strict=True)]
            first, count = run[comm.rank]
            index = c[first : first + count] - span[comm.rank][0]
            local_index.append(index)
            pieces.append(view.index_select(0, index))
            selected_blocks.append(blocks)
        self._sync_replicas(pieces)
        updates = [None] * len(params)
        by_k = {}
        for x, c in enumerate(chosen):
            by_k.setdefault(len(c), []).append(x)
        for k, members in by_k.items():
            ortho = self._orthonormalize_blocks(
                group, [pieces[x] for x in members], [selected_blocks[x] for x in members], (k, other)
            )
            for x, update in zip(members, ortho, strict=True):
                updates[x] = update
        for state, c, t in zip(states, chosen, steps, strict=True):
            self._record_selection(state, c.unsqueeze(0), t)
        if group["decay"] == "full":
            torch._foreach_mul_(momenta, mu)
        else:
            for view, index, piece in zip(major, local_index, pieces, strict=True):
                view.index_copy_(0, index, piece.mul_(mu))
        weights = [p.to_local() for p in params]
        torch._foreach_mul_(weights, 1 - group["lr"] * group["weight_decay"])
        step_size = -group["lr"] * lr_scale(group["adjust_lr"], m, n)
        for w, index, update in zip(weights, local_index, updates, strict=True):
            (w if by_rows else w.T).index_add_(0, index, update.mul_(step_size))

    def _update_bucket(self, group, params):
        if isinstance(params[0], DTensor):
            return self._update_sharded(group, params)
        flatten = group["flatten"]
        states = [self.state[p] for p in params]
        momenta = [s["momentum"] for s in states]
        grads = [p.grad for p in params]
        m, n = matrix_shape(params[0], flatten)
        k = num_selected(group["fraction"], min(m, n))
        steps = []
        for state in states:
            state["step"] += 1
            steps.append(int(state["step"]))
        if group["selection"] == "l1":
            chosen = self._run(accumulate_and_select_l1, momenta, grads, k, flatten)
        else:
            torch._foreach_add_(momenta, grads)
            chosen = []
            for p, t in zip(params, steps, strict=True):
                generator = self._generator(group, p, t)
                draws = [torch.randperm(min(m, n), generator=generator)[:k] for _ in as_matrices(p, flatten)]
                chosen.append(torch.stack(draws).sort(dim=-1).values)
            chosen = to_device(chosen, params[0].device)
        for state, indices, t in zip(states, chosen, steps, strict=True):
            self._record_selection(state, indices, t)
        selected = self._run(gather_selected, momenta, chosen, flatten)
        self._sync_replicas([selected])
        ortho = self._orthonormalize(group, selected)
        h = self._hyperparameters(group, selected.device, "ef_decay", "lr", "weight_decay")
        scale = lr_scale(group["adjust_lr"], m, n)
        full_decay = group["decay"] == "full"
        self._run(
            decay_and_apply,
            params,
            momenta,
            chosen,
            selected,
            ortho,
            h["ef_decay"],
            h["lr"],
            h["weight_decay"],
            scale,
            full_decay,
            flatten,
        )

    def selection_stats(self):
        """Per Dion2 matrix: the fraction of slices selected at least once so far, and the
        longest run of steps any slice has gone unselected (including waits still going on)."""
        stats = []
        for group in self.param_groups:
            if group["algorithm"] != self.algorithm_name():
                continue
            for p in group["params"]:
                state = self.state[p]
                last, step = state["last_selected"], int(state["step"])
                ongoing = (step - last).max() if step else torch.zeros_like(state["longest_wait"])
                stats.append(
                    {
                        "coverage": (last > 0).float().mean().item(),
                        "longest_wait": int(torch.maximum(state["longest_wait"], ongoing)),
                    }
                )
        return stats
