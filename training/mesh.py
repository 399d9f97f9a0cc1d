"""The DP x FSDP x TP layout: sizes from the config, checked against the world and the model."""

from models.gpt_model import GPTConfig
from training.config import ConfigError


def mesh_sizes(cfg, world_size):
    """(dp, fs, tp) for `world_size` ranks, or a ConfigError before any work starts.

    No size given: plain data parallelism over all ranks. Otherwise an unset size is 1, and
    the product must equal the world size.
    """
    given = {"dp_size": cfg.dp_size, "fs_size": cfg.fs_size, "tp_size": cfg.tp_size}
    if all(v is None for v in given.values()):
        return world_size, 1, 1
    for key, value in given.items():
        if value is not None and value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    dp, fs, tp = (v or 1 for v in given.values())
    if dp * fs * tp != world_size:
        raise ConfigError(
            f"dp_size x fs_size x tp_size = {dp} x {fs} x {tp} = {dp * fs * tp} must equal the world size "
            f"{world_size}"
        )
    model = GPTConfig(cfg.model_dim, cfg.n_layer, cfg.n_head, cfg.sequence_length)
    for name, size in (("n_head", cfg.n_head), ("padded vocabulary", model.padded_vocab_size)):
        if size % tp:
            raise ConfigError(f"tp_size {tp} must divide the {name} ({size})")
    if fs > 1 or tp > 1:
        raise ConfigError(
            f"fs_size {fs} and tp_size {tp}: FSDP and tensor parallelism are not built yet; "
            "only data parallelism (dp_size) runs today"
        )
    return dp, fs, tp
