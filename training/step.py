"""One training step: accumulate the micro-batches' gradients, agree over the ranks on what
they hold, then clip and step, or skip the step when a value is not finite.

train.py and scripts/bench_train.py both call these, so the benchmark times what training runs.
"""

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from models.parallelize import grad_sync, sync_tp_partial_grads
from training.grad_clip import clip_grad_norm


class NonFiniteError(RuntimeError):
    """The loss or the gradient norm was NaN or inf more often than max_skipped_steps allows."""

    def __init__(self, step, outcome, max_skipped_steps):
        values = ", ".join(f"{name} is {getattr(outcome, name)}" for name in outcome.nonfinite)
        super().__init__(
            f"step {step}: {values}; stopped before its optimizer step (max_skipped_steps "
            f"{max_skipped_steps}), and the checkpoints written before it are kept"
        )


@dataclass
class StepOutcome:
    """What a step's one all-reduce told every rank: the same values on all of them."""

    train_loss: float  # mean over the ranks and micro-batches
    grad_norm: float  # before clipping
    stop_requested: bool  # some rank was asked to stop (preemption)

    @property
    def nonfinite(self):
        """The names of the values that are NaN or inf (none when the step can be taken)."""
        return [name for name in ("train_loss", "grad_norm") if not math.isfinite(getattr(self, name))]


def accumulate_gradients(forward, next_batch, accum_steps, autocast):
    """Forward and backward `accum_steps` micro-batches from `next_batch()`; the gradients
    are reduced over the ranks once, on the last. Returns this rank's mean loss (0-d tensor)."""
    train_loss = None
    for micro in range(accum_steps):
        x, y = next_batch()
        with grad_sync(forward, sync=micro == accum_steps - 1), autocast:
            loss = forward(x, y)
        (loss / accum_steps).backward()
        part = loss.detach().float() / accum_steps
        train_loss = part if train_loss is None else train_loss + part
    return train_loss


def agree(train_loss, grad_norm, stop_requested, world_size):
    """One all-reduce and one wait for the host: the loss averaged over ranks, and whether any
    rank was asked to stop. A NaN on one rank makes the sum NaN, so every rank sees it."""
    # A fill on the device: a tensor made from a Python number would be a copy from the host,
    # which waits for the device's queue.
    flags = train_loss.new_full((), float(stop_requested))
    summed = torch.stack([train_loss, flags])
    if world_size > 1:
        dist.all_reduce(summed)
    loss_sum, stops, norm = torch.cat([summed, grad_norm.float().view(1)]).tolist()
    return StepOutcome(loss_sum / world_size, norm, stops > 0)


def apply_gradients(
    model, optimizer, train_loss, lr_scale, grad_clip, stop_requested, world_size, tp_mesh=None
):
    """Clip the gradients and take the optimizer step at `lr_scale` x each group's base lr;
    skip the step, weights and optimizer state untouched, when the loss or the gradient norm is
    not finite on any rank. The gradients are cleared either way. Returns the StepOutcome."""
    if tp_mesh is not None:
        sync_tp_partial_grads(model, tp_mesh)
    grad_norm = clip_grad_norm(model.parameters(), grad_clip or math.inf)
    outcome = agree(train_loss, grad_norm, stop_requested, world_size)
    if not outcome.nonfinite:
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_scale
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return outcome
