"""Dion (Ahn et al., 2025): a low-rank orthonormal update from one step of amortized power
iteration per update, with error feedback on the momentum."""

import math

import torch

from optimizers.matrix_optimizer import MatrixOptimizer, as_matrices

QR_METHODS = ("cholesky_qr", "qr")


def orthonormalize_columns(p, method):
    """An orthonormal basis of the columns of each matrix of p (batch, m, r).

    Cholesky-QR costs a small Gram matrix, its Cholesky factor and a triangular solve, but
    it squares the condition number; run twice (CholeskyQR2) it is orthonormal to working
    precision. Where a Gram matrix is not positive definite (a rank-deficient p), it falls
    back to Householder QR.
    """
    if method == "cholesky_qr":
        basis = p
        for _ in range(2):
            factor, info = torch.linalg.cholesky_ex(basis.mT @ basis)
            if info.any():
                return torch.linalg.qr(p).Q
            basis = torch.linalg.solve_triangular(factor.mT, basis, upper=True, left=False)
        return basis
    return torch.linalg.qr(p).Q


class Dion(MatrixOptimizer):
    """M <- M + G; P = orth(M Q); R = M^T P; M <- M - (1 - mu) P R^T; Q <- R with unit
    columns; W <- W (1 - lr wd) - lr sqrt(fan_out / fan_in) P Q^T. Q (fan_in x r) carries
    over between steps, r = ceil(rank_fraction * min(fan_out, fan_in))."""

    def __init__(
        self,
        params,
        replicate_mesh=None,
        outer_shard_mesh=None,
        inner_shard_mesh=None,
        replicate_mesh_grad_sync=True,
        rank_fraction=1.0,
        lr=0.01,
        mu=0.95,
        betas=(0.9, 0.95),
        weight_decay=0.01,
        epsilon=1e-8,
        qr_method="cholesky_qr",
        seed=0,
    ):
        if any(mesh is not None for mesh in (replicate_mesh, outer_shard_mesh, inner_shard_mesh)):
            raise NotImplementedError("Dion: device meshes are not supported yet; pass None for one process")
        defaults = dict(
            lr=lr,
            mu=mu,
            betas=betas,
            weight_decay=weight_decay,
            epsilon=epsilon,
            rank_fraction=rank_fraction,
            qr_method=qr_method,
            seed=seed,
            replicate_mesh_grad_sync=replicate_mesh_grad_sync,
        )
        super().__init__(params, defaults)

    def _check_matrix_group(self, group):
        if not 0 < group["rank_fraction"] <= 1:
            raise ValueError(f"rank_fraction must lie in (0, 1], got {group['rank_fraction']}")
        if not 0 <= group["mu"] < 1:
            raise ValueError(f"mu must lie in [0, 1), got {group['mu']}")
        if group["qr_method"] not in QR_METHODS:
            raise ValueError(f"unknown qr_method '{group['qr_method']}'; allowed: {', '.join(QR_METHODS)}")

    def _new_matrix_state(self, p, group):
        batch, m, n = as_matrices(p, False).shape
        rank = math.ceil(group["rank_fraction"] * min(m, n))
        # A seeded start for Q, so that every rank and every run begins from the same basis.
        generator = torch.Generator().manual_seed(hash((group["seed"], self._index[p])) % 2**63)
        # Orthonormal, not merely unit columns: a Gaussian square Q can have a condition number
        # in the hundreds, which the first power-iteration step would inherit.
        q = torch.linalg.qr(torch.randn(batch, n, rank, generator=generator)).Q
        return {"momentum": torch.zeros_like(p), "q": q.to(p.device, p.dtype)}

    def _update_bucket(self, group, params):
        mu, eps = group["mu"], group["epsilon"]
        for p in params:
            state = self.state[p]
            momentum = as_matrices(state["momentum"], False)
            momentum += as_matrices(p.grad, False)
            basis = orthonormalize_columns(momentum @ state["q"], group["qr_method"])
            r = momentum.mT @ basis
            momentum.baddbmm_(basis, r.mT, alpha=-(1 - mu))  # error feedback
            norms = r.norm(dim=-2, keepdim=True)
            # A zero column of R (a zero momentum) keeps its old direction instead of dying.
            state["q"] = torch.where(norms > eps, r / norms.clamp_min(eps), state["q"])
            m, n = momentum.shape[-2:]
            update = (basis @ state["q"].mT).view_as(p)
            self._apply(group, [p], [update], math.sqrt(m / n))
