"""The training configuration: one dataclass, filled from a YAML file and `--key value` flags.

Every key has the same name in the YAML, on the command line and in the code that reads it.
"""

import dataclasses
import difflib
import re
import textwrap
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from data.tokenizer import TOKENIZERS
from models.activation_checkpointing import AC_MODES
from optimizers.hyperparameters import CHOICES as HYPERPARAMETER_CHOICES
from optimizers.hyperparameters import check_compressed_sync, choice_text
from optimizers.registry import NS_DTYPES, OPTIMIZER_KEYS, OPTIMIZERS, check_values, reads
from optimizers.scalar import SCALAR_ALGORITHMS
from training.exit_codes import ExitCode
from training.preemption import SIGNALS, parse_signals


class ConfigError(ValueError):
    """A config key or value that is not allowed."""


def key(default, meaning):
    """A config key: its default and what it means (shown by `--help` and in docs/configuration.md)."""
    return dataclasses.field(default=default, metadata={"meaning": meaning})


@dataclass
class TrainConfig:
    """All keys of a training run, with their defaults."""

    # data and run
    data_dir: str = key("data/shakespeare", "folder of `*_train_*.bin` and `*_val_*.bin` shards")
    tokenizer: str = key(
        "gpt2", "the ids of the shards: `gpt2` (50,257 BPE ids) or `bytes` (256 ids, one per UTF-8 byte)"
    )
    run_name: str | None = key(None, "output folder `runs_dir/run_name`; default: the config file's name")
    runs_dir: str = key("runs", "where run folders go")
    seed: int = key(
        0, "weight initialisation and sampling; the same seed and config give bit-identical losses on the CPU"
    )
    # model
    model_dim: int = key(768, "width of the residual stream")
    n_layer: int = key(12, "transformer blocks")
    n_head: int = key(6, "attention heads; must divide `model_dim` into even head sizes")
    sequence_length: int = key(1024, "tokens per sequence")
    # batch
    batch_size: int = key(1024, "sequences per optimizer step, over all ranks")
    device_batch_size: int = key(32, "sequences per micro-batch on one rank")
    num_iterations: int = key(3000, "optimizer steps")
    # optimizer and schedule
    optimizer: str = key("dion2", "the hidden matrices' algorithm")
    scalar_opt: str = key(
        "adamw", "the algorithm of the norm gains, the embedding and the lm_head: `adamw` or `lion`"
    )
    lr: float = key(0.02, "peak learning rate of the matrices")
    scalar_lr: float | None = key(None, "peak learning rate of the scalar groups; null = `lr`")
    lm_head_lr_scale: float | None = key(
        None, "factor on the lm_head's lr; null = 1/sqrt(`model_dim`) with Lion, 1 with AdamW"
    )
    weight_decay: float = key(0.01, "decoupled weight decay (none on the embedding)")
    mu: float = key(
        0.95,
        "momentum of Muon, NorMuon and Dion; the error-feedback decay of Dion2 (`ef_decay`) and NorDion2",
    )
    ortho_fraction: float = key(
        0.5, "the fraction of rows or columns of Dion2 and NorDion2 (`fraction`); Dion's `rank_fraction`"
    )
    selection: str = key(
        "l1", "Dion2, NorDion2: the rows with the largest l1 norm, or `random` ones (seeded by `seed`)"
    )
    selection_scope: str = key(
        "local",
        "Dion2, NorDion2 under sharding: select per shard (`local`) or over the whole matrix (`global`)",
    )
    decay: str = key(
        "selective",
        "Dion2, NorDion2: decay only the selected momentum rows, or `full` (the paper's ablation)",
    )
    adjust_lr: str | None = key(
        "spectral_norm", "the lr scale of a matrix update: `spectral_norm`, `rms_norm` or `null`"
    )
    nesterov: bool = key(False, "Nesterov momentum (Muon, NorMuon)")
    cautious_wd: bool = key(
        False,
        "the matrices' weight decay only where update and weight agree in sign (u w >= 0), as in the "
        "reference; not with adamw",
    )
    scheduled_wd: bool = key(
        False,
        "the matrices' weight decay times the lr schedule's factor each step (AdamC): the decay lr wd "
        "falls with the factor's square; not with adamw",
    )
    match_muon_rms: bool = key(
        False,
        "Dion2, NorDion2: scale the update to Muon's RMS, by sqrt(min(m, n) / min(k, other side)), about "
        "1 / sqrt(ortho_fraction) (docs/optimizers.md); off is the paper's recipe",
    )
    use_polar_express: bool = key(
        True, "Newton-Schulz with Polar Express coefficients, or the classic quintic"
    )
    use_gram_newton_schulz: bool | str = key(
        "auto",
        "Newton-Schulz on the short side's Gram matrix: `true`, `false`, or `auto` (per matrix shape, "
        "where it costs fewer FLOPs: docs/optimizers.md)",
    )
    ns_dtype: str = key(
        "auto",
        "Newton-Schulz's compute dtype: `auto` (bf16 on CUDA and on CPUs with native bf16, fp32 "
        "elsewhere), `bf16` or `fp32`",
    )
    muon_beta2: float = key(0.95, "the per-neuron second-moment decay of NorMuon and NorDion2")
    ortho_per_head: bool = key(
        False,
        "orthonormalize q, k and v per attention head, each head a matrix of its own with its own lr "
        "scale (the `num_heads` group option = `n_head`): Muon, NorMuon, Dion2, NorDion2",
    )
    diagnostics_every: int = key(
        10,
        "log the optimizer's diagnostics every N steps (training/diagnostics.py): update and weight RMS "
        "and momentum norm per role and layer, Newton-Schulz's orthogonality error, Dion2's selection; "
        "0 = never",
    )
    replicate_mesh_grad_sync: bool = key(
        False,
        "compressed data-parallel sync: the dp replicas average only the selected rows of Dion2 or NorDion2 "
        "(`selection: random`) or Dion's low-rank factors, not the matrices' gradients; needs "
        "`grad_clip: 0`",
    )
    warmup_ratio: float = key(0.0, "fraction of the steps with linear warmup")
    warmdown_ratio: float = key(0.2, "fraction of the steps, at the end, with linear decay to 0")
    grad_clip: float = key(0.0, "clip the gradient's global norm to this before the optimizer step; 0 = off")
    # evaluation, checkpoints, logging
    val_loss_every: int = key(
        0, "validation every N steps; 0 = only at the end (the last step is always evaluated)"
    )
    val_tokens: int = key(
        10_485_760,
        "validate on this fixed prefix of the val shards; a multiple of ranks x `device_batch_size` x "
        "`sequence_length`",
    )
    checkpoint_every: int = key(
        0, "checkpoint every N steps; 0 = only at the end (the last step always saves)"
    )
    keep_checkpoints: int = key(2, "how many recent checkpoints to keep")
    # failures and preemption
    max_skipped_steps: int = key(
        0,
        "steps whose loss or gradient norm is NaN or inf that are skipped, weights and optimizer state "
        f"untouched, before the run stops with exit code {ExitCode.NON_FINITE}; 0 = stop at the first",
    )
    timeout: int = key(
        600,
        "seconds a collective waits for every rank before the run fails with an error (the process "
        "group's timeout); a preempted peer or a hung rank ends the run after this long",
    )
    preempt_signals: str = key(
        "SIGTERM,SIGUSR1",
        "signals that make every rank finish its step, checkpoint it and exit with code "
        f"{ExitCode.PREEMPTED}: comma-separated names from {', '.join(SIGNALS)}, or `none`",
    )
    resume: str | None = key(
        None,
        "`auto`: continue `runs/<run_name>` from its newest checkpoint, or start fresh if it has none; "
        "or a checkpoint path",
    )
    wandb_project: str | None = key(
        None,
        "log to Weights & Biases under this project; off when null. `WANDB_MODE=offline` works with no "
        "network",
    )
    sample_tokens: int = key(64, "tokens of text sampled at the end of the run; 0 = none")
    # parallelism
    dp_size: int | None = key(None, "data-parallel ranks; with no size set, all ranks are data-parallel")
    fs_size: int | None = key(
        None, "FSDP ranks (an unset size is 1); the product dp x fs x tp must equal the world size"
    )
    tp_size: int | None = key(None, "tensor-parallel ranks; must divide `n_head` and the padded vocabulary")
    # memory
    activation_checkpointing: str = key(
        "none",
        "recompute blocks' activations in the backward instead of keeping them: `none`, `full` (every "
        "block) or `selective` (every `ac_every`-th block, from the first)",
    )
    ac_every: int = key(2, "with `activation_checkpointing: selective`, checkpoint one block in this many")
    # hardware
    compile: bool = key(
        False,
        "`torch.compile` the model, and the optimizer's per-shape math; costs tens of seconds on the "
        "first steps",
    )
    use_triton: bool = key(
        False, "Newton-Schulz's symmetric products in the Triton kernels (CUDA; every optimizer but Dion)"
    )
    device: str = key(
        "auto",
        "`auto` (CUDA if present, else CPU), `cpu`, `cuda`, `cuda:N`, `mps`; "
        "under torchrun a CUDA rank takes cuda:LOCAL_RANK",
    )
    precision: str = key("auto", "`auto` (bf16 autocast on CUDA, fp32 elsewhere), `bf16`, `fp32`")


KEYS = {f.name: f for f in fields(TrainConfig)}
PRECISIONS = ("auto", "bf16", "fp32")
# The keys with a list of allowed values: the run's own, and the optimizers' (by the argument each feeds).
CHOICES = {
    "optimizer": tuple(OPTIMIZERS),
    "scalar_opt": SCALAR_ALGORITHMS,
    "precision": PRECISIONS,
    "ns_dtype": tuple(NS_DTYPES),
    "tokenizer": tuple(TOKENIZERS),
    "activation_checkpointing": AC_MODES,
    **{
        key: HYPERPARAMETER_CHOICES[argument]
        for spec in OPTIMIZERS.values()
        for key, argument in spec.arguments.items()
        if argument in HYPERPARAMETER_CHOICES
    },
}
# Optimizer keys that the run reads itself too: never foreign to an optimizer.
RUN_KEYS = ("seed", "compile")


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


# A decimal float with an exponent and no dot, such as 3e-4: YAML 1.1, which PyYAML follows,
# reads it as a string, though every YAML 1.2 parser and Python read it as a number.
EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _allowed_types(key):
    hint = typing.get_type_hints(TrainConfig)[key]
    return typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)


def _check_type(key, value, source):
    allowed = _allowed_types(key)
    if value is None and type(None) in allowed:
        return None
    if float in allowed and isinstance(value, str) and EXPONENT_FLOAT.fullmatch(value):
        return float(value)
    # bool is a subclass of int in Python, but True is never a valid count or rate.
    if isinstance(value, bool):
        if bool in allowed:
            return value
    elif float in allowed and isinstance(value, int):
        return float(value)
    elif any(t not in (type(None), bool) and isinstance(value, t) for t in allowed):
        return value
    names = _type_names(allowed)
    raise ConfigError(f"{source}: {key} must be {names}, got {value!r} ({type(value).__name__})")


def _type_names(allowed):
    return " or ".join("null" if t is type(None) else t.__name__ for t in allowed)


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
        # A string key keeps the text as typed ("001" stays "001"), unless it takes a boolean
        # too and the text is one; others parse as YAML.
        allowed = _allowed_types(key)
        parsed = yaml.safe_load(value) if value else None
        keeps_text = str in allowed and not (bool in allowed and isinstance(parsed, bool))
        overrides[key] = value if keeps_text and parsed is not None else parsed
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
        "ac_every",
        "timeout",
    )
    for key in positive:
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{key} must be > 0, got {getattr(cfg, key)}")
    for key in (
        "val_loss_every",
        "checkpoint_every",
        "max_skipped_steps",
        "sample_tokens",
        "seed",
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
    for key in ("optimizer", "scalar_opt", "precision", "ns_dtype", "tokenizer", "activation_checkpointing"):
        if getattr(cfg, key) not in CHOICES[key]:
            raise ConfigError(f"{key} must be one of {choice_text(CHOICES[key])}, got '{getattr(cfg, key)}'")
    if cfg.ac_every != KEYS["ac_every"].default and cfg.activation_checkpointing != "selective":
        raise ConfigError(
            f"ac_every {cfg.ac_every} is read only with activation_checkpointing selective, not "
            f"'{cfg.activation_checkpointing}'; leave it at its default {KEYS['ac_every'].default}"
        )
    foreign = foreign_keys(cfg)
    if foreign:
        key = foreign[0]
        readers = [name for name in OPTIMIZERS if reads(name, key)]
        raise ConfigError(
            f"{key} {shown_value(getattr(cfg, key))} is not read by optimizer {cfg.optimizer} (only by "
            f"{', '.join(readers)}); leave it at its default {shown_value(KEYS[key].default)}"
        )
    try:
        check_values(cfg.optimizer, to_dict(cfg))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for key in ("scalar_lr", "lm_head_lr_scale"):
        if getattr(cfg, key) is not None and getattr(cfg, key) < 0:
            raise ConfigError(f"{key} must be >= 0 or null, got {getattr(cfg, key)}")
    if cfg.replicate_mesh_grad_sync:
        if reads(cfg.optimizer, "selection"):
            try:
                check_compressed_sync(cfg.selection)
            except ValueError as e:
                raise ConfigError(f"optimizer {cfg.optimizer}: {e}") from None
        if cfg.grad_clip:
            raise ConfigError(
                f"grad_clip {cfg.grad_clip} cannot be used with replicate_mesh_grad_sync: the replicas never "
                "hold the averaged gradient whose norm it clips; set grad_clip 0"
            )
    try:
        parse_signals(cfg.preempt_signals)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.run_name is not None and (not cfg.run_name or "/" in cfg.run_name or cfg.run_name.startswith(".")):
        raise ConfigError(f"run_name must be a plain folder name, got '{cfg.run_name}'")


def foreign_keys(cfg, optimizer=None):
    """The optimizer keys set away from their defaults that `optimizer` (default: the config's)
    does not read: a value that would silently change nothing."""
    optimizer = optimizer or cfg.optimizer
    return [
        key
        for key in OPTIMIZER_KEYS
        if key not in RUN_KEYS and not reads(optimizer, key) and getattr(cfg, key) != KEYS[key].default
    ]


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


def load_config_for(argv, optimizer):
    """The config of `argv` with `optimizer` in place of its own, and the keys that `optimizer`
    does not read back at their defaults: one config compared across optimizers."""
    cfg = load_config(argv)
    resets = {key: KEYS[key].default for key in foreign_keys(cfg, optimizer)}
    cfg = dataclasses.replace(cfg, optimizer=optimizer, **resets)
    validate(cfg)
    return cfg


USAGE = "usage: python train.py --config FILE [--key value ...]; python train.py --help lists every key"


def shown_value(value):
    """A key's value as YAML writes it: null, true, 0.02."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def help_text():
    """Every key with its type, default and meaning, read from TrainConfig itself."""
    lines = [
        USAGE,
        "",
        "Each key can be set in the YAML file or on the command line (--key value or --key=value);",
        "the command line wins. Values are read as YAML: true, null, 0.02, 3e-4.",
        "",
    ]
    for name, field in KEYS.items():
        choices = f"; one of {choice_text(CHOICES[name])}" if name in CHOICES else ""
        lines.append(
            f"--{name} ({_type_names(_allowed_types(name))}, default {shown_value(field.default)}{choices})"
        )
        lines += textwrap.wrap(
            field.metadata["meaning"], width=96, initial_indent="    ", subsequent_indent="    "
        )
    return "\n".join(lines)


def command_line(argv):
    """The TrainConfig of a train.py command line, or None when it asked for --help (printed).
    With no arguments, or no run name (neither --config nor --run_name), a ConfigError gives
    the usage line."""
    if "--help" in argv or "-h" in argv:
        print(help_text())
        return None
    if not argv:
        raise ConfigError(USAGE)
    cfg = load_config(argv)
    if cfg.run_name is None:
        raise ConfigError(
            f"no run name: pass --config FILE (the run is named after it) or --run_name NAME; {USAGE}"
        )
    return cfg


def to_dict(cfg):
    """The config as a plain dict, in key order."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg):
    """The config as YAML text, in key order."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
