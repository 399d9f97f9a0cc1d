"""Element-wise updates for parameters that are not matrices (AdamW and Lion), and the
optimizer base class that owns param-group checking, eager state and the step loop."""

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


class ScalarOptimizer(torch.optim.Optimizer):
    """AdamW or Lion per param group (`algorithm`), with state created for every parameter up
    front. Subclasses add a matrix algorithm of their own name."""

    def __init__(self, params, defaults):
        defaults = {"algorithm": self.algorithm_name(), **defaults}
        super().__init__(params, defaults)
        # A parameter's position in the optimizer: the same on every rank and every run, so
        # per-parameter seeds derived from it agree everywhere.
        self._index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        for group in self.param_groups:
            self._check_group(group)
            for p in group["params"]:
                self.state[p] = self._new_state(p, group)

    @classmethod
    def algorithm_name(cls):
        """The `algorithm` value of this class's own update."""
        return "adamw"

    def algorithms(self):
        """The `algorithm` values a param group may take."""
        return tuple(dict.fromkeys((self.algorithm_name(), *SCALAR_ALGORITHMS)))

    def _check_group(self, group):
        if group["algorithm"] not in self.algorithms():
            raise ValueError(
                f"unknown algorithm '{group['algorithm']}'; {type(self).__name__} takes "
                f"{', '.join(self.algorithms())}"
            )
        # A group may give betas as a pair or as beta1/beta2; both are honoured.
        beta1, beta2 = group["betas"]
        group["betas"] = (group.pop("beta1", beta1), group.pop("beta2", beta2))
        for name in ("lr", "weight_decay", "epsilon"):
            if group[name] < 0:
                raise ValueError(f"{name} must be >= 0, got {group[name]}")
        if not all(0 <= b < 1 for b in group["betas"]):
            raise ValueError(f"betas must lie in [0, 1), got {group['betas']}")

    def comm_bytes(self):
        """Bytes the optimizer's collectives moved on this rank since the last call."""
        return 0

    def synchronize_for_checkpoint(self):
        """Make the state equal on every replica before a save (nothing to do here)."""

    def _new_state(self, p, group):
        if group["algorithm"] == "adamw":
            return {
                "exp_avg": torch.zeros_like(p),
                "exp_avg_sq": torch.zeros_like(p),
                "step": torch.zeros((), dtype=torch.float32),
            }
        if group["algorithm"] == "lion":
            return {"exp_avg": torch.zeros_like(p)}
        return self._new_matrix_state(p, group)

    def _new_matrix_state(self, p, group):
        raise NotImplementedError

    def _matrix_step(self, group, params):
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        """Update every parameter that has a gradient; the others are left untouched."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            states = [self.state[p] for p in params]
            if group["algorithm"] == "adamw":
                adamw_update(
                    params,
                    grads,
                    [s["exp_avg"] for s in states],
                    [s["exp_avg_sq"] for s in states],
                    [s["step"] for s in states],
                    group["lr"],
                    group["betas"],
                    group["weight_decay"],
                    group["epsilon"],
                )
            elif group["algorithm"] == "lion":
                lion_update(
                    params,
                    grads,
                    [s["exp_avg"] for s in states],
                    group["lr"],
                    group["betas"],
                    group["weight_decay"],
                )
            else:
                self._matrix_step(group, params)
        return loss


class AdamWLion(ScalarOptimizer):
    """AdamW and Lion only (`algorithm` "adamw", the default, or "lion" per group): the
    optimizer of a run with no orthonormal algorithm."""

    def __init__(self, params, lr=0.001, betas=(0.9, 0.95), weight_decay=0.01, epsilon=1e-8):
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay, "epsilon": epsilon})
