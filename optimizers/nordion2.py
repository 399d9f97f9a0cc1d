"""NorDion2 (Dion3): Dion2's selection and error feedback on the rows of each matrix, then
NorMuon's per-neuron normalization of the orthonormalized rows."""

import torch

from optimizers.dion2 import Dion2
from optimizers.normuon import normalize_rows
from parallel.sharding import per_matrix_zeros


class NorDion2(Dion2):
    """M <- M + G; K = the top-k rows by l1 norm (or k random ones); O = NS(M[K]);
    M[K] <- mu M[K]; v[K] <- b2 v[K] + (1 - b2) mean_row(O^2); O' = O / (sqrt(v[K]) + eps),
    rescaled to the Frobenius norm of O; W <- W (1 - lr wd); W[K] <- W[K] - lr s O'.

    The slices are always rows, whatever the shape, because the normalization is per output
    neuron. The arguments are Dion2's, under microsoft/dion's names and in its order up to
    `fraction`: `mu` is Dion2's `ef_decay` (and the param-group key), `muon_beta2` NorMuon's
    second-moment decay, and they and the rest of Dion2's arguments are keywords.
    """

    ef_decay_key = "mu"

    def __init__(
        self, params, distributed_mesh=None, lr=0.01, fraction=0.25, *, mu=0.95, muon_beta2=0.95, **kwargs
    ):
        if "ef_decay" in kwargs:
            raise TypeError("NorDion2 takes microsoft/dion's mu for the error-feedback decay, not ef_decay")
        super().__init__(params, distributed_mesh, lr, fraction, ef_decay=mu, muon_beta2=muon_beta2, **kwargs)

    @staticmethod
    def selects_rows(m, n):
        """Always the rows: the output neurons that the normalization scales."""
        return True

    @classmethod
    def _matrix_state_bytes(cls, shape, local_numel, dtype, arguments):
        # and each row's fp32 second moment, whole on every rank
        return super()._matrix_state_bytes(shape, local_numel, dtype, arguments) + shape[0] * 4

    @classmethod
    def _plan_orthonormalized(cls, planner, counts):
        # each selected row's sum of squares over the full matrix
        planner.traffic.all_reduce(planner.world, sum(counts), 4, "distributed")

    def _slot_state(self, state, rows, local_rows, slices):
        return {
            **super()._slot_state(state, rows, local_rows, slices),
            "row_second_moment": state["row_second_moment"][:, slices],
        }

    def _new_matrix_state(self, p, group):
        state = super()._new_matrix_state(p, group)
        state["row_second_moment"] = per_matrix_zeros(p, *state["last_selected"].shape)
        return state

    def _orthonormalized(self, group, states, chosen, runs, ortho, shape, sharded):
        # Each selected row's sum of squares over its full width. The rows of a sharded matrix
        # are spread over the ranks in blocks: every rank places its partial sums at its run
        # of the selection, and one sum over distributed_mesh completes them all, so every
        # rank updates the whole (replicated) second moment alike.
        squares = [torch.zeros(c.shape, device=c.device) for c in chosen]
        for total, (first, count), o in zip(squares, runs, ortho, strict=True):
            total[:, first : first + count] = o.float().square().sum(dim=-1)
        if sharded:
            flat = self.comm.all_reduce_sum(torch.cat([t.reshape(-1) for t in squares]))
            squares = [
                part.view_as(t)
                for part, t in zip(flat.split([t.numel() for t in squares]), squares, strict=True)
            ]
        for state, indices, total, (first, count), o in zip(
            states, chosen, squares, runs, ortho, strict=True
        ):
            moment = state["row_second_moment"]
            picked = moment.gather(1, indices)
            factor = normalize_rows(picked, total, shape[1], group["muon_beta2"], group["epsilon"])
            moment.scatter_(1, indices, picked)
            o.mul_(factor[:, first : first + count].unsqueeze(-1).to(o.dtype))
