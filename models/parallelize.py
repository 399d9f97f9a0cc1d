"""Model parallelism applied to a built GPT, apart from its definition (as in torchtitan): TP,
FSDP2, DDP, and the gradient sync of their micro-batches."""

import contextlib

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    loss_parallel,
    parallelize_module,
)

from parallel.sharding import local_tensor

# Each block matrix's TP style. Colwise splits a Linear's output features (its weight's dim 0),
# Rowwise its input features (dim 1).
BLOCK_TP_PLAN = {
    "attn.q": ColwiseParallel,
    "attn.k": ColwiseParallel,
    "attn.v": ColwiseParallel,
    "attn.out": RowwiseParallel,
    "mlp.fc": ColwiseParallel,
    "mlp.proj": RowwiseParallel,
}


def tp_weight_dim(name):
    """The weight dimension that TP splits of the parameter `name` (as named_parameters gives
    it), or None for one it leaves whole: the embedding's and lm_head's vocabulary rows, and
    the block matrices' dimension of their style."""
    if name in ("embed.weight", "lm_head.weight"):
        return 0
    module = name.split(".", 2)[-1].removesuffix(".weight")
    style = BLOCK_TP_PLAN.get(module) if name.startswith("blocks.") else None
    return None if style is None else (0 if style is ColwiseParallel else 1)


def apply_tp(model, tp_mesh):
    """Shard the model over `tp_mesh` (Megatron style): q, k, v and the MLP input by output
    features (heads), the attention output and the MLP output by input features, and the
    embedding and lm_head over the vocabulary. Activations between blocks stay replicated.

    The logits stay split over the vocabulary: each rank holds its 1/tp of them (in the compute
    dtype, their fp32 copy and its gradient, 8 GB a rank at 1B if whole), and the loss is taken
    on the split logits under `tp_loss_context`. The model's outputs are plain tensors again:
    the loss this rank's part of (every rank holds the same value), or the whole logits."""
    parallelize_module(
        model,
        tp_mesh,
        {
            "embed": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
            "lm_head": ColwiseParallel(use_local_output=False),
        },
    )
    for block in model.blocks:
        parallelize_module(block, tp_mesh, {name: style() for name, style in BLOCK_TP_PLAN.items()})
    model.register_forward_hook(_plain_output)
    return model


def _plain_output(module, args, output):
    # The loss (a replicated scalar) as this rank's tensor, through which the backward still
    # reaches the split logits; logits asked for themselves are gathered whole.
    if not isinstance(output, DTensor):
        return output
    return output.to_local() if output.ndim == 0 else output.full_tensor()


def tp_loss_context(tp_enabled):
    """The context that a micro-batch's forward and backward (or an evaluation) must run in:
    under TP, cross-entropy on the vocabulary-split logits (`loss_parallel`), so that no rank
    ever holds them whole."""
    return loss_parallel() if tp_enabled else contextlib.nullcontext()


def tp_partial_grad_params(model):
    """Parameters whose gradient each TP rank holds only a part of: the QK-norm gains are shared
    by all heads, but a rank sees only its own heads."""
    return [p for b in model.blocks for p in (*b.attn.q_norm.parameters(), *b.attn.k_norm.parameters())]


def sync_tp_partial_grads(model, tp_mesh):
    """Sum the partial gradients of `tp_partial_grad_params` over the TP ranks, in one
    all-reduce of their concatenation."""
    grads = [local_tensor(p.grad) for p in tp_partial_grad_params(model) if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=tp_mesh.get_group())
    torch._foreach_copy_(
        grads,
        [part.view_as(g) for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True)],
    )


def fsdp_dim(tp_dim):
    """The dimension FSDP shards of a parameter whose TP-split dimension is `tp_dim` (None: not
    split): the one tensor parallelism leaves whole, so every rank holds one contiguous block."""
    return 1 if tp_dim == 0 else 0


def fsdp_placement(param):
    """FSDP's shard of a parameter (`fsdp_dim` of its TP placement)."""
    return Shard(fsdp_dim(0 if isinstance(param, DTensor) and Shard(0) in param.placements else None))


def apply_fsdp(model, mesh, bf16_compute, matrix_mesh=None):
    """Shard every block, then the root, with FSDP2 over `mesh`: the fs mesh, or dp x fs for
    HSDP (replicated over dp, sharded over fs).

    With `bf16_compute`, the blocks' matrices are all-gathered in bf16 for the forward and
    backward, and their gradients reduce in fp32. Everything else computes as DDP under bf16
    autocast does: the embedding, the norm gains and the lm_head are gathered in fp32 (the
    norm gains of a block as one group of their own, one small extra all-gather), and the
    blocks' inputs, the residual stream and the rotary tables, are never cast to bf16.
    Autocast then casts each matmul's inputs, so both layouts round the same values.

    With `matrix_mesh` (the fs mesh alone), the blocks' matrices are sharded over it instead,
    so FSDP never all-reduces their gradients over the replicas: compressed sync does that
    in the optimizer."""
    fp32 = MixedPrecisionPolicy()
    matrices = (
        MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False
        )
        if bf16_compute
        else fp32
    )

    def shard(modules, over, policy):
        fully_shard(modules, mesh=over, mp_policy=policy, shard_placement_fn=fsdp_placement)

    for block in model.blocks:
        if matrix_mesh is not None:
            for linear in (m for m in block.modules() if isinstance(m, torch.nn.Linear)):
                shard(linear, matrix_mesh, matrices)
            shard(block, mesh, fp32)  # what is left of the block: its norm gains
        else:
            shard([m for m in block.modules() if isinstance(m, torch.nn.RMSNorm)], mesh, fp32)
            shard(block, mesh, matrices)
    shard(model, mesh, fp32)
    return model


def wrap_model(model, ctx, unsynced=()):
    """Wrap the model for DDP when there is more than one rank and FSDP does not shard it.
    DDP leaves the gradients of the parameters named in `unsynced` alone (compressed sync
    averages them in the optimizer)."""
    if ctx.world_size == 1 or isinstance(model, FSDPModule):
        return model
    DDP = torch.nn.parallel.DistributedDataParallel
    DDP._set_params_and_buffers_to_ignore_for_model(model, list(unsynced))
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    # Gradients as views of DDP's buckets, not a second fp32 copy of every gradient (4 GB at
    # 1B); and no buffer broadcast before each forward: the rotary tables are the model's only
    # buffers, computed alike on every rank.
    return DDP(model, device_ids=device_ids, gradient_as_bucket_view=True, broadcast_buffers=False)


def grad_sync(model, sync):
    """A context for one micro-batch's backward: gradients are reduced only when `sync`, so
    they sync once per optimizer step rather than once per micro-batch (DDP and FSDP).
    `model` may be compiled: torch.compile's wrapper hides the module it compiled."""
    model = getattr(model, "_orig_mod", model)
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)
    elif not sync and isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()
