"""Distributed optimizer steps (gloo, several processes) against the single-process step."""

import contextlib
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from optimizers import AdamWLion, Dion, Dion2, Muon, NorDion2, NorMuon
from optimizers.comm import Communicator
from tests.conftest import gloo

# Five matrices of one shape (an uneven split over 2 or 3 ranks), two of another, a batch of
# matrices, and a vector in an AdamW group.
SHAPES = [(16, 24)] * 5 + [(24, 16)] * 2 + [(2, 8, 12)]
CASES = {
    "muon": (Muon, {"nesterov": True}),
    "normuon": (NorMuon, {}),
    "dion2_l1_quarter": (Dion2, {"fraction": 0.25}),
    "dion2_l1_full": (Dion2, {"fraction": 1.0}),
    "dion2_random": (Dion2, {"fraction": 0.5, "selection": "random"}),
    "nordion2_l1_quarter": (NorDion2, {"fraction": 0.25}),
    "nordion2_random": (NorDion2, {"fraction": 0.5, "selection": "random"}),
    "adamw_only": (AdamWLion, {}),
}
STEPS = 3


def run_case(name, distributed_mesh=None, overlap=2):
    """Build the case's parameters from a fixed seed, take STEPS steps with `overlap` buckets
    in flight; return the state."""
    cls, kwargs = CASES[name]
    gen = torch.Generator().manual_seed(0)
    matrices = [torch.randn(s, generator=gen) for s in SHAPES]
    vector = torch.randn(7, generator=gen)
    groups = [{"params": matrices}, {"params": [vector], "algorithm": "adamw"}]
    if cls is AdamWLion:
        opt = cls(groups, lr=0.02)
    else:
        opt = cls(groups, lr=0.02, distributed_mesh=distributed_mesh, **kwargs)
        opt.overlap = overlap
    for _ in range(STEPS):
        for p in [*matrices, vector]:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    moved = opt.comm_bytes() if hasattr(opt, "comm_bytes") else 0
    return {"params": [*matrices, vector], "state": opt.state_dict()["state"], "comm_bytes": moved}


def worker(rank, world_size, init_file, names, out_dir):
    with gloo(rank, world_size, init_file):
        for name in names:
            result = run_case(name, distributed_mesh=dist.group.WORLD)
            torch.save(result, os.path.join(out_dir, f"{name}_{rank}.pt"))
            serial = run_case(name, distributed_mesh=dist.group.WORLD, overlap=1)
            torch.save(serial, os.path.join(out_dir, f"{name}_serial_{rank}.pt"))


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def distributed_results(request, tmp_path_factory):
    world_size = request.param
    out = tmp_path_factory.mktemp(f"ddp{world_size}")
    mp.spawn(worker, args=(world_size, str(out / "init"), list(CASES), str(out)), nprocs=world_size)
    return world_size, {
        (name + kind, rank): torch.load(out / f"{name}{kind}_{rank}.pt")
        for name in CASES
        for kind in ("", "_serial")
        for rank in range(world_size)
    }


def assert_same(a, b, atol):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key], atol)
    elif isinstance(a, list | tuple):
        for x, y in zip(a, b, strict=True):
            assert_same(x, y, atol)
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)
    else:
        assert a == b


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_replicated_step_equals_single_process(distributed_results, name):
    world_size, results = distributed_results
    single = run_case(name)
    for rank in range(world_size):
        result = results[(name, rank)]
        # The same batched kernels on a sub-stack give bit-equal results. The row means of
        # NorMuon and NorDion2 reduce over the gathered (contiguous) stack instead of a
        # transposed view, so their sums may run in another order: equal to fp32 rounding.
        atol = 1e-6 if name.startswith("nor") else 0
        assert_same(result["params"], single["params"], atol=atol)
        assert_same(result["state"], single["state"], atol=atol)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_overlapped_buckets_equal_the_serial_order_bit_for_bit(distributed_results, name):
    world_size, results = distributed_results
    for rank in range(world_size):
        assert_same(results[(name, rank)]["params"], results[(name + "_serial", rank)]["params"], atol=0)
        assert_same(results[(name, rank)]["state"], results[(name + "_serial", rank)]["state"], atol=0)


@pytest.mark.slow
def test_each_matrix_is_orthonormalized_once_and_dion2_moves_a_fraction(distributed_results):
    world_size, results = distributed_results
    muon = results[("muon", 0)]["comm_bytes"]
    # Muon gathers every update once per step: buckets of 5 and 2 matrices and a batch of 2,
    # padded to a multiple of the world size, of which a rank receives all but its own share.
    shares = [-(-count // world_size) for count in (5, 2, 2)]
    sizes = [16 * 24, 16 * 24, 8 * 12]
    expected = STEPS * 4 * sum((world_size - 1) * s * n for s, n in zip(shares, sizes, strict=True))
    assert muon == expected
    quarter = results[("dion2_l1_quarter", 0)]["comm_bytes"]
    full = results[("dion2_l1_full", 0)]["comm_bytes"]
    assert full == muon  # fraction 1 orthonormalizes and moves all of every matrix
    # Fraction 0.25 selects 4 of 16 slices (2 of 8 for the batch): a quarter of the bytes.
    assert quarter * 4 == muon
    assert results[("adamw_only", 0)]["comm_bytes"] == 0


# Sharded layouts: (world size, mesh shape, mesh dim names, placements of matrix i, the
# optimizer's distributed_mesh). TP layouts alternate colwise (rows split over tp) and rowwise
# (columns split) matrices, as the model's q and out are; FSDP over TP shards the other side.
LAYOUTS = {
    "fsdp2": (2, (2,), ("fs",), lambda i: [Shard(0)], lambda mesh: mesh),
    "fsdp3": (3, (3,), ("fs",), lambda i: [Shard(0)], lambda mesh: mesh),
    "fsdp4": (4, (4,), ("fs",), lambda i: [Shard(0)], lambda mesh: mesh),
    "hsdp2x2": (4, (2, 2), ("dp", "fs"), lambda i: [Replicate(), Shard(0)], lambda mesh: mesh["fs"]),
    "tp2": (2, (2,), ("tp",), lambda i: [Shard(i % 2)], lambda mesh: mesh),
    "fsdp2xtp2": (
        4,
        (2, 2),
        ("fs", "tp"),
        lambda i: [Shard(1 - i % 2), Shard(i % 2)],
        lambda mesh: mesh["fs", "tp"]._flatten("fs_tp"),
    ),
}
# The replicas that split the work of sharded matrices (HSDP's dp).
REPLICAS = {"hsdp2x2": lambda mesh: mesh["dp"]}
# Dion's (outer_shard_mesh, inner_shard_mesh) on each layout's mesh.
DION_MESHES = {
    "hsdp2x2": lambda mesh: (mesh["fs"], None),
    "tp2": lambda mesh: (None, mesh),
    "fsdp2xtp2": lambda mesh: (mesh["fs"], mesh["tp"]),
}
# Rows as slices (16 x 24), columns as slices (24 x 16), an uneven split (10 x 12 over 4 ranks:
# 3, 3, 3, 1) and a matrix with fewer rows than ranks (2 x 12: empty shards).
SHARDED_SHAPES = [(16, 24)] * 3 + [(24, 16)] * 2 + [(10, 12), (2, 12)]
SHARDED_CASES = {
    "muon": (Muon, {"nesterov": True}),
    "normuon": (NorMuon, {}),
    "dion2_global_l1": (Dion2, {"selection_scope": "global"}),
    "dion2_global_random": (Dion2, {"selection_scope": "global", "selection": "random"}),
    "dion2_local_l1": (Dion2, {"selection_scope": "local"}),
    "dion2_local_l1_full_decay": (Dion2, {"selection_scope": "local", "decay": "full"}),
    "nordion2_global_l1": (NorDion2, {"selection_scope": "global"}),
    "nordion2_global_random": (NorDion2, {"selection_scope": "global", "selection": "random"}),
    "nordion2_local_l1": (NorDion2, {"selection_scope": "local"}),
    # Per-head updates: every head is a matrix of its own, spread over the ranks' blocks.
    "normuon_heads": (NorMuon, {"num_heads": 2}),
    "dion2_heads_global": (Dion2, {"selection_scope": "global", "num_heads": 2}),
    "nordion2_split_global": (NorDion2, {"selection_scope": "global", "split_sizes": "3/4"}),
    "dion": (Dion, {"rank_fraction": 0.5}),
}
# Param-group options among the cases' settings. "3/4" splits each matrix's rows into a block
# of about 3/4 and the rest (a group of its own per matrix, as the shapes differ).
GROUP_OPTIONS = ("num_heads", "split_sizes")


def group_of(params, kwargs):
    """The param groups of a case, with its group options."""
    options = {k: v for k, v in kwargs.items() if k in GROUP_OPTIONS}
    if options.get("split_sizes") == "3/4":
        return [
            {"params": [p], **({"split_sizes": [len(p) - len(p) // 4, len(p) // 4]} if len(p) >= 4 else {})}
            for p in params
        ]
    return [{"params": params, **options}]


DION2_SETTINGS = {Dion2: {"fraction": 0.3, "ef_decay": 0.9}, NorDion2: {"fraction": 0.3, "mu": 0.9}}


def run_sharded(name, layout=None, mesh=None, overlap=2, **options):
    """STEPS steps of a case on SHARDED_SHAPES, sharded as `layout` says over `mesh` (whole
    matrices in one process), with `options` added to the case's. Returns full weights and
    momenta, and what the test needs."""
    cls, kwargs = SHARDED_CASES[name]
    kwargs = {**DION2_SETTINGS.get(cls, {}), **kwargs, **options}
    gen = torch.Generator().manual_seed(1)
    fulls = [torch.randn(s, generator=gen) for s in SHARDED_SHAPES]
    grads = [[torch.randn(s, generator=gen) for s in SHARDED_SHAPES] for _ in range(STEPS)]
    if mesh is None:
        shard, full, optimizer_mesh = (lambda t, i: t), (lambda t: t), None
    else:
        placements, optimizer_mesh = LAYOUTS[layout][3], LAYOUTS[layout][4](mesh)
        shard, full = (lambda t, i: distribute_tensor(t, mesh, placements(i))), (lambda t: t.full_tensor())
    params = [shard(f, i) for i, f in enumerate(fulls)]
    if cls is Dion:
        meshes = (None, None) if mesh is None else DION_MESHES.get(layout, lambda mesh: (mesh, None))(mesh)
        opt = cls(params, lr=0.02, outer_shard_mesh=meshes[0], inner_shard_mesh=meshes[1], **kwargs)
    else:
        # Replicas that only split the work: the gradients are already synchronized.
        replicas = {"replicate_mesh": REPLICAS[layout](mesh)} if layout in REPLICAS else {}
        if replicas and issubclass(cls, Dion2):
            replicas["replicate_mesh_grad_sync"] = False
        settings = {k: v for k, v in kwargs.items() if k not in GROUP_OPTIONS}
        opt = cls(group_of(params, kwargs), lr=0.02, distributed_mesh=optimizer_mesh, **replicas, **settings)
        opt.overlap = overlap
    for step_grads in grads:
        for i, (p, g) in enumerate(zip(params, step_grads, strict=True)):
            p.grad = shard(g, i)
        opt.step()
    return {
        "fulls": fulls,
        "grads": grads,
        "params": [full(p) for p in params],
        "momentum": [full(opt.state[p]["momentum"]) for p in params],
        "stats": opt.selection_stats() if issubclass(cls, Dion2) else None,
        "moments": [full_moment(opt.state[p]) for p in params],
        "comm_bytes": opt.comm_bytes(),
    }


# The sharded cases also run one bucket at a time, to compare with the overlapped run.
SERIAL_CASES = ("normuon", "dion2_local_l1", "nordion2_split_global")


@pytest.mark.slow
@pytest.mark.parametrize("name", SERIAL_CASES)
def test_overlapped_sharded_buckets_equal_the_serial_order_bit_for_bit(sharded_results, name):
    layout, results = sharded_results
    for rank in range(LAYOUTS[layout][0]):
        overlapped, serial = results[(name, rank)], results[(name + "_serial", rank)]
        assert_same(overlapped["params"], serial["params"], atol=0)
        assert_same(overlapped["momentum"], serial["momentum"], atol=0)


def full_moment(state):
    """A NorMuon or NorDion2 state's per-row second moment (replicated), else None."""
    return state.get("row_second_moment")


def layout_worker(rank, world_size, init_file, out_dir, layout):
    with gloo(rank, world_size, init_file):
        _, shape, names, _, _ = LAYOUTS[layout]
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
        for name in SHARDED_CASES:
            torch.save(run_sharded(name, layout, mesh), os.path.join(out_dir, f"{name}_{rank}.pt"))
        for name in SERIAL_CASES:
            torch.save(
                run_sharded(name, layout, mesh, overlap=1), os.path.join(out_dir, f"{name}_serial_{rank}.pt")
            )
        if layout == "fsdp2xtp2":  # a mesh that holds only some of the blocks is refused
            p = distribute_tensor(torch.zeros(8, 8), mesh, [Shard(1), Shard(0)])
            try:
                Muon([p], distributed_mesh=mesh["fs"])
            except ValueError as e:
                torch.save(str(e), os.path.join(out_dir, f"refused_{rank}.pt"))


@pytest.fixture(scope="module", params=list(LAYOUTS))
def sharded_results(request, tmp_path_factory):
    layout = request.param
    world_size = LAYOUTS[layout][0]
    out = tmp_path_factory.mktemp(layout)
    mp.spawn(layout_worker, args=(world_size, str(out / "init"), str(out), layout), nprocs=world_size)
    results = {
        (name, rank): torch.load(out / f"{name}_{rank}.pt")
        for name in [*SHARDED_CASES, *(f"{n}_serial" for n in SERIAL_CASES)]
        for rank in range(world_size)
    }
    if (out / "refused_0.pt").exists():
        results["refused"] = torch.load(out / "refused_0.pt")
    return layout, results


def slice_ranges(layout, i, shape, rows):
    """The slice ranges that select on their own under the local scope: the shards of the
    shorter side, or of the rows with `rows` (one range when that side is not split)."""
    world, mesh_shape, _, placements, _ = LAYOUTS[layout]
    dim = 0 if rows or shape[0] <= shape[1] else 1
    parts = math.prod(size for size, pl in zip(mesh_shape, placements(i), strict=True) if pl == Shard(dim))
    chunk = -(-shape[dim] // parts)
    return [(lo, min(lo + chunk, shape[dim])) for lo in range(0, shape[dim], chunk)]


def local_scope_reference(result, layout, decay, nordion2):
    """The local rule in float64: each slice range picks its top ceil(0.3 x its size) slices
    by l1 norm over the whole slice; the union is orthonormalized as one matrix (NorDion2: on
    the rows, then normalized per row)."""
    from tests.test_optimizers import ref_dion2, ref_nordion2

    params = []
    for i, shape in enumerate(SHARDED_SHAPES):
        w, m = result["fulls"][i].double(), torch.zeros(shape, dtype=torch.float64)
        v = torch.zeros(shape[0], dtype=torch.float64)
        rows_are_slices = nordion2 or shape[0] <= shape[1]
        for step_grads in result["grads"]:
            g = step_grads[i].double()
            acc = (m + g) if rows_are_slices else (m + g).T
            picks = []
            for lo, hi in slice_ranges(layout, i, shape, nordion2):
                k = -(-3 * (hi - lo) // 10)
                picks += (acc[lo:hi].abs().sum(dim=1).topk(k).indices + lo).tolist()
            rows = torch.tensor(sorted(picks))
            if nordion2:
                w, m, v = ref_nordion2(w, g, m, v, 0.02, 0.3, 0.9, 0.01, 0.95, 1e-8, rows=rows, decay=decay)
            else:
                w, m = ref_dion2(w, g, m, 0.02, 0.3, 0.9, 0.01, rows=rows, decay=decay)
        params.append(w)
    return params


@pytest.mark.slow
def test_a_mesh_that_does_not_tile_the_matrix_is_refused(sharded_results):
    layout, results = sharded_results
    if layout != "fsdp2xtp2":
        pytest.skip("checked on the FSDP x TP layout")
    assert results["refused"] == (
        "a parameter of shape (8, 8) (placements (Shard(dim=1), Shard(dim=0))) is not tiled by the 2 "
        "ranks of distributed_mesh; pass the mesh that shards it"
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SHARDED_CASES))
def test_sharded_step_equals_single_process(sharded_results, name):
    layout, results = sharded_results
    world_size = LAYOUTS[layout][0]
    for rank in range(world_size):
        result = results[(name, rank)]
        assert result["comm_bytes"] > 0
        assert result["stats"] == results[(name, 0)]["stats"]  # the diagnostics agree on every rank
        if "local" in name:
            decay = "full" if "full" in name else "selective"
            reference = local_scope_reference(result, layout, decay, name.startswith("nordion2"))
            for got, want in zip(result["params"], reference, strict=True):
                torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
        else:
            # Whole matrices are assembled bit for bit; only l1 norms, NorMuon's row sums and
            # Dion's low-rank products over split rows or columns are summed in another order.
            single = run_sharded(name)
            assert_same(result["params"], single["params"], atol=1e-6)
            assert_same(result["momentum"], single["momentum"], atol=1e-6)
            assert_same(result["moments"], single["moments"], atol=1e-6)
            assert result["stats"] == single["stats"]


class Widened:
    """A collective's Pending whose result arrives in fp32 and is cast to `dtype` on wait()."""

    def __init__(self, pending, dtype):
        self.pending, self.dtype = pending, dtype

    def wait(self):
        result = self.pending.wait()
        return [t.to(self.dtype) for t in result] if isinstance(result, list) else result.to(self.dtype)


@contextlib.contextmanager
def fp32_on_the_wire():
    """Every exchange and all-gather of the optimizers sent in fp32 and cast back on arrival:
    the bytes the blocks cost before they travelled in the compute dtype."""
    exchange, all_gather = Communicator.exchange, Communicator.all_gather_stack

    def wide_exchange(self, outgoing, incoming, dtype, device, async_op=False):
        widened = Widened(exchange(self, outgoing, incoming, torch.float32, device, async_op=True), dtype)
        return widened if async_op else widened.wait()

    def wide_all_gather(self, mine, total, async_op=False):
        widened = Widened(all_gather(self, mine.float(), total, async_op=True), mine.dtype)
        return widened if async_op else widened.wait()

    Communicator.exchange, Communicator.all_gather_stack = wide_exchange, wide_all_gather
    try:
        yield
    finally:
        Communicator.exchange, Communicator.all_gather_stack = exchange, all_gather


WIRE_CASES = ("muon", "dion2_global_l1")


def wire_worker(rank, world_size, init_file, out_dir, layout):
    with gloo(rank, world_size, init_file):
        _, shape, names, _, _ = LAYOUTS[layout]
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
        for name in WIRE_CASES:
            bf16 = run_sharded(name, layout, mesh, ns_dtype=torch.bfloat16)
            with fp32_on_the_wire():
                fp32 = run_sharded(name, layout, mesh, ns_dtype=torch.bfloat16)
            torch.save((bf16, fp32), os.path.join(out_dir, f"{name}_{rank}.pt"))


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["fsdp2", "hsdp2x2"])
def test_blocks_travel_in_the_compute_dtype_for_the_same_bits(tmp_path, layout):
    # With Newton-Schulz in bf16 the owners received fp32 blocks whose first use is the cast
    # to bf16, and HSDP's replicas all-gathered fp32 copies of bf16 results.
    world_size = LAYOUTS[layout][0]
    mp.spawn(wire_worker, args=(world_size, str(tmp_path / "init"), str(tmp_path), layout), nprocs=world_size)
    for name in WIRE_CASES:
        for rank in range(world_size):
            bf16, fp32 = torch.load(tmp_path / f"{name}_{rank}.pt")
            assert_same(bf16["params"], fp32["params"], atol=0)
            assert_same(bf16["momentum"], fp32["momentum"], atol=0)
            if name == "muon":  # Muon moves nothing but its blocks: half the bytes
                assert 2 * bf16["comm_bytes"] == fp32["comm_bytes"] > 0
            else:  # Dion2 also sums its l1 norms in fp32
                assert bf16["comm_bytes"] < fp32["comm_bytes"]


# Compressed data-parallel sync: each replica holds its own gradient, and the optimizer
# averages only M[K] (Dion2, random selection) or P and R (Dion). The reference is one process
# stepping on the replicas' mean gradient.
COMPRESSED_CASES = {
    "dion2_random": (Dion2, {"fraction": 0.5, "selection": "random"}),
    "nordion2_random": (NorDion2, {"fraction": 0.5, "selection": "random"}),
    "dion": (Dion, {"rank_fraction": 0.5}),
}


def run_compressed(name, rank=None, world_size=1):
    """STEPS steps on replica `rank` of `world_size` (rank None: one process on the mean
    gradient). Returns the weights, and the momenta before and after synchronize_for_checkpoint."""
    cls, kwargs = COMPRESSED_CASES[name]
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(s, generator=gen) for s in SHAPES]
    grads = [
        [[torch.randn(s, generator=gen) for s in SHAPES] for _ in range(world_size)] for _ in range(STEPS)
    ]
    mesh = {"replicate_mesh": dist.group.WORLD} if rank is not None else {}
    if issubclass(cls, Dion2) and rank is not None:
        mesh["distributed_mesh"] = dist.group.WORLD
    opt = cls(params, lr=0.02, **mesh, **kwargs)
    for replica_grads in grads:
        for i, p in enumerate(params):
            if rank is None:
                p.grad = torch.stack([g[i] for g in replica_grads]).mean(0)
            else:
                p.grad = replica_grads[rank][i]
        opt.step()
    drifted = [opt.state[p]["momentum"].clone() for p in params]
    opt.synchronize_for_checkpoint()
    return {
        "params": params,
        "drifted": drifted,
        "momentum": [opt.state[p]["momentum"] for p in params],
        "comm_bytes": opt.comm_bytes(),
    }


def compressed_worker(rank, world_size, init_file, out_dir):
    with gloo(rank, world_size, init_file):
        for name in COMPRESSED_CASES:
            result = run_compressed(name, rank, world_size)
            torch.save(result, os.path.join(out_dir, f"{name}_{rank}.pt"))


@pytest.mark.slow
def test_compressed_sync_equals_the_synchronized_run(tmp_path):
    mp.spawn(compressed_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    for name in COMPRESSED_CASES:
        single = run_compressed(name, world_size=2)
        results = [torch.load(tmp_path / f"{name}_{rank}.pt") for rank in range(2)]
        for result in results:
            assert_same(result["params"], results[0]["params"], atol=0)  # equal on every replica
            assert_same(result["params"], single["params"], atol=1e-6)
            # Averaged before a save, the momenta are the synchronized run's.
            assert_same(result["momentum"], single["momentum"], atol=1e-6)
        # Between saves each replica keeps its own momentum.
        assert not torch.equal(results[0]["drifted"][0], results[1]["drifted"][0])


# Batches of matrices (MoE experts) split along dim 0: each rank updates its own matrices, and
# the result is the single-process one. 5 experts over 2 ranks: 3 and 2.
BATCH_CASES = {
    "muon": (Muon, {}),
    "normuon": (NorMuon, {}),
    "dion2_random": (Dion2, {"fraction": 0.3, "selection": "random"}),
    "nordion2": (NorDion2, {"fraction": 0.3}),
}


def run_batch_sharded(name, mesh=None):
    """STEPS steps on a (5, 12, 20) batch and a (12, 20) matrix, the batch Shard(0) over `mesh`."""
    cls, kwargs = BATCH_CASES[name]
    gen = torch.Generator().manual_seed(4)
    fulls = [torch.randn(5, 12, 20, generator=gen), torch.randn(12, 20, generator=gen)]
    grads = [[torch.randn(f.shape, generator=gen) for f in fulls] for _ in range(STEPS)]

    # The matrix stays a plain tensor, replicated: its work is split over the ranks as under DDP.
    def shard(t, i):
        return t if mesh is None or i else distribute_tensor(t, mesh, [Shard(0)])

    params = [shard(f, i) for i, f in enumerate(fulls)]
    opt = cls(params, lr=0.02, distributed_mesh=mesh, **kwargs)
    for step_grads in grads:
        for i, (p, g) in enumerate(zip(params, step_grads, strict=True)):
            p.grad = shard(g, i)
        opt.step()

    def full(t):
        return t.full_tensor() if isinstance(t, DTensor) else t

    return {
        "params": [full(p) for p in params],
        "moments": [
            full(v) if (v := opt.state[p].get("row_second_moment")) is not None else None for p in params
        ],
        "stats": opt.selection_stats() if issubclass(cls, Dion2) else None,
    }


def batch_worker(rank, world_size, init_file, out_dir):
    with gloo(rank, world_size, init_file):
        mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("fs",))
        for name in BATCH_CASES:
            torch.save(run_batch_sharded(name, mesh), os.path.join(out_dir, f"{name}_{rank}.pt"))


@pytest.mark.slow
def test_a_batch_sharded_along_dim_0_equals_single_process(tmp_path):
    mp.spawn(batch_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    for name in BATCH_CASES:
        single = run_batch_sharded(name)
        for rank in range(2):
            result = torch.load(tmp_path / f"{name}_{rank}.pt")
            assert_same(result["params"], single["params"], atol=1e-6)
            assert_same(result["moments"], single["moments"], atol=1e-6)
            assert result["stats"] == single["stats"]
