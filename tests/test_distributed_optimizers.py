"""Distributed optimizer steps (gloo, several processes) against the single-process step."""

import contextlib
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from optimizers import AdamWLion, Dion2, Muon, NorMuon

# Five matrices of one shape (an uneven split over 2 or 3 ranks), two of another, a batch of
# matrices, and a vector in an AdamW group.
SHAPES = [(16, 24)] * 5 + [(24, 16)] * 2 + [(2, 8, 12)]
CASES = {
    "muon": (Muon, {"nesterov": True}),
    "normuon": (NorMuon, {}),
    "dion2_l1_quarter": (Dion2, {"fraction": 0.25}),
    "dion2_l1_full": (Dion2, {"fraction": 1.0}),
    "dion2_random": (Dion2, {"fraction": 0.5, "selection": "random"}),
    "adamw_only": (AdamWLion, {}),
}
STEPS = 3


def run_case(name, distributed_mesh=None):
    """Build the case's parameters from a fixed seed, take STEPS steps; return the state."""
    cls, kwargs = CASES[name]
    gen = torch.Generator().manual_seed(0)
    matrices = [torch.randn(s, generator=gen) for s in SHAPES]
    vector = torch.randn(7, generator=gen)
    groups = [{"params": matrices}, {"params": [vector], "algorithm": "adamw"}]
    if cls is AdamWLion:
        opt = cls(groups, lr=0.02)
    else:
        opt = cls(groups, lr=0.02, distributed_mesh=distributed_mesh, **kwargs)
    for _ in range(STEPS):
        for p in [*matrices, vector]:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    moved = opt.comm_bytes() if hasattr(opt, "comm_bytes") else 0
    return {"params": [*matrices, vector], "state": opt.state_dict()["state"], "comm_bytes": moved}


@contextlib.contextmanager
def gloo(rank, world_size, init_file):
    """A gloo process group for one spawned worker, torn down cleanly."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def worker(rank, world_size, init_file, names, out_dir):
    with gloo(rank, world_size, init_file):
        for name in names:
            result = run_case(name, distributed_mesh=dist.group.WORLD)
            torch.save(result, os.path.join(out_dir, f"{name}_{rank}.pt"))


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def distributed_results(request, tmp_path_factory):
    world_size = request.param
    out = tmp_path_factory.mktemp(f"ddp{world_size}")
    mp.spawn(worker, args=(world_size, str(out / "init"), list(CASES), str(out)), nprocs=world_size)
    return world_size, {
        (name, rank): torch.load(out / f"{name}_{rank}.pt") for name in CASES for rank in range(world_size)
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
        # The same batched kernels on a sub-stack give bit-equal results. NorMuon's row means
        # reduce over the gathered (contiguous) stack instead of a transposed view, so its
        # sums run in another order: equal to fp32 rounding.
        atol = 1e-6 if name == "normuon" else 0
        assert_same(result["params"], single["params"], atol=atol)
        assert_same(result["state"], single["state"], atol=atol)


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


# Row-sharded (FSDP's Shard(0)) matrices: uneven chunks, and a 2-row matrix that leaves one of
# three ranks an empty shard.
SHARDED_SHAPES = [(16, 24)] * 5 + [(24, 16)] * 2 + [(2, 12)]


def run_row_sharded(build, shapes, seed, mesh=None):
    """STEPS steps of the optimizer `build(params, mesh)` on matrices whose rows are sharded over
    `mesh` as FSDP shards them (whole matrices in one process). Returns the full results and
    the optimizer."""
    gen = torch.Generator().manual_seed(seed)
    fulls = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(STEPS)]
    shard = (lambda t: distribute_tensor(t, mesh, [Shard(0)])) if mesh is not None else (lambda t: t)
    full = (lambda t: t.full_tensor()) if mesh is not None else (lambda t: t)
    params = [shard(f) for f in fulls]
    opt = build(params, mesh)
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = shard(g)
        opt.step()
    result = {
        "fulls": fulls,
        "grads": grads,
        "params": [full(p) for p in params],
        "momentum": [full(opt.state[p]["momentum"]) for p in params],
    }
    return result, opt


def run_sharded_muon(mesh=None):
    def build(params, mesh):
        return Muon(params, lr=0.02, nesterov=True, distributed_mesh=mesh)

    result, opt = run_row_sharded(build, SHARDED_SHAPES, 1, mesh)
    return {**result, "comm_bytes": opt.comm_bytes()}


def sharded_worker(rank, world_size, init_file, out_dir, names):
    """Run the named row-sharded cases ("muon" or a DION2_CASES name) on a 1-D fs mesh."""
    with gloo(rank, world_size, init_file):
        mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("fs",))
        for name in names:
            result = run_sharded_muon(mesh) if name == "muon" else run_sharded_dion2(name, mesh)
            torch.save(result, os.path.join(out_dir, f"{name}_{rank}.pt"))


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3])
def test_row_sharded_muon_equals_single_process(tmp_path, world_size):
    mp.spawn(
        sharded_worker, args=(world_size, str(tmp_path / "init"), str(tmp_path), ["muon"]), nprocs=world_size
    )
    single = run_sharded_muon()
    for rank in range(world_size):
        result = torch.load(tmp_path / f"muon_{rank}.pt")
        assert_same(result["params"], single["params"], atol=0)
        assert_same(result["momentum"], single["momentum"], atol=0)
        assert result["comm_bytes"] > 0


# Dion2 on row shards: rows as slices (16 x 24, and 2 x 12 with an empty shard on 3 ranks),
# and columns as slices (24 x 16).
DION2_SHAPES = [(16, 24)] * 3 + [(24, 16)] * 2 + [(2, 12)]
DION2_CASES = {
    "global_l1": {"selection_scope": "global"},
    "global_random": {"selection_scope": "global", "selection": "random"},
    "local_l1": {"selection_scope": "local"},
    "local_l1_full_decay": {"selection_scope": "local", "decay": "full"},
}


def run_sharded_dion2(name, mesh=None):
    def build(params, mesh):
        return Dion2(params, lr=0.02, fraction=0.3, ef_decay=0.9, distributed_mesh=mesh, **DION2_CASES[name])

    result, opt = run_row_sharded(build, DION2_SHAPES, 2, mesh)
    return {**result, "stats": opt.selection_stats()}


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def dion2_sharded(request, tmp_path_factory):
    world_size = request.param
    out = tmp_path_factory.mktemp(f"dion2_fs{world_size}")
    mp.spawn(
        sharded_worker, args=(world_size, str(out / "init"), str(out), list(DION2_CASES)), nprocs=world_size
    )
    return world_size, {
        (name, rank): torch.load(out / f"{name}_{rank}.pt")
        for name in DION2_CASES
        for rank in range(world_size)
    }


def local_scope_reference(result, world_size, decay):
    """The local rule in float64: each shard's top ceil(0.3 x its rows) rows by l1; the union
    is orthonormalized as one matrix (tall matrices select columns globally)."""
    from tests.test_optimizers import ref_dion2

    params = []
    for i, shape in enumerate(DION2_SHAPES):
        w, m = result["fulls"][i].double(), torch.zeros(shape, dtype=torch.float64)
        for step_grads in result["grads"]:
            g = step_grads[i].double()
            if shape[0] <= shape[1]:
                chunk = -(-shape[0] // world_size)
                acc, rows = m + g, []
                for s in range(world_size):
                    lo, hi = s * chunk, min((s + 1) * chunk, shape[0])
                    if hi > lo:
                        k = -(-3 * (hi - lo) // 10)
                        rows += (acc[lo:hi].abs().sum(dim=1).topk(k).indices + lo).tolist()
                w, m = ref_dion2(w, g, m, 0.02, 0.3, 0.9, 0.01, rows=torch.tensor(sorted(rows)), decay=decay)
            else:
                w, m = ref_dion2(w, g, m, 0.02, 0.3, 0.9, 0.01, decay=decay)
        params.append(w)
    return params


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DION2_CASES))
def test_row_sharded_dion2(dion2_sharded, name):
    world_size, results = dion2_sharded
    for rank in range(world_size):
        result = results[(name, rank)]
        assert result["stats"] == results[(name, 0)]["stats"]  # the diagnostics agree on every rank
        if name.startswith("global"):
            single = run_sharded_dion2(name)
            assert_same(result["params"], single["params"], atol=1e-6)
            assert_same(result["momentum"], single["momentum"], atol=1e-6)
            assert result["stats"] == single["stats"]
        else:
            decay = "full" if "full" in name else "selective"
            for got, want in zip(
                result["params"], local_scope_reference(result, world_size, decay), strict=True
            ):
                torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
