"""Activation checkpointing applied to a built GPT, apart from its definition.

A checkpointed block keeps only its input in the forward and recomputes its activations in
the backward: memory for compute. The block's own `forward` is wrapped in place rather than
the block put inside a wrapper module, so parameter names, and with them the checkpoints,
the optimizer state and the FSDP and TP plans, stay the same whatever the mode.
"""

from torch.utils.checkpoint import checkpoint

AC_MODES = ("none", "full", "selective")


def checkpointed_blocks(n_layer, mode, every):
    """The indices of the blocks that `mode` checkpoints: none, all, or 0, every, 2 x every, ..."""
    if mode not in AC_MODES:
        raise ValueError(f"activation_checkpointing must be one of {', '.join(AC_MODES)}, got '{mode}'")
    if mode == "none":
        return []
    return list(range(0, n_layer, 1 if mode == "full" else every))


def apply_activation_checkpointing(model, mode, every):
    """Make the blocks that `checkpointed_blocks` names recompute their activations in the backward.

    Apply it before FSDP and TP wrap the blocks' calls, or after: their hooks run around the
    block's call, outside the recomputed forward, so the recompute finds the weights gathered
    again by FSDP's pre-backward hook.
    """
    for index in checkpointed_blocks(len(model.blocks), mode, every):
        block = model.blocks[index]
        # Non-reentrant: it works with torch.compile, DTensor weights and inputs that need no grad.
        block.forward = _recomputed(block.forward)
    return model


def _recomputed(forward):
    def run(*args):
        return checkpoint(forward, *args, use_reentrant=False)

    return run
