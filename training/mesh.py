"""The DP x FSDP x TP layout: sizes from the config, checked against the world and the model."""

from dataclasses import dataclass

from torch.distributed.device_mesh import init_device_mesh

from models.gpt_model import GPTConfig
from training.config import ConfigError


@dataclass(frozen=True)
class Layout:
    """How the ranks split the work: dp replicas x fs FSDP shards x tp tensor-parallel ranks."""

    dp: int = 1
    fs: int = 1
    tp: int = 1

    @property
    def world_size(self):
        """The ranks of the layout: dp x fs x tp."""
        return self.dp * self.fs * self.tp

    @property
    def dp_enabled(self):
        """Whether there are data-parallel replicas (DDP, or HSDP's replicate dimension)."""
        return self.dp > 1

    @property
    def fsdp_enabled(self):
        """Whether FSDP shards the weights over fs ranks."""
        return self.fs > 1

    @property
    def tp_enabled(self):
        """Whether tensor parallelism splits the weights over tp ranks."""
        return self.tp > 1

    @property
    def sharded(self):
        """Whether weights are sharded (FSDP or TP), rather than replicated or whole."""
        return self.fsdp_enabled or self.tp_enabled

    def __str__(self):
        return f"dp x fs x tp = {self.dp} x {self.fs} x {self.tp}"


def mesh_sizes(cfg, world_size):
    """The Layout of `world_size` ranks, or a ConfigError before any work starts.

    No size given: plain data parallelism over all ranks. Otherwise an unset size is 1, and
    the product must equal the world size.
    """
    given = {"dp_size": cfg.dp_size, "fs_size": cfg.fs_size, "tp_size": cfg.tp_size}
    if all(v is None for v in given.values()):
        return Layout(dp=world_size)
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
    return Layout(dp, fs, tp)


def build_mesh(layout, device_type):
    """The ("dp", "fs", "tp") DeviceMesh of a layout, or None in a single process."""
    if layout.world_size == 1:
        return None
    return init_device_mesh(device_type, (layout.dp, layout.fs, layout.tp), mesh_dim_names=("dp", "fs", "tp"))


def fsdp_mesh(mesh):
    """The mesh FSDP shards over: fs, or dp x fs (HSDP) when there are also replicas. Under
    TP with fs_size 1, FSDP still wraps the model over a mesh of one (it then only replicates
    over dp), so that every parameter is a DTensor and replicas sync the TP shards."""
    return mesh["dp", "fs"] if mesh["dp"].size() > 1 else mesh["fs"]


def data_rank(mesh, ctx):
    """(rank, ranks) over which batches are split: the flattened dp x fs ranks. TP ranks
    share their batches."""
    if mesh is None:
        return ctx.rank, ctx.world_size
    dp, fs, _ = mesh.get_coordinate()
    return dp * mesh["fs"].size() + fs, mesh["dp"].size() * mesh["fs"].size()


def optimizer_meshes(mesh, ctx):
    """The meshes the optimizers take, by their constructor argument names.

    distributed_mesh (Muon, NorMuon, Dion2): the ranks that hold distinct blocks of a sharded
    weight (fs, tp, or both flattened into one dimension), else the data-parallel group of
    all ranks (None in one process). replicate_mesh: the dp dimension, for compressed sync.
    outer_shard_mesh and inner_shard_mesh (Dion): fs and tp.
    """
    if mesh is None:
        return {"distributed_mesh": ctx.group}
    fs, tp = mesh["fs"].size(), mesh["tp"].size()
    if fs > 1 and tp > 1:
        distributed = mesh["fs", "tp"]._flatten("fs_tp")
    elif fs > 1 or tp > 1:
        distributed = mesh["fs"] if fs > 1 else mesh["tp"]
    else:
        distributed = ctx.group
    return {
        "distributed_mesh": distributed,
        "replicate_mesh": mesh["dp"] if mesh["dp"].size() > 1 else None,
        "outer_shard_mesh": mesh["fs"] if fs > 1 else None,
        "inner_shard_mesh": mesh["tp"] if tp > 1 else None,
    }
