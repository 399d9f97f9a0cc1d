"""Model parallelism applied to a built GPT, apart from its definition (as in torchtitan)."""

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def apply_fsdp(model, mesh, bf16_compute):
    """Shard every block, then the root, with FSDP2 over `mesh`: the fs mesh, or dp x fs for
    HSDP (replicated over dp, sharded over fs). With `bf16_compute`, parameters are cast to
    bf16 for the forward and backward, while gradients reduce and weights stay in fp32."""
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if bf16_compute
        else MixedPrecisionPolicy()
    )
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model
