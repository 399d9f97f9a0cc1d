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


class Dion2(MatrixOptimizer):
    """M <- M + G; K = the top-k slices by l1 norm (or k random ones); O = NS(M[K]);
    M[K] <- ef_decay M[K]; W <- W (1 - lr wd); W[K] <- W[K] - lr s O.

    `decay="full"` decays all of M instead (the paper's ablation). Random selection draws
    from (seed, parameter index, step), so every replica and every resume draws the same rows.
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
        super().__init__(params, defaults, distributed_mesh, use_triton)

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

    def _select(self, group, slices, p, step):
        """Sorted indices (batch, k) of the slices to update."""
        batch, count, _ = slices.shape
        k = num_selected(group["fraction"], count)
        if group["selection"] == "l1":
            indices = torch.linalg.vector_norm(slices, ord=1, dim=-1).topk(k, dim=-1, sorted=False).indices
        else:
            generator = torch.Generator().manual_seed(hash((group["seed"], self._index[p], step)) % 2**63)
            indices = torch.stack([torch.randperm(count, generator=generator)[:k] for _ in range(batch)])
            indices = indices.to(slices.device)
        return indices.sort(dim=-1).values

    def _shards_supported(self, p):
        return self._row_sharded(p)

    def _random_slices(self, group, p, step, count, k, salt=()):
        generator = torch.Generator().manual_seed(hash((group["seed"], self._index[p], step, *salt)) % 2**63)
        return torch.randperm(count, generator=generator)[:k].sort().values

    def _record_selection(self, state, indices, step):
        """Diagnostics: indices (batch, k) of the slices selected at `step`."""
        waited = step - 1 - state["last_selected"].gather(1, indices)
        state["longest_wait"] = torch.maximum(state["longest_wait"], waited.max())
        state["last_selected"].scatter_(1, indices, step)

    def _update_row_sharded(self, group, params):
        """Dion2 on matrices whose rows FSDP shards over distributed_mesh.

        Rows as slices (m <= n): with selection_scope "local" each rank selects
        ceil(fraction x its rows) of its own rows; "global" selects the top k of the whole
        matrix (row norms are gathered). Columns as slices (m > n): every rank must take the
        same columns, so the column norms are summed over the ranks and the scope is global.
        Only the selected rows or columns are exchanged and orthonormalized.
        """
        comm, mu, fraction = self.comm, group["ef_decay"], group["fraction"]
        m, n = matrix_shape(params[0], False)
        rows = self.fsdp_rows(m)
        start = sum(rows[: comm.rank])
        weights = [p.to_local() for p in params]
        states = [self.state[p] for p in params]
        momenta = [s["momentum"].to_local() for s in states]
        torch._foreach_add_(momenta, [p.grad.to_local() for p in params])
        steps = []
        for state in states:
            state["step"] += 1
            steps.append(int(state["step"]))
        by_rows = m <= n
        l1 = group["selection"] == "l1"
        if by_rows and group["selection_scope"] == "local":
            ks = [num_selected(fraction, r) for r in rows]
            k_mine = ks[comm.rank]
            if l1:
                local = [
                    torch.linalg.vector_norm(mom, ord=1, dim=1)
                    .topk(k_mine, sorted=False)
                    .indices.sort()
                    .values
                    for mom in momenta
                ]
            else:
                local = [
                    self._random_slices(group, p, t, rows[comm.rank], k_mine, (comm.rank,)).to(mom.device)
                    for p, t, mom in zip(params, steps, momenta, strict=True)
                ]
            counts = [ks] * len(params)
            # Every rank learns every rank's choice, so the diagnostics agree everywhere.
            padded = torch.zeros(len(params), max(ks), dtype=torch.int64, device=momenta[0].device)
            for x, idx in enumerate(local):
                padded[x, : len(idx)] = idx + start
            gathered = comm.all_gather_stack(padded.T.contiguous(), comm.world_size * max(ks))
            chosen = [
                torch.cat([gathered[s * max(ks) : s * max(ks) + ks[s], x] for s in range(len(ks))])
                for x in range(len(params))
            ]
        else:
            slices = m if by_rows else n
            k = num_selected(fraction, slices)
            if l1 and by_rows:
                norms = torch.zeros(max(rows), len(params), device=momenta[0].device)
                norms[: rows[comm.rank]] = torch.stack(
                    [torch.linalg.vector_norm(mom, ord=1, dim=1) for mom in momenta], dim=1
                )
                gathered = comm.all_gather_stack(norms, comm.world_size * max(rows))
                full = torch.cat([gathered[s * max(rows) : s * max(rows) + r] for s, r in enumerate(rows)])
                chosen = [full[:, x].topk(k, sorted=False).indices.sort().values for x in range(len(params))]
            elif l1:
                norms = comm.all_reduce_sum(
                    torch.stack([torch.linalg.vector_norm(mom, ord=1, dim=0) for mom in momenta])
                )
                chosen = [norms[x].topk(k, sorted=False).indices.sort().values for x in range(len(params))]
            else:
                chosen = [
                    self._random_slices(group, p, t, slices, k).to(momenta[0].device)
                    for p, t in zip(params, steps, strict=True)
                ]
            if by_rows:
                local = [c[(c >= start) & (c < start + rows[comm.rank])] - start for c in chosen]
                counts = [
                    [int(((c >= sum(rows[:s])) & (c < sum(rows[: s + 1]))).sum()) for s in range(len(rows))]
                    for c in chosen
                ]
            else:
                counts = [rows] * len(params)
        dim = 0 if by_rows else 1
        index = local if by_rows else chosen
        selected = [mom.index_select(dim, idx) for mom, idx in zip(momenta, index, strict=True)]
        ortho = self._orthonormalize_row_shards(group, selected, counts)
        for state, c, t in zip(states, chosen, steps, strict=True):
            self._record_selection(state, c.unsqueeze(0), t)
        if group["decay"] == "full":
            torch._foreach_mul_(momenta, mu)
        else:
            for mom, idx, sub in zip(momenta, index, selected, strict=True):
                mom.index_copy_(dim, idx, sub.mul_(mu))
        torch._foreach_mul_(weights, 1 - group["lr"] * group["weight_decay"])
        step_size = -group["lr"] * lr_scale(group["adjust_lr"], m, n)
        for w, idx, update in zip(weights, index, ortho, strict=True):
            w.index_add_(dim, idx, update.mul_(step_size))

    def _update_bucket(self, group, params):
        if isinstance(params[0], DTensor):
            return self._update_row_sharded(group, params)
        flatten, mu = group["flatten"], group["ef_decay"]
        states = [self.state[p] for p in params]
        momenta = [s["momentum"] for s in states]
        torch._foreach_add_(momenta, [p.grad for p in params])

        chosen, selected = [], []
        for p, state, momentum in zip(params, states, momenta, strict=True):
            state["step"] += 1
            step = int(state["step"])
            slices = slice_major(as_matrices(momentum, flatten))
            indices = self._select(group, slices, p, step)
            index = indices.unsqueeze(-1).expand(-1, -1, slices.size(-1))
            chosen.append(index)
            selected.append(slices.gather(1, index))
            self._record_selection(state, indices, step)

        ortho = self._orthonormalize(group, torch.cat(selected))

        if group["decay"] == "full":
            torch._foreach_mul_(momenta, mu)
        else:
            for momentum, index, rows in zip(momenta, chosen, selected, strict=True):
                slice_major(as_matrices(momentum, flatten)).scatter_(1, index, rows.mul_(mu))
        torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
        step_size = -group["lr"] * lr_scale(group["adjust_lr"], *matrix_shape(params[0], flatten))
        for p, index, update in zip(params, chosen, ortho.split([len(i) for i in chosen]), strict=True):
            slice_major(as_matrices(p, flatten)).scatter_add_(1, index, update.mul_(step_size))

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
