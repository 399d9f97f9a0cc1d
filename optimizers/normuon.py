"""NorMuon: Muon whose orthonormalized update is normalized per output neuron."""

import torch

from optimizers.matrix_optimizer import as_matrices
from optimizers.muon import Muon
from parallel.sharding import per_matrix_zeros


def normalize_rows(moment, squares, width, beta2, eps):
    """NorMuon's per-neuron step on some rows of orthonormalized matrices: the second moment
    v <- b2 v + (1 - b2) mean_row(O^2) in place, and the factor (batch, rows) by which each row
    of O is divided by sqrt(v) + eps and rescaled so that the rows keep their Frobenius norm.

    squares (batch, rows) holds each row's sum of squares over its full width; the norms of O
    and of the normalized O come from these sums, so no second reduction over ranks is needed.
    """
    moment.lerp_(squares / width, 1 - beta2)
    scale = moment.sqrt() + eps
    ratio = squares.sum(-1).sqrt() / ((squares / scale.square()).sum(-1).sqrt() + eps)
    return ratio[:, None] / scale


class NorMuon(Muon):
    """Muon, then v <- b2 v + (1 - b2) mean_row(O^2); O' = O / (sqrt(v) + eps), rescaled to
    the Frobenius norm of O. `v` holds one value per row (output neuron) of each matrix."""

    def __init__(self, params, *args, muon_beta2=0.95, **kwargs):
        super().__init__(params, *args, muon_beta2=muon_beta2, **kwargs)

    def _new_matrix_state(self, p, group):
        batch, rows = as_matrices(p, group["flatten"]).shape[:2]
        return {**super()._new_matrix_state(p, group), "row_second_moment": per_matrix_zeros(p, batch, rows)}

    @classmethod
    def _matrix_state_bytes(cls, shape, local_numel, dtype, arguments):
        # each row's fp32 second moment, whole on every rank
        return super()._matrix_state_bytes(shape, local_numel, dtype, arguments) + shape[0] * 4

    @classmethod
    def plan_bucket(cls, planner, names, shape):
        super().plan_bucket(planner, names, shape)
        if planner.layout.sharded:  # each row's sum of squares over the full matrix
            planner.traffic.all_reduce(planner.world, len(names) * shape[0], 4, "distributed")

    def _slot_state(self, state, rows, local_rows, slices):
        return {
            **super()._slot_state(state, rows, local_rows, slices),
            "row_second_moment": state["row_second_moment"][:, rows],
        }

    def _orthonormalized(self, group, states, updates, row_starts, shape, sharded):
        # Each row's sum of squares over the full matrix. A sharded row is spread over ranks:
        # the partial sums are placed in full-height vectors and summed over distributed_mesh,
        # so every rank holds the whole second moment (a replicated state, as checkpoints need).
        squares = [torch.zeros_like(s["row_second_moment"]) for s in states]
        for total, u, start in zip(squares, updates, row_starts, strict=True):
            total[:, start : start + u.size(-2)] = u.float().square().sum(dim=-1)
        if sharded:
            squares = list(self.comm.all_reduce_sum(torch.stack(squares)).unbind())
        for state, total, u, start in zip(states, squares, updates, row_starts, strict=True):
            factor = normalize_rows(
                state["row_second_moment"], total, shape[1], group["muon_beta2"], group["epsilon"]
            )
            u.mul_(factor[:, start : start + u.size(-2)].unsqueeze(-1).to(u.dtype))
