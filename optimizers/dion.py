"""Dion (Ahn et al., 2025): a low-rank orthonormal update from one step of amortized power
iteration per update, with error feedback on the momentum."""

import math

import torch
from torch.distributed.tensor import DTensor

from optimizers.comm import Communicator
from optimizers.comm_plan import low_rank
from optimizers.matrix_optimizer import MatrixOptimizer, as_matrices
from parallel.process_group import mesh_group
from parallel.sharding import distinct_shards, is_block_sharded, local_block, local_tensor


def orthonormalize_columns(p, method):
    """An orthonormal basis of the columns of each matrix of p (batch, m, r).

    "cholesky_qr" is shifted CholeskyQR3 (Fukaya et al., 2020) with the r x r Gram matrix and
    its Cholesky factor in float64, the m x r solves in p's dtype. Cholesky-QR squares the
    condition number in the Gram matrix, so an fp32 Gram matrix loses p's small directions
    past a condition number of about 1e3 at 2048 x 1024, and the shift that would keep its
    factor real, 11 (m r + r (r + 1)) u ||p||_F^2, exceeds the trace itself at the 1B MLP's
    8192 x 1024 with fp32's u. In float64 that shift is about 1e-8 of the trace: the first,
    shifted pass keeps the factor real however ill-conditioned p is (rank-deficient included)
    and leaves a basis of condition number well below 1e8, which two plain passes make
    orthonormal to p's working precision. The plain passes add one float64 rounding unit of the
    mean eigenvalue, and every diagonal at least p's dtype's smallest normal number, so that a
    zero p gives zeros, not NaN. No step branches on the factorization's success, which would
    make the host wait for the device on every matrix.
    """
    if method == "qr":
        return torch.linalg.qr(p).Q
    m, r = p.shape[-2:]
    # The Gram matrix is small (r x r); MPS alone has no float64.
    exact = torch.float64 if p.device.type != "mps" else torch.float32
    unit = torch.finfo(exact).eps / 2
    basis = p
    for shift in (11 * (m * r + r * (r + 1)) * unit, unit / r, unit / r):
        wide = basis.to(exact)
        gram = wide.mT @ wide
        diagonal = gram.diagonal(dim1=-2, dim2=-1)
        diagonal += (diagonal.sum(-1, keepdim=True) * shift).clamp_min(torch.finfo(p.dtype).tiny)
        factor, _ = torch.linalg.cholesky_ex(gram)
        basis = torch.linalg.solve_triangular(factor.mT.to(p.dtype), basis, upper=True, left=False)
    return basis


class Dion(MatrixOptimizer):
    """M <- M + G; P = orth(M Q); R = M^T P; M <- M - (1 - mu) P R^T; Q <- R with unit
    columns; W <- W (1 - lr wd) - lr sqrt(fan_out / fan_in) P Q^T. Q (fan_in x r) carries
    over between steps, r = ceil(rank_fraction * min(fan_out, fan_in)).

    Sharded matrices (DTensors split over `outer_shard_mesh`, `inner_shard_mesh` or both, in
    blocks) never travel whole: each rank multiplies its block, and only the low-rank factors
    P (fan_out x r) and R (fan_in x r) are summed over the shard meshes. Q stays replicated.
    With a `replicate_mesh` and `replicate_mesh_grad_sync`, the replicas do not all-reduce the
    matrices' gradients at all: P and R are averaged over the replicas instead (compressed
    data-parallel sync), so each replica keeps its own momentum while the weights stay equal.
    """

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
        cautious_wd=False,
        scheduled_wd=False,
        epsilon=1e-8,
        qr_method="cholesky_qr",
        seed=0,
        compile=False,
    ):
        defaults = dict(
            lr=lr,
            mu=mu,
            betas=betas,
            weight_decay=weight_decay,
            cautious_wd=cautious_wd,
            scheduled_wd=scheduled_wd,
            epsilon=epsilon,
            rank_fraction=rank_fraction,
            qr_method=qr_method,
            seed=seed,
        )
        groups = [mesh_group(m) for m in (outer_shard_mesh, inner_shard_mesh)]
        self.shard_comms = [Communicator(g) for g in groups if g is not None]
        super().__init__(params, defaults, replicate_mesh=replicate_mesh, compile=compile)
        self.compressed = self.replicas is not None and replicate_mesh_grad_sync

    splits_rows = False

    def _shards_supported(self, p, group):
        return is_block_sharded(p) and distinct_shards(p) == math.prod(c.world_size for c in self.shard_comms)

    def _communicators(self):
        return [*self.shard_comms, self.replicas]

    def _new_matrix_state(self, p, group):
        batch, m, n = as_matrices(p, False).shape
        rank = low_rank(group["rank_fraction"], m, n)
        # A seeded start for Q, so that every rank and every run begins from the same basis.
        generator = torch.Generator().manual_seed(hash((group["seed"], self._index[p])) % 2**63)
        # Orthonormal, not merely unit columns: a Gaussian square Q can have a condition number
        # in the hundreds, which the first power-iteration step would inherit.
        q = torch.linalg.qr(torch.randn(batch, n, rank, generator=generator)).Q
        return {"momentum": torch.zeros_like(p), "q": q.to(p.device, p.dtype)}

    @classmethod
    def _matrix_state_bytes(cls, shape, local_numel, dtype, arguments):
        m, n = shape
        q = n * low_rank(arguments["rank_fraction"], m, n)  # Q, whole on every rank
        return (local_numel + q) * dtype.itemsize

    @classmethod
    def plan_bucket(cls, planner, names, shape):
        # The low-rank factors P (m x r) and R (n x r) summed over the shard meshes, then
        # averaged over the replicas under compressed sync.
        m, n = shape
        r = low_rank(planner.arguments["rank_fraction"], m, n)
        for height in (m, n):
            numel = len(names) * height * r
            if planner.layout.sharded:
                for mesh in ("fs", "tp"):
                    if mesh in planner.groups:
                        planner.traffic.all_reduce(
                            len(planner.groups[mesh]), numel, planner.param_bytes, mesh
                        )
            if planner.compressed:
                planner.traffic.all_reduce(len(planner.replicas), numel, planner.param_bytes, "dp")

    def _reduce(self, partial):
        """Sum a low-rank factor over the shard meshes, then average it over the replicas."""
        for comm in self.shard_comms:
            comm.all_reduce_sum(partial)
        if self.compressed:
            self.replicas.all_reduce_sum(partial).div_(self.replicas.world_size)
        return partial

    def _update_bucket(self, group, slots):
        params = [slot.param for slot in slots]
        mu, eps = group["mu"], group["epsilon"]
        sharded = isinstance(params[0], DTensor)
        # A sharded matrix's block, possibly empty, as a batch of one.
        matrices = (lambda t: t.to_local().unsqueeze(0)) if sharded else (lambda t: as_matrices(t, False))
        blocks = [local_block(p) for p in params]
        states = [self.state[p] for p in params]
        momenta = [matrices(s["momentum"]) for s in states]
        torch._foreach_add_(momenta, [matrices(p.grad) for p in params])
        m, n = as_matrices(params[0], False).shape[-2:]

        def reduced(factors, height, offsets):
            # Place each rank's rows of a low-rank factor in a full-height buffer and sum.
            full = torch.zeros(
                len(factors),
                *factors[0].shape[:-2],
                height,
                factors[0].size(-1),
                device=factors[0].device,
                dtype=factors[0].dtype,
            )
            for x, (f, start) in enumerate(zip(factors, offsets, strict=True)):
                full[x, ..., start : start + f.size(-2), :] = f
            return self._reduce(full) if sharded or self.compressed else full

        ps = reduced(
            [
                mom @ s["q"][:, c0 : c0 + nc]
                for mom, s, (_, _, c0, nc) in zip(momenta, states, blocks, strict=True)
            ],
            m,
            [b[0] for b in blocks],
        )
        bases = [orthonormalize_columns(pf, group["qr_method"]) for pf in ps]
        rows = [basis[:, r0 : r0 + nr] for basis, (r0, nr, _, _) in zip(bases, blocks, strict=True)]
        rs = reduced([mom.mT @ b for mom, b in zip(momenta, rows, strict=True)], n, [b[2] for b in blocks])
        updates = []
        for mom, state, row_basis, r, (_, _, c0, nc) in zip(momenta, states, rows, rs, blocks, strict=True):
            cols = slice(c0, c0 + nc)
            mom.baddbmm_(row_basis, r[:, cols].mT, alpha=-(1 - mu))  # error feedback
            norms = r.norm(dim=-2, keepdim=True)
            # A zero column of R (a zero momentum) keeps its old direction instead of dying.
            state["q"] = torch.where(norms > eps, r / norms.clamp_min(eps), state["q"])
            updates.append(row_basis @ state["q"][:, cols].mT)
        weights = [local_tensor(p) for p in params]
        self._apply(
            group, weights, [u.view_as(w) for u, w in zip(updates, weights, strict=True)], math.sqrt(m / n)
        )
