"""Training FLOPs per token of a GPT, split by where they go."""


def training_flops(model):
    """{part: FLOPs per trained token}: 6 per weight of each matmul (forward 2, backward 4), by
    parameter role, and the attention scores with their weighted sum, 12 x width x sequence per
    layer, counted over the whole sequence (an upper bound for causal attention). The embedding
    is a lookup and the norm gains are elementwise: neither is a matmul."""
    roles = model.param_roles()
    config = model.config
    return {
        "hidden matrices": 6 * sum(p.numel() for _, p in roles["matrix"]),
        "lm_head": 6 * sum(p.numel() for _, p in roles["lm_head"]),
        "attention scores": 12 * config.n_layer * config.model_dim * config.sequence_length,
    }
