"""Element-wise updates for parameters that are not matrices: AdamW and Lion."""

import math

import torch

SCALAR_ALGORITHMS = ("adamw", "lion")


def adamw_update(params, grads, exp_avgs, exp_avg_sqs, steps, lr, betas, weight_decay, epsilon):
    """One decoupled-weight-decay Adam step on lists of tensors (steps are 0-d CPU tensors)."""
    beta1, beta2 = betas
    torch._foreach_add_(steps, 1)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    torch._foreach_mul_(params, 1 - lr * weight_decay)
    counts = [s.item() for s in steps]
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, [math.sqrt(1 - beta2**n) for n in counts])
    torch._foreach_add_(denom, epsilon)
    torch._foreach_addcdiv_(params, exp_avgs, denom, [-lr / (1 - beta1**n) for n in counts])


def lion_update(params, grads, exp_avgs, lr, betas, weight_decay):
    """One Lion step: the sign of an interpolation of momentum and gradient."""
    beta1, beta2 = betas
    direction = torch._foreach_lerp(exp_avgs, grads, 1 - beta1)
    torch._foreach_sign_(direction)
    torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_add_(params, direction, alpha=-lr)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta2)


def new_scalar_state(p, algorithm):
    """The state of a parameter under AdamW or Lion."""
    if algorithm == "adamw":
        return {
            "exp_avg": torch.zeros_like(p),
            "exp_avg_sq": torch.zeros_like(p),
            "step": torch.zeros((), dtype=torch.float32),
        }
    return {"exp_avg": torch.zeros_like(p)}


def scalar_state_bytes(algorithm, numel, dtype):
    """The bytes of the AdamW or Lion state of `numel` elements of a parameter in `dtype`."""
    state = new_scalar_state(torch.empty(numel, dtype=dtype, device="meta"), algorithm)
    return sum(t.numel() * t.element_size() for t in state.values())


def scalar_step(group, params, states):
    """One AdamW or Lion step (the group's `algorithm`) on the parameters that have gradients."""
    grads = [p.grad for p in params]
    exp_avgs = [s["exp_avg"] for s in states]
    if group["algorithm"] == "adamw":
        adamw_update(
            params,
            grads,
            exp_avgs,
            [s["exp_avg_sq"] for s in states],
            [s["step"] for s in states],
            group["lr"],
            group["betas"],
            group["weight_decay"],
            group["epsilon"],
        )
    else:
        lion_update(params, grads, exp_avgs, group["lr"], group["betas"], group["weight_decay"])
