"""Gradient-norm clipping over parameters that may live on different device meshes."""

import math

import torch

from parallel.sharding import global_squared_norms, local_tensor


def clip_grad_norm(params, max_norm):
    """Scale the gradients in place so their global l2 norm is at most `max_norm`; return the
    norm before clipping, the same on every rank.

    torch's clip_grad_norm_ stacks per-parameter norms, which fails when FSDP x TP leaves some
    parameters on the 2-D (fs, tp) mesh and others on the fs mesh alone; `global_squared_norms`
    sums local pieces on any meshes with one all-reduce.
    """
    grads = [p.grad for p in params if p.grad is not None]
    total = global_squared_norms(grads).sum().sqrt()
    if math.isfinite(max_norm):
        torch._foreach_mul_([local_tensor(g) for g in grads], torch.clamp(max_norm / (total + 1e-6), max=1.0))
    return total
