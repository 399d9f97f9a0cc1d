"""The DP x FSDP x TP layout: sizes from the config, checked against the world and the model."""

from torch.distributed.device_mesh import init_device_mesh

from models.gpt_model import GPTConfig
from training.config import ConfigError

# The optimizers that run on FSDP-sharded weights so far.
SHARDED_OPTIMIZERS = ("dion2", "muon", "adamw")


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
    if tp > 1:
        raise ConfigError(f"tp_size {tp}: tensor parallelism is not built yet; use dp_size and fs_size")
    if fs > 1 and cfg.optimizer not in SHARDED_OPTIMIZERS:
        raise ConfigError(
            f"optimizer {cfg.optimizer} with fs_size {fs}: not on sharded weights yet; use "
            f"{' or '.join(SHARDED_OPTIMIZERS)} with FSDP, or dp_size alone"
        )
    return dp, fs, tp


def build_mesh(layout, device_type):
    """The ("dp", "fs", "tp") DeviceMesh of a layout, or None in a single process."""
    if layout == (1, 1, 1):
        return None
    return init_device_mesh(device_type, layout, mesh_dim_names=("dp", "fs", "tp"))


def fsdp_mesh(mesh):
    """The mesh FSDP shards over: fs, or dp x fs (HSDP) when there are also replicas."""
    return mesh["dp", "fs"] if mesh["dp"].size() > 1 else mesh["fs"]


def optimizer_mesh(mesh, ctx):
    """What the matrix optimizers exchange over: the fs mesh when weights are sharded, else
    the data-parallel group of all ranks (None in one process)."""
    if mesh is not None and mesh["fs"].size() > 1:
        return mesh["fs"]
    return ctx.group
