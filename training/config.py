"""The training configuration: one dataclass, filled from a YAML file and `--key value` flags.

Every key has the same name in the YAML, on the command line and in the code that reads it.
"""

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from optimizers.dion2 import DECAYS, SCOPES, SELECTIONS
from optimizers.matrix_optimizer import ADJUST_LR
from optimizers.scalar import SCALAR_ALGORITHMS


class ConfigError(ValueError):
    """A config key or value that is not allowed."""


@dataclass
class TrainConfig:
    """All keys of a training run, with their defaults."""

    # data and run
    data_dir: str = "data/shakespeare"
    run_name: str | None = None  # default: the config file's name
    runs_dir: str = "runs"
    seed: int = 0
    # model
    model_dim: int = 768
    n_layer: int = 12
    n_head: int = 6
    sequence_length: int = 1024
    # batch: batch_size sequences per step, device_batch_size sequences per micro-batch
    batch_size: int = 1024
    device_batch_size: int = 32
    num_iterations: int = 3000
    # optimizer and schedule
    optimizer: str = "dion2"  # dion2, muon, normuon, dion or adamw: the matrices' algorithm
    scalar_opt: str = "adamw"  # adamw or lion: vectors, embedding and lm_head
    lr: float = 0.02
    scalar_lr: float | None = None  # lr of the scalar groups; default: lr
    lm_head_lr_scale: float | None = None  # default: 1/sqrt(model_dim) with lion, 1 with adamw
    weight_decay: float = 0.01
    mu: float = 0.95  # momentum (Muon, NorMuon, Dion) or error-feedback decay (Dion2)
    ortho_fraction: float = 0.5  # Dion2's fraction of rows, Dion's rank fraction
    selection: str = "l1"  # Dion2: l1 or random
    selection_scope: str = "local"  # Dion2: local or global
    decay: str = "selective"  # Dion2: selective or full (the paper's ablation)
    adjust_lr: str | None = "spectral_norm"  # spectral_norm, rms_norm or null
    nesterov: bool = False  # Muon, NorMuon
    cautious_wd: bool = False  # Muon, NorMuon
    use_polar_express: bool = True  # Newton-Schulz coefficients: Polar Express or the quintic
    muon_beta2: float = 0.95  # NorMuon's per-neuron second moment
    diagnostics_every: int = 10  # log Dion2's selection diagnostics every N steps; 0 = never
    # compressed data-parallel sync: Dion (low-rank factors) or Dion2 with random selection
    # (selected rows) all-reduce in the optimizer instead of the matrices' gradients
    replicate_mesh_grad_sync: bool = False
    warmup_ratio: float = 0.0
    warmdown_ratio: float = 0.2
    grad_clip: float = 0.0  # 0 = off
    # evaluation, checkpoints, logging
    val_loss_every: int = 0  # 0 = only at the end
    val_tokens: int = 10_485_760
    checkpoint_every: int = 0  # 0 = only at the end
    keep_checkpoints: int = 2
    resume: str | None = None  # "auto" or a checkpoint path
    wandb_project: str | None = None
    sample_tokens: int = 64  # tokens of text sampled at the end; 0 = none
    # parallelism: dp_size x fs_size x tp_size ranks; unset sizes are 1, none set = DDP on all ranks
    dp_size: int | None = None
    fs_size: int | None = None
    tp_size: int | None = None
    # hardware
    compile: bool = False  # torch.compile the model and the optimizer's per-shape math
    use_triton: bool = False  # Muon, NorMuon, Dion2: Newton-Schulz in the Triton kernels
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 elsewhere), bf16, fp32


KEYS = {f.name: f for f in fields(TrainConfig)}
PRECISIONS = ("auto", "bf16", "fp32")
CHOICES = {
    "optimizer": ("dion2", "muon", "normuon", "dion", "adamw"),
    "scalar_opt": SCALAR_ALGORITHMS,
    "selection": SELECTIONS,
    "selection_scope": SCOPES,
    "decay": DECAYS,
    "adjust_lr": ADJUST_LR,
    "precision": PRECISIONS,
}


# Names other training repositories use for our keys, so a suggestion can point across.
ALIASES = {
    "learning_rate": "lr",
    "max_steps": "num_iterations",
    "max_iters": "num_iterations",
    "steps": "num_iterations",
    "wd": "weight_decay",
    "n_embd": "model_dim",
    "d_model": "model_dim",
    "hidden_size": "model_dim",
    "num_layers": "n_layer",
    "num_heads": "n_head",
    "block_size": "sequence_length",
    "seq_len": "sequence_length",
    "micro_batch_size": "device_batch_size",
    "warmup_steps": "warmup_ratio",
    "eval_every": "val_loss_every",
    "save_every": "checkpoint_every",
}


def _closest(key):
    match = difflib.get_close_matches(key, [*KEYS, *ALIASES], n=1, cutoff=0.0)
    return f"; did you mean '{ALIASES.get(match[0], match[0])}'?" if match else ""


def _check_type(key, value, source):
    hint = typing.get_type_hints(TrainConfig)[key]
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    # bool is a subclass of int in Python, but True is never a valid count or rate.
    if isinstance(value, bool) == (bool in allowed):
        if float in allowed and isinstance(value, int):
            return float(value)
        if any(t is not type(None) and isinstance(value, t) for t in allowed):
            return value
    names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
    raise ConfigError(f"{source}: {key} must be {names}, got {value!r} ({type(value).__name__})")


def _apply(values, overrides, source):
    for key, value in overrides.items():
        if key not in KEYS:
            raise ConfigError(f"{source}: unknown key '{key}'{_closest(key)}")
        values[key] = _check_type(key, value, source)


def _parse_flags(argv):
    """Split argv into (config path, {key: value}); values are read as YAML scalars."""
    config_path, overrides = None, {}
    args = list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"command line: expected --key value, got '{arg}'")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if not args:
                raise ConfigError(f"command line: --{key} needs a value")
            value = args.pop(0)
        if key == "config":
            config_path = value
            continue
        if key not in KEYS:
            raise ConfigError(f"command line: unknown key '--{key}'{_closest(key)}")
        hint = typing.get_type_hints(TrainConfig)[key]
        # A string key keeps the text as typed ("001" stays "001"); others parse as YAML.
        is_str = str in (typing.get_args(hint) or (hint,))
        parsed = yaml.safe_load(value) if value else None
        overrides[key] = value if is_str and parsed is not None else parsed
    return config_path, overrides


def validate(cfg):
    """Check the values that do not depend on the world size; raise ConfigError on the first bad one."""
    positive = (
        "model_dim",
        "n_layer",
        "n_head",
        "sequence_length",
        "batch_size",
        "device_batch_size",
        "num_iterations",
        "val_tokens",
        "keep_checkpoints",
    )
    for key in positive:
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{key} must be > 0, got {getattr(cfg, key)}")
    for key in (
        "val_loss_every",
        "checkpoint_every",
        "sample_tokens",
        "seed",
        "lr",
        "weight_decay",
        "grad_clip",
        "diagnostics_every",
    ):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {getattr(cfg, key)}")
    for key in ("warmup_ratio", "warmdown_ratio"):
        if not 0 <= getattr(cfg, key) <= 1:
            raise ConfigError(f"{key} must lie in [0, 1], got {getattr(cfg, key)}")
    if cfg.warmup_ratio + cfg.warmdown_ratio > 1:
        raise ConfigError(
            f"warmup_ratio + warmdown_ratio must be <= 1, got {cfg.warmup_ratio} + {cfg.warmdown_ratio}"
        )
    if cfg.model_dim % cfg.n_head or (cfg.model_dim // cfg.n_head) % 2:
        raise ConfigError(
            f"model_dim {cfg.model_dim} must split into n_head {cfg.n_head} heads of an even size"
        )
    if cfg.batch_size % cfg.device_batch_size:
        raise ConfigError(
            f"batch_size {cfg.batch_size} must be a multiple of device_batch_size {cfg.device_batch_size}"
        )
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            names = ", ".join("null" if a is None else a for a in allowed)
            raise ConfigError(f"{key} must be one of {names}, got '{getattr(cfg, key)}'")
    if not 0 < cfg.ortho_fraction <= 1:
        raise ConfigError(f"ortho_fraction must lie in (0, 1], got {cfg.ortho_fraction}")
    for key in ("mu", "muon_beta2"):
        if not 0 <= getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must lie in [0, 1), got {getattr(cfg, key)}")
    for key in ("scalar_lr", "lm_head_lr_scale"):
        if getattr(cfg, key) is not None and getattr(cfg, key) < 0:
            raise ConfigError(f"{key} must be >= 0 or null, got {getattr(cfg, key)}")
    if cfg.replicate_mesh_grad_sync:
        if not (cfg.optimizer == "dion" or (cfg.optimizer == "dion2" and cfg.selection == "random")):
            raise ConfigError(
                "replicate_mesh_grad_sync needs optimizer dion, or dion2 with selection random "
                f"(got optimizer {cfg.optimizer}, selection {cfg.selection}): l1 needs the full momentum"
            )
        if cfg.grad_clip:
            raise ConfigError(
                f"grad_clip {cfg.grad_clip} cannot be used with replicate_mesh_grad_sync: the replicas never "
                "hold the averaged gradient whose norm it clips; set grad_clip 0"
            )
    if cfg.run_name is not None and (not cfg.run_name or "/" in cfg.run_name or cfg.run_name.startswith(".")):
        raise ConfigError(f"run_name must be a plain folder name, got '{cfg.run_name}'")


def load_config(argv):
    """Build and validate a TrainConfig from `--config PATH` and `--key value` flags."""
    config_path, overrides = _parse_flags(argv)
    values = {}
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys to values")
        _apply(values, loaded, str(path))
        values.setdefault("run_name", path.stem)
    _apply(values, overrides, "command line")
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg


def to_dict(cfg):
    """The config as a plain dict, in key order."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg):
    """The config as YAML text, in key order."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
