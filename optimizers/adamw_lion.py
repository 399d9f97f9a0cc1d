"""AdamW and Lion alone: the optimizer of a run with no orthonormal algorithm."""

from optimizers.base import BaseOptimizer


class AdamWLion(BaseOptimizer):
    """AdamW and Lion only (`algorithm` "adamw", the default, or "lion" per group)."""

    def __init__(self, params, lr=0.001, betas=(0.9, 0.95), weight_decay=0.01, epsilon=1e-8):
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay, "epsilon": epsilon})
