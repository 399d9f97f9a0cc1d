"""planning/layout_plan.py against the optimizers: on every layout at 2 to 4 gloo ranks, the
planned bytes of each rank equal the `comm_bytes` its optimizer measured, exactly; and the
planned memory equals the optimizer's state in one process."""

import os
import re
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from optimizers.dion2 import selected_runs_global
from parallel.layout import Layout
from parallel.process_group import DistContext
from planning.layout_plan import block_of, plan_rank
from tests.conftest import REPO, TINY, gloo, torchrun, train_argv
from training.config import load_config
from training.metrics import read_metrics
from training.run_setup import build_run

SHAPE = {**TINY, "model_dim": 64, "n_layer": 2, "n_head": 4, "lr": 0.02, "scalar_lr": 0.01}
OPTIMIZERS = {
    "muon": {"optimizer": "muon"},
    "normuon": {"optimizer": "normuon"},
    "dion2-local": {"optimizer": "dion2", "ortho_fraction": 0.25},
    "dion2-global": {"optimizer": "dion2", "ortho_fraction": 0.25, "selection_scope": "global"},
    "nordion2-global": {"optimizer": "nordion2", "ortho_fraction": 0.5, "selection_scope": "global"},
    "dion": {"optimizer": "dion", "ortho_fraction": 0.5},
}
# Compressed sync: the replicas average the selected rows or the low-rank factors themselves.
COMPRESSED = {
    f"{name}-compressed": {
        **OPTIMIZERS[name],
        "replicate_mesh_grad_sync": True,
        "grad_clip": 0,
        **({"selection": "random"} if name == "dion2-local" else {}),
    }
    for name in ("dion2-local", "dion")
}
LAYOUTS = {
    "ddp2": Layout(dp=2),
    "ddp3": Layout(dp=3),
    "fsdp2": Layout(fs=2),
    "fsdp3": Layout(fs=3),
    "tp2": Layout(tp=2),
    "hsdp2x2": Layout(dp=2, fs=2),
    "fsdp2xtp2": Layout(fs=2, tp=2),
}


def config(layout, options):
    """The tiny config of an optimizer case on `layout`."""
    values = {**SHAPE, **options, "dp_size": layout.dp, "fs_size": layout.fs, "tp_size": layout.tp}
    values |= {"batch_size": 2 * layout.dp * layout.fs, "device_batch_size": 2}  # one micro-batch
    if options["optimizer"] != "dion":
        values["ns_dtype"] = "fp32"
    return load_config([item for k, v in values.items() for item in (f"--{k}", str(v))])


def selection_runs(layout, optimizer, model, rank):
    """Where each matrix's global selection of the first step fell in each rank's range, read back
    from the optimizer's record of it (`last_selected`) by Dion2's own function."""
    runs = {}
    for name, p in model.param_roles()["matrix"]:
        chosen = (optimizer.state[p]["last_selected"] == 1).nonzero()[:, 1].unsqueeze(0)
        shape = tuple(p.shape)
        rows = type(optimizer).selects_rows(*shape)
        span = [block_of(name, shape, layout, r) for r in layout.groups(rank)["distributed"]]
        runs[name] = selected_runs_global([chosen], [[b if rows else b.transposed() for b in span]])[0]
    return runs


def measure(layout, rank, world_size):
    """{case: (measured bytes of the first step, planned bytes)} on this rank."""
    ctx = DistContext(rank, world_size, torch.device("cpu"))
    results = {}
    cases = {**OPTIMIZERS, **(COMPRESSED if layout.dp > 1 else {})}
    for case, options in cases.items():
        cfg = config(layout, options)
        run = build_run(cfg, layout, ctx, data="random")
        model, optimizer = run.model, run.optimizer
        run.accumulate()
        optimizer.step()
        measured = optimizer.comm_bytes()
        runs = selection_runs(layout, optimizer, model, rank) if "global" in case else None
        planned = plan_rank(cfg, layout, rank, torch.float32, runs).traffic.total_received()
        results[case] = (measured, planned)
    return results


def worker(rank, world_size, init_file, out_dir, layout_name):
    with gloo(rank, world_size, init_file):
        results = measure(LAYOUTS[layout_name], rank, world_size)
        torch.save(results, os.path.join(out_dir, f"{rank}.pt"))


@pytest.mark.slow
@pytest.mark.parametrize("layout_name", list(LAYOUTS))
def test_planned_bytes_equal_the_measured(tmp_path, layout_name):
    world = LAYOUTS[layout_name].world_size
    mp.spawn(worker, args=(world, str(tmp_path / "init"), str(tmp_path), layout_name), nprocs=world)
    for rank in range(world):
        results = torch.load(tmp_path / f"{rank}.pt")
        for case, (measured, planned) in results.items():
            assert planned == measured, (layout_name, case, rank)
            # Only Dion under plain DDP moves nothing: DDP has averaged its gradients.
            assert measured > 0 or (case == "dion" and not LAYOUTS[layout_name].sharded)
        assert any("compressed" in case for case in results) == (LAYOUTS[layout_name].dp > 1)


@pytest.mark.slow
def test_train_py_under_torchrun_logs_the_planned_bytes(tmp_path):
    settings = {k: SHAPE[k] for k in ("model_dim", "n_layer", "n_head", "lr", "scalar_lr")}
    settings |= {"num_iterations": 3, "optimizer": "muon"}
    layout = ["--fs_size", "2", "--tp_size", "2"]
    result = torchrun(4, [*train_argv(tmp_path, "run", **settings), *layout])
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3], result.stderr[-3000:]
    planned = plan_rank(
        config(Layout(fs=2, tp=2), {"optimizer": "muon"}), Layout(fs=2, tp=2), 0, torch.float32
    )
    assert {r["comm_bytes"] for r in records} == {planned.traffic.total_received()}


@pytest.mark.parametrize("case", list(OPTIMIZERS))
def test_planned_memory_equals_the_optimizers_state_in_one_process(case):
    cfg = config(Layout(), OPTIMIZERS[case])
    run = build_run(cfg, Layout(), DistContext(0, 1, torch.device("cpu")), data="random")
    model, optimizer = run.model, run.optimizer
    plan = plan_rank(cfg, Layout())
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values())
    # A micro-batch's logits in bf16 (`precision: auto` on the GPU the planner assumes), their
    # fp32 copy and its gradient; TP splits them over the vocabulary.
    logits = cfg.device_batch_size * cfg.sequence_length * model.config.padded_vocab_size * (2 + 4 + 4)
    assert plan.memory == {
        "weights": weights,
        "gradients": weights,
        "optimizer state": state,
        "logits": logits,
    }
    assert plan_rank(config(Layout(tp=2), OPTIMIZERS[case]), Layout(tp=2)).memory["logits"] == logits // 2
    assert plan.traffic.total_received() == 0


def run_plan(*args):
    return subprocess.run(
        [sys.executable, "scripts/plan_layout.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_plan_layout_prints_the_paper_1b_table():
    done = run_plan("--params", "1B", "--world", "64", "--layout", "8,8,1", "--fraction", "0.5,0.25")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("rank 0 of 64 (dp x fs x tp = 8 x 8 x 1); assumed h100: 989 TFLOP/s bf16")
    rows = {}
    for line in done.stdout.splitlines():
        if m := re.match(r"\| (muon|dion2 [\d.]+) \| ([\d,.]+) \| ([\d,.]+) \| ([\d,.]+) \|", line):
            rows[m.group(1)] = sum(float(x.replace(",", "")) for x in m.groups()[1:])
    assert list(rows) == ["muon", "dion2 0.5", "dion2 0.25"]
    # Dion2 moves its selected rows only: half and a quarter of Muon's exchanges and gathers.
    assert rows["muon"] > rows["dion2 0.5"] > rows["dion2 0.25"]


def test_plan_layout_writes_its_report_with_command_and_commit(tmp_path):
    out = tmp_path / "plan.md"
    done = run_plan("--params", "160M", "--world", "2", "--layout", "1,2,1", "--write", str(out))
    assert done.returncode == 0, done.stderr
    header, report = out.read_text().split("\n\n", 1)
    assert header.startswith("Written by `python scripts/plan_layout.py --params 160M --world 2")
    assert " at commit " in header and report == done.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--layout", "8,4,1"],
            "error: dp_size x fs_size x tp_size = 8 x 4 x 1 = 32 must equal the world size 64",
        ),
        (["--layout", "8,8"], "--layout must be three positive integers dp,fs,tp, got '8,8'"),
        (["--layout", "8,8,1", "--optimizer", "sgd"], "--optimizer 'sgd': unknown sgd; allowed: dion2"),
        (["--layout", "8,8,1", "--fraction", "1.5"], "error: ortho_fraction must lie in (0, 1], got 1.5"),
        (
            ["--layout", "8,4,2", "--params", "8B", "--ortho_per_head"],
            "unrecognized arguments: --ortho_per_head",
        ),
    ],
)
def test_plan_layout_bad_input_is_one_line(args, message):
    if "--params" not in args:
        args = ["--params", "1B", *args]
    done = run_plan("--world", "64", *args)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert message in done.stderr


def test_an_optimizer_that_does_not_describe_itself_is_one_line(monkeypatch):
    from optimizers import Muon
    from optimizers.matrix_optimizer import MatrixOptimizer
    from planning.layout_plan import PlanError

    monkeypatch.setattr(Muon, "plan_bucket", MatrixOptimizer.__dict__["plan_bucket"])
    with pytest.raises(
        PlanError, match="optimizer muon is not modelled by the planner: Muon has no plan_bucket"
    ):
        plan_rank(config(Layout(fs=2), {"optimizer": "muon"}), Layout(fs=2))
