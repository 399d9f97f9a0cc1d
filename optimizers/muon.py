"""Muon: momentum, then Newton-Schulz orthonormalization of each matrix's update."""

import torch

from optimizers.matrix_optimizer import MatrixOptimizer, as_matrices, lr_scale


def momentum_inputs(momenta, grads, mu, nesterov):
    """M <- mu M + G in place; returns the orthonormalization inputs (G + mu M with
    Nesterov, else M). mu may be a 0-d tensor."""
    torch._foreach_mul_(momenta, mu)
    torch._foreach_add_(momenta, grads)
    if not nesterov:
        return momenta
    inputs = torch._foreach_mul(momenta, mu)
    torch._foreach_add_(inputs, grads)
    return inputs


class Muon(MatrixOptimizer):
    """M <- mu M + G; U = G + mu M with Nesterov, else M; W <- W (1 - lr wd) - lr s NS(U),
    where s is the `adjust_lr` scale of the matrix shape."""

    def __init__(
        self,
        params,
        distributed_mesh=None,
        lr=0.01,
        mu=0.95,
        betas=(0.9, 0.95),
        weight_decay=0.01,
        cautious_wd=False,
        scheduled_wd=False,
        epsilon=1e-8,
        nesterov=False,
        adjust_lr="spectral_norm",
        flatten=False,
        use_triton=False,
        use_polar_express=True,
        use_gram_newton_schulz="auto",
        ns_dtype=None,
        replicate_mesh=None,
        compile=False,
        **extra_defaults,
    ):
        defaults = dict(
            lr=lr,
            mu=mu,
            betas=betas,
            weight_decay=weight_decay,
            cautious_wd=cautious_wd,
            scheduled_wd=scheduled_wd,
            epsilon=epsilon,
            nesterov=nesterov,
            adjust_lr=adjust_lr,
            flatten=flatten,
            use_polar_express=use_polar_express,
            use_gram_newton_schulz=use_gram_newton_schulz,
            ns_dtype=ns_dtype,
            **extra_defaults,
        )
        super().__init__(params, defaults, distributed_mesh, use_triton, replicate_mesh, compile)

    def _new_matrix_state(self, p, group):
        return {"momentum": torch.zeros_like(p)}

    @classmethod
    def _matrix_state_bytes(cls, shape, local_numel, dtype, arguments):
        return local_numel * dtype.itemsize  # the momentum's block

    @classmethod
    def plan_bucket(cls, planner, names, shape):
        if planner.layout.sharded:
            planner.orthonormalize_blocks([planner.blocks(name, shape) for name in names], shape)
        else:
            planner.orthonormalize(len(names), *shape)

    def _orthonormalized(self, group, states, updates, row_starts, shape, sharded):
        """Hook for variants: adjust the orthonormalized updates in place. updates[i] is this
        rank's block (batch, rows, cols) of slot i's matrices, starting at row row_starts[i]
        of the full matrix of `shape`; `sharded` says the blocks are parts of matrices spread
        over distributed_mesh."""

    def _update_bucket(self, group, slots):
        # A sharded bucket works on this rank's blocks: in-place updates of the local tensors
        # are updates of the shards.
        sharded = slots[0].blocks is not None
        grads = [s.grad for s in slots]
        states = [s.state for s in slots]
        momenta = [s["momentum"] for s in states]
        mu = self._hyperparameters(group, grads[0].device, "mu")["mu"]
        inputs = self._run(momentum_inputs, momenta, grads, mu, group["nesterov"])
        flatten = group["flatten"]
        shape = slots[0].shape
        if sharded:
            blocks = [s.blocks for s in slots]
            done = yield from self._orthonormalize_blocks(group, inputs, blocks, shape)
            updates = [u.unsqueeze(0) for u in done]
            row_starts = [b[self.comm.rank].row0 for b in blocks]
        else:
            stacked = torch.cat([as_matrices(u, flatten) for u in inputs])
            ortho = yield from self._orthonormalize(group, stacked, shared=slots[0].first_matrix is None)
            updates = ortho.split([len(as_matrices(s.weight, flatten)) for s in slots])
            row_starts = [0] * len(slots)
        self._orthonormalized(group, states, updates, row_starts, shape, sharded)
        updates = [u.view(s.weight.shape) for u, s in zip(updates, slots, strict=True)]
        self._apply(group, [s.weight for s in slots], updates, lr_scale(group["adjust_lr"], *shape))
