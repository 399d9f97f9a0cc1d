"""What a layout costs one rank in one training step, predicted without running it: the
optimizer's bytes per collective kind, its Newton-Schulz FLOPs, and the memory of the weights,
gradients, optimizer state and one micro-batch's logits.

The parameters are the GPT's, built on the meta device and grouped as train.py groups them.
Each rank's block of a parameter follows the TP plan and FSDP's placement
(models/parallelize.py), cut as DTensor cuts. The matrices are bucketed as
`MatrixOptimizer._matrix_step` buckets them, and every collective of a bucket is sized by the
functions of optimizers/comm_plan.py, which the optimizers call to size their own; the
selection counts are Dion2's own functions.
"""

import math
from dataclasses import dataclass, field

import torch

from models.gpt_model import GPT
from models.parallelize import fsdp_dim, tp_weight_dim
from optimizers.comm_plan import (
    Traffic,
    exchange_sizes,
    low_rank,
    replica_assignment,
    replica_sizes,
    replicated_share,
)
from optimizers.dion2 import num_selected, selected_runs_local, slice_ranges
from optimizers.newton_schulz import newton_schulz_flops
from optimizers.registry import OPTIMIZERS, optimizer_arguments
from parallel.sharding import Block
from training.config import to_dict
from training.model_setup import gpt_config
from training.param_groups import build_param_groups
from training.precision import uses_bf16

# The weights, their gradients and the optimizer state are fp32 in every layout.
PARAM_BYTES = 4
NEWTON_SCHULZ_FAMILY = ("muon", "normuon", "dion2", "nordion2")
MEMORY = ("weights", "gradients", "optimizer state", "logits")


class PlanError(ValueError):
    """A configuration the planner does not model."""


@dataclass
class RankPlan:
    """One rank's step: its optimizer traffic, Newton-Schulz FLOPs, and memory in bytes."""

    traffic: Traffic = field(default_factory=lambda: Traffic(keep_calls=True))
    ns_flops: int = 0
    memory: dict = field(default_factory=lambda: dict.fromkeys(MEMORY, 0))


def chunk(size, parts, index):
    """(start, length) of piece `index` of a dimension of `size` split into `parts` as DTensor's
    Shard splits it: pieces of ceil(size / parts), the last ones short or empty."""
    step = math.ceil(size / parts)
    start = min(index * step, size)
    return start, min(step, size - start)


def block_of(name, shape, layout, rank):
    """The Block of the 2-D parameter `name` that a global rank holds: rows and columns cut by
    TP (over tp) on the dimension of its style and by FSDP (over fs) on the other, when the
    layout shards."""
    _, fs, tp = layout.coordinates(rank)
    spans = [(0, shape[0]), (0, shape[1])]
    split_tp = tp_weight_dim(name) if layout.tp_enabled else None
    if split_tp is not None:
        spans[split_tp] = chunk(shape[split_tp], layout.tp, tp)
    if layout.sharded:
        dim = fsdp_dim(split_tp)
        start, length = chunk(spans[dim][1], layout.fs, fs)
        spans[dim] = (spans[dim][0] + start, length)
    return Block(spans[0][0], spans[0][1], spans[1][0], spans[1][1])


def local_numel(name, shape, layout, rank):
    """The elements of parameter `name` that a global rank holds."""
    if len(shape) == 2:
        return block_of(name, shape, layout, rank).numel
    _, fs, _ = layout.coordinates(rank)  # a norm gain: FSDP's rows of it, whole under TP
    return chunk(shape[0], layout.fs, fs)[1] if layout.sharded else shape[0]


def element_size(dtype):
    """Bytes per element of a torch dtype."""
    return torch.empty((), dtype=dtype).element_size()


class _Planner:
    """Walks one rank's optimizer step, bucket by bucket, recording what it would send."""

    def __init__(self, cfg, layout, rank, ns_dtype, selection_runs):
        self.cfg, self.layout, self.rank = cfg, layout, rank
        self.name = cfg.optimizer
        self.arguments = optimizer_arguments(self.name, to_dict(cfg))
        self.ns_bytes = element_size(self.arguments.get("ns_dtype") or ns_dtype)
        self.polar = self.arguments.get("use_polar_express", True)
        self.selection_runs = selection_runs or {}
        self.groups = layout.groups(rank)
        distributed = self.groups["distributed"]
        self.world, self.group_rank = len(distributed), distributed.index(rank)
        self.replicas = self.groups.get("dp")
        self.replica_rank = self.replicas.index(rank) if self.replicas else 0
        self.compressed = bool(self.replicas) and self.arguments.get("replicate_mesh_grad_sync", False)
        self.plan = RankPlan()

    def blocks(self, name, shape):
        """Every rank of the distributed group's Block of a matrix, in group order."""
        return [block_of(name, shape, self.layout, r) for r in self.groups["distributed"]]

    def newton_schulz(self, count, m, n):
        self.plan.ns_flops += count * newton_schulz_flops(m, n, self.polar)

    def orthonormalize(self, count, m, n):
        """`MatrixOptimizer._orthonormalize` of `count` replicated m x n matrices."""
        if self.world == 1:
            self.newton_schulz(count, m, n)
            return
        share = replicated_share(count, self.world)
        self.newton_schulz(share, m, n)
        self.plan.traffic.all_gather(self.world, share * m * n, self.ns_bytes, "distributed")

    def orthonormalize_blocks(self, blocks, shape):
        """`MatrixOptimizer._orthonormalize_blocks`: the work split over the replicas, if any."""
        if not self.replicas:
            self.exchange_blocks(blocks, shape)
            return
        assigned = replica_assignment(len(blocks), len(self.replicas))
        self.exchange_blocks([blocks[i] for i in assigned[self.replica_rank]], shape)
        _, longest = replica_sizes(blocks, assigned, self.group_rank)
        self.plan.traffic.all_gather(len(self.replicas), longest, self.ns_bytes, "dp")

    def exchange_blocks(self, blocks, shape):
        """`MatrixOptimizer._exchange_blocks`: blocks to their owners and back."""
        if not blocks:
            return
        owned, outgoing, incoming = exchange_sizes(blocks, self.world, self.group_rank)
        self.plan.traffic.all_to_all(self.group_rank, incoming, outgoing, self.ns_bytes, "distributed")
        self.newton_schulz(len(owned[self.group_rank]), *shape)
        self.plan.traffic.all_to_all(self.group_rank, outgoing, incoming, self.ns_bytes, "distributed")

    def muon_bucket(self, names, shape):
        """Muon's and NorMuon's `_update_bucket`."""
        m, n = shape
        if not self.layout.sharded:
            self.orthonormalize(len(names), m, n)
            return
        self.orthonormalize_blocks([self.blocks(name, shape) for name in names], shape)
        if self.name == "normuon":  # each row's sum of squares over the full matrix
            self.plan.traffic.all_reduce(self.world, len(names) * m, 4, "distributed")

    def dion2_bucket(self, names, shape):
        """Dion2's and NorDion2's `_update_bucket`."""
        m, n = shape
        rows = OPTIMIZERS[self.name].cls.selects_rows(m, n)
        slices, other = (m, n) if rows else (n, m)
        fraction = self.arguments["fraction"]
        traffic = self.plan.traffic
        if not self.layout.sharded:
            k = num_selected(fraction, slices)
            if self.compressed:
                traffic.all_reduce(len(self.replicas), len(names) * k * other, PARAM_BYTES, "dp")
            self.orthonormalize(len(names), k, other)
            return
        spans = [[b if rows else b.transposed() for b in self.blocks(name, shape)] for name in names]
        if self.arguments["selection"] == "l1":
            traffic.all_reduce(self.world, len(names) * slices, 4, "distributed")
        if self.arguments["selection_scope"] == "global":
            # Where the top k of a whole matrix fall depends on its norms: the caller says, or
            # they are taken to fall as a local selection's would.
            runs = [
                self.selection_runs.get(name) or selected_runs_local(fraction, [span])[0]
                for name, span in zip(names, spans, strict=True)
            ]
            counts = [num_selected(fraction, slices)] * len(names)
        else:
            runs = selected_runs_local(fraction, spans)
            counts = [sum(num_selected(fraction, la) for _, la in slice_ranges(span)) for span in spans]
        if self.compressed:
            me = self.group_rank
            mine = sum(run[me][1] * span[me].cols for run, span in zip(runs, spans, strict=True))
            traffic.all_reduce(len(self.replicas), mine, PARAM_BYTES, "dp")
        by_k = {}
        for x, k in enumerate(counts):
            by_k.setdefault(k, []).append(x)
        for k, members in by_k.items():
            blocks = [
                [
                    Block(first, count, b.col0, b.cols)
                    for (first, count), b in zip(runs[x], spans[x], strict=True)
                ]
                for x in members
            ]
            self.orthonormalize_blocks(blocks, (k, other))
        if self.name == "nordion2":  # each selected row's sum of squares over the full matrix
            traffic.all_reduce(self.world, sum(counts), 4, "distributed")

    def dion_bucket(self, names, shape):
        """Dion's `_update_bucket`: the low-rank factors P (m x r) and R (n x r) summed over the
        shard meshes, then averaged over the replicas under compressed sync."""
        m, n = shape
        r = low_rank(self.arguments["rank_fraction"], m, n)
        for height in (m, n):
            numel = len(names) * height * r
            if self.layout.sharded:
                for mesh in ("fs", "tp"):
                    if mesh in self.groups:
                        self.plan.traffic.all_reduce(len(self.groups[mesh]), numel, PARAM_BYTES, mesh)
            if self.compressed:
                self.plan.traffic.all_reduce(len(self.replicas), numel, PARAM_BYTES, "dp")

    def state_bytes(self, group, name, shape):
        """The bytes of one parameter's optimizer state on this rank."""
        algorithm = group["algorithm"]
        local = local_numel(name, shape, self.layout, self.rank) * PARAM_BYTES
        if algorithm == "adamw":
            return 2 * local + 4  # exp_avg, exp_avg_sq and a float32 step
        if algorithm == "lion":
            return local
        m, n = shape
        extra = 0
        if algorithm == "normuon":
            extra = m * 4  # each row's second moment, whole on every rank
        elif algorithm in ("dion2", "nordion2"):
            slices = m if OPTIMIZERS[algorithm].cls.selects_rows(m, n) else n
            # each slice's last selection (int64), the step and the longest wait; NorDion2 adds
            # each slice's second moment
            extra = slices * 8 + 16 + (slices * 4 if algorithm == "nordion2" else 0)
        elif algorithm == "dion":
            extra = n * low_rank(self.arguments["rank_fraction"], m, n) * PARAM_BYTES  # Q, whole
        return local + extra

    def logits_bytes(self):
        """One micro-batch's logits on this rank, split over the vocabulary by TP: in the compute
        dtype (bf16 on the GPU the planner assumes), their fp32 copy that the loss's backward
        keeps, and that copy's gradient."""
        columns = math.ceil(gpt_config(self.cfg).padded_vocab_size / self.layout.tp)
        compute = 2 if uses_bf16(self.cfg.precision, torch.device("cuda")) else 4
        return self.cfg.device_batch_size * self.cfg.sequence_length * columns * (compute + 4 + 4)

    def run(self, model):
        names = {id(p): n for n, p in model.named_parameters()}
        self.plan.memory["logits"] = self.logits_bytes()
        for group in build_param_groups(model, self.cfg):
            for p in group["params"]:
                local = local_numel(names[id(p)], tuple(p.shape), self.layout, self.rank) * PARAM_BYTES
                self.plan.memory["weights"] += local
                self.plan.memory["gradients"] += local
                self.plan.memory["optimizer state"] += self.state_bytes(group, names[id(p)], tuple(p.shape))
            if group["algorithm"] != self.name or self.name == "adamw":
                continue
            if group.get("num_heads"):
                raise PlanError("ortho_per_head is not modelled by the planner")
            buckets = {}
            for p in group["params"]:
                buckets.setdefault(tuple(p.shape), []).append(names[id(p)])
            update = {
                "dion": self.dion_bucket,
                "dion2": self.dion2_bucket,
                "nordion2": self.dion2_bucket,
            }.get(self.name, self.muon_bucket)
            for shape, members in buckets.items():
                update(members, shape)
        return self.plan


def plan_rank(cfg, layout, rank=0, ns_dtype=torch.bfloat16, selection_runs=None):
    """The RankPlan of global `rank` in one step of `cfg` on `layout` (a parallel.layout.Layout).

    `ns_dtype` is Newton-Schulz's dtype where the config leaves it to the hardware (`auto`).
    `selection_runs` ({matrix name: [(first, count) per distributed rank]}) says where a global
    Dion2 selection's chosen slices fall in each rank's range, as `selected_runs_global` finds.
    """
    if layout.world_size > 1 and cfg.optimizer not in (*NEWTON_SCHULZ_FAMILY, "dion", "adamw"):
        raise PlanError(f"optimizer {cfg.optimizer} is not modelled by the planner")
    with torch.device("meta"):
        model = GPT(gpt_config(cfg))
    return _Planner(cfg, layout, rank, ns_dtype, selection_runs).run(model)
