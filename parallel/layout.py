"""The DP x FSDP x TP layout: its sizes, checked against the world, the ("dp", "fs", "tp")
DeviceMesh it builds, and where a rank sits in it (what torchtitan's ParallelDims answers)."""

from dataclasses import dataclass

from torch.distributed.device_mesh import init_device_mesh

MESH_DIMS = ("dp", "fs", "tp")


class LayoutError(ValueError):
    """Layout sizes that the world or the model cannot take."""


@dataclass(frozen=True)
class Layout:
    """How the ranks split the work: dp replicas x fs FSDP shards x tp tensor-parallel ranks.
    Global ranks are numbered over the mesh in row-major order: tp fastest, then fs, then dp."""

    dp: int = 1
    fs: int = 1
    tp: int = 1

    @classmethod
    def from_sizes(cls, world_size, dp_size=None, fs_size=None, tp_size=None):
        """The Layout of `world_size` ranks, or a LayoutError. No size given: plain data
        parallelism over all ranks. Otherwise an unset size is 1, and the product must equal
        the world size."""
        given = {"dp_size": dp_size, "fs_size": fs_size, "tp_size": tp_size}
        if all(v is None for v in given.values()):
            return cls(dp=world_size)
        for key, value in given.items():
            if value is not None and value < 1:
                raise LayoutError(f"{key} must be >= 1, got {value}")
        dp, fs, tp = (v or 1 for v in given.values())
        if dp * fs * tp != world_size:
            raise LayoutError(
                f"dp_size x fs_size x tp_size = {dp} x {fs} x {tp} = {dp * fs * tp} must equal the world "
                f"size {world_size}"
            )
        return cls(dp, fs, tp)

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

    def check_divides(self, name, size):
        """A LayoutError unless tp_size divides `size`, the model's `name` that TP splits."""
        if size % self.tp:
            raise LayoutError(f"tp_size {self.tp} must divide the {name} ({size})")

    def coordinates(self, rank):
        """The (dp, fs, tp) coordinates of a global rank."""
        return rank // (self.fs * self.tp), rank // self.tp % self.fs, rank % self.tp

    def global_rank(self, dp, fs, tp):
        """The global rank at mesh coordinates (dp, fs, tp)."""
        return (dp * self.fs + fs) * self.tp + tp

    def data_rank(self, rank):
        """(rank, ranks) over which batches are split: the flattened dp x fs ranks. TP ranks
        share their batches."""
        dp, fs, _ = self.coordinates(rank)
        return dp * self.fs + fs, self.dp * self.fs

    def groups(self, rank):
        """{name: the global ranks of `rank`'s group, in group order} for the meshes of
        `optimizer_meshes`: distributed (fs x tp flattened, fs, tp, or all ranks), and dp, fs
        and tp where they have more than one rank."""
        dp, fs, tp = self.coordinates(rank)
        groups = {
            "dp": [self.global_rank(d, fs, tp) for d in range(self.dp)],
            "fs": [self.global_rank(dp, f, tp) for f in range(self.fs)],
            "tp": [self.global_rank(dp, fs, t) for t in range(self.tp)],
        }
        # A dimension of size 1 adds nothing to the product, so this is fs, tp or both.
        blocks = [self.global_rank(dp, f, t) for f in range(self.fs) for t in range(self.tp)]
        distributed = blocks if self.sharded else list(range(self.world_size))
        return {"distributed": distributed, **{k: v for k, v in groups.items() if len(v) > 1}}

    def build_mesh(self, device_type):
        """The ("dp", "fs", "tp") DeviceMesh of the layout, or None in a single process."""
        if self.world_size == 1:
            return None
        return init_device_mesh(device_type, (self.dp, self.fs, self.tp), mesh_dim_names=MESH_DIMS)

    def __str__(self):
        return f"dp x fs x tp = {self.dp} x {self.fs} x {self.tp}"


def fsdp_mesh(mesh):
    """The mesh FSDP shards over: fs, or dp x fs (HSDP) when there are also replicas. Under
    TP with fs_size 1, FSDP still wraps the model over a mesh of one (it then only replicates
    over dp), so that every parameter is a DTensor and replicas sync the TP shards."""
    return mesh["dp", "fs"] if mesh["dp"].size() > 1 else mesh["fs"]


def optimizer_meshes(mesh, group=None):
    """The meshes the optimizers take, by their constructor argument names (`Layout.groups`
    lists their ranks).

    distributed_mesh (Muon, NorMuon, Dion2): the ranks that hold distinct blocks of a sharded
    weight (fs, tp, or both flattened into one dimension), else `group`, the data-parallel
    group of all ranks (None in one process). replicate_mesh: the dp dimension, for
    compressed sync. outer_shard_mesh and inner_shard_mesh (Dion): fs and tp.
    """
    if mesh is None:
        return {"distributed_mesh": group}
    fs, tp = mesh["fs"].size(), mesh["tp"].size()
    if fs > 1 and tp > 1:
        distributed = mesh["fs", "tp"]._flatten("fs_tp")
    elif fs > 1 or tp > 1:
        distributed = mesh["fs"] if fs > 1 else mesh["tp"]
    else:
        distributed = group
    return {
        "distributed_mesh": distributed,
        "replicate_mesh": mesh["dp"] if mesh["dp"].size() > 1 else None,
        "outer_shard_mesh": mesh["fs"] if fs > 1 else None,
        "inner_shard_mesh": mesh["tp"] if tp > 1 else None,
    }
