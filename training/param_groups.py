"""Optimizer param groups built from the model's declared parameter roles, and the optimizer."""

import math

import torch

from models.gpt_model import ROLES
from optimizers import registry
from optimizers.matrix_optimizer import default_ns_dtype
from training.config import to_dict


class ParamGroupError(ValueError):
    """Param groups that would silently train a parameter with the wrong algorithm."""


def lm_head_lr_scale(cfg):
    """The lm_head's lr factor: the config's, else 1/sqrt(model_dim) for Lion and 1 for AdamW."""
    if cfg.lm_head_lr_scale is not None:
        return cfg.lm_head_lr_scale
    return 1 / math.sqrt(cfg.model_dim) if cfg.scalar_opt == "lion" else 1.0


def build_param_groups(model, cfg):
    """One group per role, tagged with `role`, its `algorithm` and its unscheduled `base_lr`.

    matrix: the main algorithm (`optimizer`); vector, embedding and lm_head: `scalar_opt`,
    at `scalar_lr`, the lm_head scaled by `lm_head_lr_scale`, the embedding without weight decay.
    With `ortho_per_head`, q, k and v form a second matrix group with `num_heads` = `n_head`.
    """
    scalar_lr = cfg.lr if cfg.scalar_lr is None else cfg.scalar_lr
    settings = {
        "matrix": (cfg.optimizer, cfg.lr, cfg.weight_decay),
        "vector": (cfg.scalar_opt, scalar_lr, cfg.weight_decay),
        "embedding": (cfg.scalar_opt, scalar_lr, 0.0),
        "lm_head": (cfg.scalar_opt, scalar_lr * lm_head_lr_scale(cfg), cfg.weight_decay),
    }
    roles = model.param_roles()
    per_head = set(model.head_matrices()) if cfg.ortho_per_head else set()
    groups = []
    for role in ROLES:
        params = [p for _, p in roles[role]]
        algorithm, lr, wd = settings[role]
        group = {"role": role, "algorithm": algorithm, "base_lr": lr, "lr": lr, "weight_decay": wd}
        heads = [p for p in params if p in per_head]
        if heads:  # q, k and v orthonormalized per head, in a group of their own
            groups.append({**group, "params": heads, "num_heads": cfg.n_head})
        rest = [p for p in params if p not in per_head]
        if rest:
            groups.append({**group, "params": rest})
    check_param_groups(model, groups, cfg.optimizer)
    return groups


def check_param_groups(model, groups, matrix_algorithm):
    """Raise ParamGroupError unless every parameter is in exactly one group, the embedding and
    the lm_head are outside the `matrix_algorithm` groups, and every hidden matrix is inside."""
    names = {id(p): n for n, p in model.named_parameters()}
    roles = {id(p): role for role, params in model.param_roles().items() for _, p in params}
    seen = {}
    for group in groups:
        for p in group["params"]:
            name, algorithm = names.get(id(p), "?"), group["algorithm"]
            if id(p) in seen:
                raise ParamGroupError(
                    f"parameter {name} is in two param groups ({seen[id(p)]} and {algorithm})"
                )
            seen[id(p)] = algorithm
            role = roles.get(id(p))
            if algorithm == matrix_algorithm != "adamw" and role in ("embedding", "lm_head"):
                raise ParamGroupError(
                    f"{role} parameter {name} is in the {algorithm} group; the embedding and the lm_head "
                    "need a scalar algorithm (adamw or lion)"
                )
            if role == "matrix" and algorithm != matrix_algorithm:
                raise ParamGroupError(
                    f"hidden matrix {name} is left out of the {matrix_algorithm} group (it is in {algorithm})"
                )
    missing = [n for i, n in names.items() if i not in seen]
    if missing:
        raise ParamGroupError(f"parameters in no optimizer group: {', '.join(missing)}")


def describe_param_groups(groups):
    """One line per group: role, algorithm, tensor count, parameter count, lr and weight decay."""
    return [
        f"{g['role']:>9}: {g['algorithm']:>8}, {len(g['params']):3d} tensors, "
        f"{sum(p.numel() for p in g['params']):>12,} params, lr {g['base_lr']:g}, "
        f"weight_decay {g['weight_decay']:g}"
        for g in groups
    ]


def newton_schulz_note(cfg, device):
    """The line that says in which dtype the optimizer's Newton-Schulz runs on `device`, and
    why; None for an optimizer without one."""
    if not registry.reads(cfg.optimizer, "ns_dtype"):
        return None
    if cfg.ns_dtype != "auto":
        return f"Newton-Schulz in {cfg.ns_dtype} on {device} (ns_dtype)"
    if default_ns_dtype(device) == torch.bfloat16:
        return f"Newton-Schulz in bf16 on {device} (ns_dtype auto: it has native bf16)"
    return f"Newton-Schulz in fp32 on {device} (ns_dtype auto: it has no native bf16)"


def build_optimizer(groups, cfg, meshes=None):
    """The optimizer of `cfg.optimizer` over `groups`, with the config's hyperparameters.

    `meshes` (from parallel.layout.optimizer_meshes; none in one process) maps the optimizers'
    mesh arguments to their meshes: Muon, NorMuon, Dion2 and NorDion2 split or exchange their
    work over distributed_mesh; Dion works over outer_shard_mesh and inner_shard_mesh;
    compressed sync runs over replicate_mesh.
    """
    return registry.build_optimizer(cfg.optimizer, groups, to_dict(cfg), meshes)
