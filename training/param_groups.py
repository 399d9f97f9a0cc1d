"""Optimizer param groups built from the model's declared parameter roles."""

from models.gpt_model import ROLES


class ParamGroupError(ValueError):
    """Param groups that leave a parameter out, or put one in twice."""


def build_param_groups(model, cfg):
    """One group per role, each tagged with `role` and its unscheduled `base_lr`.

    The embedding gets no weight decay; the other roles get cfg.weight_decay.
    """
    roles = model.param_roles()
    groups = []
    for role in ROLES:
        params = [p for _, p in roles[role]]
        if params:
            wd = 0.0 if role == "embedding" else cfg.weight_decay
            groups.append(
                {"role": role, "params": params, "base_lr": cfg.lr, "lr": cfg.lr, "weight_decay": wd}
            )
    check_param_groups(model, groups)
    return groups


def check_param_groups(model, groups):
    """Raise ParamGroupError unless every parameter of the model is in exactly one group."""
    names = {id(p): n for n, p in model.named_parameters()}
    seen = {}
    for group in groups:
        for p in group["params"]:
            if id(p) in seen:
                name, first = names.get(id(p), "?"), seen[id(p)]
                raise ParamGroupError(
                    f"parameter {name} is in both the {first} and the {group['role']} group"
                )
            seen[id(p)] = group["role"]
    missing = [n for i, n in names.items() if i not in seen]
    if missing:
        raise ParamGroupError(f"parameters in no optimizer group: {', '.join(missing)}")


def describe_param_groups(groups):
    """One line per group: role, tensor count, parameter count, lr and weight decay."""
    return [
        f"{g['role']:>9}: {len(g['params']):3d} tensors, {sum(p.numel() for p in g['params']):>12,} "
        f"params, lr {g['base_lr']:g}, weight_decay {g['weight_decay']:g}"
        for g in groups
    ]
