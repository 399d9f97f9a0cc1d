"""NorMuon: Muon whose orthonormalized update is normalized per output neuron."""

import torch

from optimizers.matrix_optimizer import as_matrices
from optimizers.muon import Muon


class NorMuon(Muon):
    """Muon, then v <- b2 v + (1 - b2) mean_row(O^2); O' = O / (sqrt(v) + eps), rescaled to
    the Frobenius norm of O. `v` holds one value per row (output neuron) of each matrix."""

    def __init__(self, params, *args, muon_beta2=0.95, **kwargs):
        super().__init__(params, *args, muon_beta2=muon_beta2, **kwargs)

    def _check_matrix_group(self, group):
        super()._check_matrix_group(group)
        if not 0 <= group["muon_beta2"] < 1:
            raise ValueError(f"muon_beta2 must lie in [0, 1), got {group['muon_beta2']}")

    def _new_matrix_state(self, p, group):
        rows = as_matrices(p, group["flatten"]).shape[:2]
        return {
            **super()._new_matrix_state(p, group),
            "row_second_moment": torch.zeros(rows, device=p.device),
        }

    def _orthonormalized(self, group, states, updates, row_starts, shape, sharded):
        beta2, eps = group["muon_beta2"], group["epsilon"]
        # Each row's sum of squares over the full matrix. A sharded row is spread over ranks:
        # the partial sums are placed in full-height vectors and summed over distributed_mesh,
        # so every rank holds the whole second moment (a replicated state, as checkpoints need).
        squares = [torch.zeros_like(s["row_second_moment"]) for s in states]
        for total, u, start in zip(squares, updates, row_starts, strict=True):
            total[:, start : start + u.size(-2)] = u.float().square().sum(dim=-1)
        if sharded:
            squares = list(self.comm.all_reduce_sum(torch.stack(squares)).unbind())
        for state, total, u, start in zip(states, squares, updates, row_starts, strict=True):
            moment = state["row_second_moment"]
            moment.lerp_(total / shape[1], 1 - beta2)
            scale = moment.sqrt() + eps
            # The Frobenius norms of O and of O / scale, from the row sums: no second reduction.
            ratio = total.sum(-1).sqrt() / ((total / scale.square()).sum(-1).sqrt() + eps)
            rows = slice(start, start + u.size(-2))
            u.mul_((ratio[:, None] / scale[:, rows]).unsqueeze(-1).to(u.dtype))
