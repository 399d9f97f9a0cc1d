"""Every optimizer a run can choose, by its config name: its class, the config keys it reads
and the constructor argument each feeds, and the meshes it takes.

This is the only list of optimizers and of their keys: the training config takes its choices
and checks from here, and the param groups build the optimizer through it.
"""

from typing import NamedTuple

import torch

from optimizers.adamw_lion import AdamWLion
from optimizers.dion import Dion
from optimizers.dion2 import Dion2
from optimizers.hyperparameters import check_value
from optimizers.muon import Muon
from optimizers.nordion2 import NorDion2
from optimizers.normuon import NorMuon


class OptimizerSpec(NamedTuple):
    """An optimizer: its class, {config key: constructor argument}, its mesh arguments, and
    the config keys that shape its param groups rather than feed its constructor."""

    cls: type
    arguments: dict
    meshes: tuple = ()
    group_keys: tuple = ()


COMMON = {"lr": "lr", "weight_decay": "weight_decay"}
# The weight decay's variants, for every orthonormal optimizer.
DECAY = {"cautious_wd": "cautious_wd", "scheduled_wd": "scheduled_wd"}
NEWTON_SCHULZ = {
    "use_polar_express": "use_polar_express",
    "use_gram_newton_schulz": "use_gram_newton_schulz",
    "use_triton": "use_triton",
    "ns_dtype": "ns_dtype",
    "compile": "compile",
}
# Newton-Schulz's compute dtype as the config spells it; auto follows the hardware.
NS_DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp32": torch.float32}
# Config values that reach the constructor as other objects.
ARGUMENT_VALUES = {"ns_dtype": NS_DTYPES}
MUON = {
    **COMMON,
    **DECAY,
    **NEWTON_SCHULZ,
    "mu": "mu",
    "nesterov": "nesterov",
    "adjust_lr": "adjust_lr",
}
DION2 = {
    **COMMON,
    **DECAY,
    **NEWTON_SCHULZ,
    "ortho_fraction": "fraction",
    "match_muon_rms": "match_muon_rms",
    "adjust_lr": "adjust_lr",
    "selection": "selection",
    "selection_scope": "selection_scope",
    "decay": "decay",
    "seed": "seed",
    "replicate_mesh_grad_sync": "replicate_mesh_grad_sync",
}
SPLITS_WORK = ("distributed_mesh", "replicate_mesh")
# Newton-Schulz optimizers cut matrices into per-head blocks (the num_heads group option).
PER_HEAD = ("ortho_per_head",)

OPTIMIZERS = {
    "dion2": OptimizerSpec(Dion2, {**DION2, "mu": "ef_decay"}, SPLITS_WORK, PER_HEAD),
    "nordion2": OptimizerSpec(
        NorDion2, {**DION2, "mu": "mu", "muon_beta2": "muon_beta2"}, SPLITS_WORK, PER_HEAD
    ),
    "muon": OptimizerSpec(Muon, MUON, SPLITS_WORK, PER_HEAD),
    "normuon": OptimizerSpec(NorMuon, {**MUON, "muon_beta2": "muon_beta2"}, SPLITS_WORK, PER_HEAD),
    "dion": OptimizerSpec(
        Dion,
        {
            **COMMON,
            **DECAY,
            "mu": "mu",
            "ortho_fraction": "rank_fraction",
            "seed": "seed",
            "compile": "compile",
            "replicate_mesh_grad_sync": "replicate_mesh_grad_sync",
        },
        ("replicate_mesh", "outer_shard_mesh", "inner_shard_mesh"),
    ),
    "adamw": OptimizerSpec(AdamWLion, COMMON),
}

# The config keys that some optimizer reads.
OPTIMIZER_KEYS = tuple(
    dict.fromkeys(key for spec in OPTIMIZERS.values() for key in (*spec.arguments, *spec.group_keys))
)


def reads(name, key):
    """Whether optimizer `name` reads the config key `key`."""
    return key in OPTIMIZERS[name].arguments or key in OPTIMIZERS[name].group_keys


def uses_newton_schulz(name):
    """Whether optimizer `name` orthonormalizes by Newton-Schulz (and so has an ns_dtype)."""
    return name in OPTIMIZERS and reads(name, "use_polar_express")


def check_values(name, values):
    """Raise ValueError, naming the config key, on a value {key: value} that optimizer `name`
    does not allow (the ranges and choices of optimizers.hyperparameters)."""
    for key, argument in OPTIMIZERS[name].arguments.items():
        if key in values:
            check_value(argument, values[key], shown=key)


def optimizer_arguments(name, values):
    """{constructor argument: value} of optimizer `name` from the config values {key: value}."""
    return {
        argument: ARGUMENT_VALUES[key][values[key]] if key in ARGUMENT_VALUES else values[key]
        for key, argument in OPTIMIZERS[name].arguments.items()
    }


def build_optimizer(name, param_groups, values, meshes=None):
    """Optimizer `name` over `param_groups`, its arguments taken from the config values
    {key: value} and its meshes from `meshes` ({mesh argument: mesh}, missing ones None)."""
    spec = OPTIMIZERS[name]
    arguments = optimizer_arguments(name, values)
    for mesh in spec.meshes:
        arguments[mesh] = (meshes or {}).get(mesh)
    return spec.cls(param_groups, **arguments)
