"""Gradient-norm clipping over parameters that may live on different device meshes."""

import math

import torch
import torch.distributed as dist

from optimizers.sharding import distinct_shards, local_tensor


def clip_grad_norm(params, max_norm):
    """Scale the gradients in place so their global l2 norm is at most `max_norm`; return the
    norm before clipping, the same on every rank.

    torch's clip_grad_norm_ stacks per-parameter norms, which fails when FSDP x TP leaves some
    parameters on the 2-D (fs, tp) mesh and others on the fs mesh alone. Here every rank sums
    the squares of its local pieces, each weighted by (distinct pieces / world size) so that
    copies held by several ranks count once, and one all-reduce over all ranks adds them up.
    """
    grads = [p.grad for p in params if p.grad is not None]
    world = dist.get_world_size() if dist.is_initialized() else 1
    locals_ = [local_tensor(g) for g in grads]
    # The weights multiply as Python numbers: a tensor of them would be a host-to-device copy,
    # which waits for the device's queue, every step.
    norms = torch._foreach_norm(locals_, dtype=torch.float32)
    weights = [distinct_shards(g) / world for g in grads]
    squares = torch._foreach_mul(torch._foreach_mul(norms, norms), weights)
    total = torch.stack(squares).sum()
    if world > 1:
        dist.all_reduce(total)
    total = total.sqrt()
    if math.isfinite(max_norm):
        torch._foreach_mul_(locals_, torch.clamp(max_norm / (total + 1e-6), max=1.0))
    return total
