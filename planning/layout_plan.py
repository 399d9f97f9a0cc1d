"""What a layout costs one rank in one training step, predicted without running it: the
optimizer's bytes per collective kind, its Newton-Schulz FLOPs, and the memory of the weights,
gradients, optimizer state and one micro-batch's logits.

The parameters are the GPT's, built on the meta device and grouped as train.py groups them.
Each rank's block of a parameter follows the TP plan and FSDP's placement
(models/parallelize.py), cut as DTensor cuts. The matrices are bucketed as
`MatrixOptimizer._matrix_step` buckets them. Each optimizer class describes itself: its
`plan_bucket` walks a bucket through its step, and `state_bytes` counts its state. Every
collective is sized by the functions of optimizers/comm_plan.py, which the optimizers call to
size their own.
"""

import math
from dataclasses import dataclass, field

import torch

from models.gpt_model import GPT
from models.parallelize import fsdp_dim, tp_weight_dim
from optimizers.comm_plan import (
    Traffic,
    exchange_sizes,
    replica_assignment,
    replica_sizes,
    replicated_share,
)
from optimizers.newton_schulz import newton_schulz_flops, use_gram
from optimizers.registry import OPTIMIZERS, optimizer_arguments
from optimizers.scalar import SCALAR_ALGORITHMS
from parallel.sharding import Block
from training.config import to_dict
from training.model_setup import gpt_config
from training.param_groups import build_param_groups
from training.precision import uses_bf16

# The weights, their gradients and the optimizer state are fp32 in every layout.
PARAM_DTYPE = torch.float32
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


class StepPlanner:
    """Walks one rank's optimizer step, bucket by bucket, recording what it would send. Each
    optimizer class walks its own buckets (`plan_bucket`), calling the methods below where its
    step calls collectives and Newton-Schulz."""

    param_bytes = PARAM_DTYPE.itemsize

    def __init__(self, cfg, layout, rank, ns_dtype, selection_runs):
        self.cfg, self.layout, self.rank = cfg, layout, rank
        self.cls = OPTIMIZERS[cfg.optimizer].cls
        self.arguments = optimizer_arguments(cfg.optimizer, to_dict(cfg))
        self.ns_dtype = self.arguments.get("ns_dtype") or ns_dtype
        self.ns_bytes = element_size(self.ns_dtype)
        self.polar = self.arguments.get("use_polar_express", True)
        self.gram = self.arguments.get("use_gram_newton_schulz", False)
        self.selection_runs = selection_runs or {}
        self.groups = layout.groups(rank)
        distributed = self.groups["distributed"]
        self.world, self.group_rank = len(distributed), distributed.index(rank)
        self.replicas = self.groups.get("dp")
        self.replica_rank = self.replicas.index(rank) if self.replicas else 0
        self.compressed = bool(self.replicas) and self.arguments.get("replicate_mesh_grad_sync", False)
        self.plan = RankPlan()

    @property
    def traffic(self):
        """The Traffic recorded so far."""
        return self.plan.traffic

    def blocks(self, name, shape):
        """Every rank of the distributed group's Block of a matrix, in group order."""
        return [block_of(name, shape, self.layout, r) for r in self.groups["distributed"]]

    def newton_schulz(self, count, m, n):
        """Newton-Schulz on `count` m x n matrices on this rank: its FLOPs."""
        gram = use_gram(self.gram, m, n, self.ns_dtype, self.polar)
        self.plan.ns_flops += count * newton_schulz_flops(m, n, self.polar, gram, self.ns_dtype)

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

    def state_bytes(self, group, name, shape):
        """The bytes of one parameter's optimizer state on this rank (the class's own count)."""
        local = local_numel(name, shape, self.layout, self.rank)
        return self.cls.state_bytes(group["algorithm"], shape, local, PARAM_DTYPE, self.arguments)

    def logits_bytes(self):
        """One micro-batch's logits on this rank, split over the vocabulary by TP: in the compute
        dtype (bf16 on the GPU the planner assumes), their fp32 copy that the loss's backward
        keeps, and that copy's gradient."""
        columns = math.ceil(gpt_config(self.cfg).padded_vocab_size / self.layout.tp)
        compute = 2 if uses_bf16(self.cfg.precision, torch.device("cuda")) else 4
        return self.cfg.device_batch_size * self.cfg.sequence_length * columns * (compute + 4 + 4)

    def run(self, model):
        """The RankPlan of one step of `model`'s param groups."""
        names = {id(p): n for n, p in model.named_parameters()}
        self.plan.memory["logits"] = self.logits_bytes()
        for group in build_param_groups(model, self.cfg):
            for p in group["params"]:
                local = local_numel(names[id(p)], tuple(p.shape), self.layout, self.rank) * self.param_bytes
                self.plan.memory["weights"] += local
                self.plan.memory["gradients"] += local
                self.plan.memory["optimizer state"] += self.state_bytes(group, names[id(p)], tuple(p.shape))
            if group["algorithm"] in SCALAR_ALGORITHMS:
                continue
            if group.get("num_heads"):
                raise PlanError("ortho_per_head is not modelled by the planner")
            buckets = {}
            for p in group["params"]:
                buckets.setdefault(tuple(p.shape), []).append(names[id(p)])
            for shape, members in buckets.items():
                self.cls.plan_bucket(self, members, shape)
        return self.plan


def plan_rank(cfg, layout, rank=0, ns_dtype=torch.bfloat16, selection_runs=None):
    """The RankPlan of global `rank` in one step of `cfg` on `layout` (a parallel.layout.Layout).

    `ns_dtype` is Newton-Schulz's dtype where the config leaves it to the hardware (`auto`).
    `selection_runs` ({matrix name: [(first, count) per distributed rank]}) says where a global
    Dion2 selection's chosen slices fall in each rank's range, as `selected_runs_global` finds.
    """
    with torch.device("meta"):
        model = GPT(gpt_config(cfg))
    try:
        return StepPlanner(cfg, layout, rank, ns_dtype, selection_runs).run(model)
    except NotImplementedError as e:  # an optimizer that does not describe itself to the planner
        raise PlanError(f"optimizer {cfg.optimizer} is not modelled by the planner: {e}") from None
