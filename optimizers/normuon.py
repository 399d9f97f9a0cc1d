"""NorMuon: Muon whose orthonormalized update is normalized per output neuron."""

import torch

from optimizers.matrix_optimizer import as_matrices
from optimizers.muon import Muon


class NorMuon(Muon):
    """Muon, then v <- b2 v + (1 - b2) mean_row(O^2); O' = O / (sqrt(v) + eps), rescaled to
    the Frobenius norm of O. `v` holds one value per row (output neuron) of each matrix."""

    def __init__(self, params, *args, muon_beta2=0.95, **kwargs):
        super().__init__(params, *args, muon_beta2=muon_beta2, **kwargs)

    def _shards_supported(self, p):
        return False  # its Frobenius rescale needs whole rows: not on shards yet

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

    def _orthonormalized(self, group, params, states, matrices):
        beta2, eps = group["muon_beta2"], group["epsilon"]
        moments = torch.cat([s["row_second_moment"] for s in states])
        moments.lerp_(matrices.float().square().mean(dim=-1), 1 - beta2)
        for s, m in zip(states, moments.split([len(s["row_second_moment"]) for s in states]), strict=True):
            s["row_second_moment"].copy_(m)
        normalized = matrices / (moments.sqrt().unsqueeze(-1) + eps).to(matrices.dtype)
        norm = torch.linalg.vector_norm(matrices, dim=(-2, -1), keepdim=True)
        normalized *= norm / (torch.linalg.vector_norm(normalized, dim=(-2, -1), keepdim=True) + eps)
        return normalized
