"""The CUDA path's bugs, shown on the CPU wherever a CPU can show them: gradient sync of a
compiled model, the device of each rank, CUDA RNG states across machines, and FSDP's mixed
precision computing what DDP's autocast computes."""

import datetime
import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

from parallel.process_group import DeviceError, DistContext, init_distributed
from tests.conftest import gloo, train_argv
from training.checkpoint import rng_state, set_rng_state
from training.config import load_config
from training.run_setup import build_run, layout_of


class CountCollectives(TorchDispatchMode):
    """Counts the c10d collectives run inside it whose op name holds one of `kinds`."""

    def __init__(self, *kinds):
        super().__init__()
        self.kinds, self.count = kinds, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if name.startswith("c10d::") and any(kind in name for kind in self.kinds):
            self.count += 1
        return func(*args, **(kwargs or {}))


def layout_steps(rank, world_size, cfg, steps, compiled):
    """(losses, gradient reductions per step) of a few steps of train.py's own parts."""
    run = build_run(cfg, layout_of(cfg, world_size), DistContext(rank, world_size, torch.device("cpu")))
    if compiled:  # what compile: true does, with a backend that compiles in no time
        run.forward = torch.compile(run.forward, backend="eager")
    losses, counts = [], []
    for _ in range(steps):
        with CountCollectives("allreduce", "reduce_scatter") as reduced:
            loss = run.accumulate()
        counts.append(reduced.count)
        losses.append(run.apply(loss, 1.0).train_loss)
    return losses, counts


def train_layout(rank, world_size, init_file, out_dir, name, flags, steps, compiled):
    """A few training steps on one gloo rank: the losses, and the gradient reductions of each
    step's micro-batches. The run (and its DDP or FSDP model) lives in layout_steps' frame, so it
    is freed before the ranks leave the group (see test_parallel_memory.ddp_worker)."""
    with gloo(rank, world_size, init_file):
        cfg = load_config(train_argv(out_dir, name, **flags))
        losses, counts = layout_steps(rank, world_size, cfg, steps, compiled)
    if rank == 0:
        torch.save({"losses": losses, "reductions": counts}, f"{out_dir}/{name}.pt")


def run_layouts(tmp_path, runs, steps=1, compiled=False):
    """{name: result} of `train_layout` on 2 ranks for each (name, flags) of `runs`."""
    results = {}
    for name, flags in runs.items():
        init_file = tmp_path / f"{name}.init"
        mp.spawn(
            train_layout, args=(2, str(init_file), str(tmp_path), name, flags, steps, compiled), nprocs=2
        )
        results[name] = torch.load(tmp_path / f"{name}.pt")
    return results


@pytest.mark.parametrize("layout", ["dp_size", "fs_size"])
@pytest.mark.slow
def test_a_compiled_model_reduces_its_gradients_once_per_step(tmp_path, layout):
    # Bug 2: torch.compile's wrapper hid DDP and FSDP from grad_sync, so every micro-batch
    # reduced the gradients. One micro-batch per step gives the count of one reduction.
    base = {"optimizer": "adamw", "batch_size": 8, "device_batch_size": 1, layout: 2}
    results = run_layouts(
        tmp_path,
        {"accumulate": base, "single": {**base, "batch_size": 2}},
        compiled=True,
    )
    once = results["single"]["reductions"][0]
    assert once > 0
    assert results["accumulate"]["reductions"][0] == once  # not 4 x once


@pytest.mark.slow
def test_fsdp_computes_in_bf16_what_ddp_computes(tmp_path):
    # Bug 7: FSDP's bf16 param_dtype also cast the embedding, and its cast of each block's
    # inputs made the residual stream and the rotary tables bf16, while DDP under autocast
    # keeps them fp32. Computing alike, FSDP 2 and DDP 2 differ in bf16 only by the order of
    # their gradient sums, as in fp32.
    base = {"optimizer": "muon", "lr": 0.02}
    runs = {
        f"{layout}_{precision}": {**base, layout: 2, "precision": precision}
        for layout in ("dp_size", "fs_size")
        for precision in ("fp32", "bf16")
    }
    losses = {name: r["losses"] for name, r in run_layouts(tmp_path, runs, steps=4).items()}

    def gap(precision):
        return max(
            abs(a - b)
            for a, b in zip(losses[f"dp_size_{precision}"], losses[f"fs_size_{precision}"], strict=True)
        )

    print(f"largest loss gap, DDP 2 vs FSDP 2: fp32 {gap('fp32'):.2e}, bf16 {gap('bf16'):.2e}")
    assert gap("bf16") <= max(10 * gap("fp32"), 1e-5)


@pytest.fixture
def gpus(monkeypatch):
    """A node with 4 visible (simulated) GPUs; returns the list of set_device calls."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    current = []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **options: current.append(backend))
    monkeypatch.setattr(dist, "get_rank", lambda: 6)
    monkeypatch.setattr(dist, "get_world_size", lambda: 8)
    return current


def under_torchrun(monkeypatch, local_rank):
    monkeypatch.setenv("RANK", str(4 + local_rank))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))


@pytest.mark.parametrize("device", ["cuda", "auto", "cuda:2"])
def test_each_torchrun_rank_computes_on_its_local_rank(gpus, monkeypatch, device):
    # Bug 6: an explicit device ignored LOCAL_RANK, so every rank took the same GPU.
    under_torchrun(monkeypatch, 2)
    ctx = init_distributed(device, 600)
    assert ctx.device == torch.device("cuda", 2)
    assert gpus == [torch.device("cuda", 2), "nccl"]
    assert (ctx.rank, ctx.world_size) == (6, 8)


@pytest.mark.parametrize("device_type", ["cuda", "cpu"])
def test_the_process_group_is_bound_to_the_device_with_the_timeout(gpus, monkeypatch, device_type):
    # Without device_id, NCCL's barriers guessed the device from the rank and sub-meshes made
    # communicators of their own; without a timeout a hung peer held the run for torch's default.
    under_torchrun(monkeypatch, 2)
    options = {}
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: options.update(kw, backend=backend))
    ctx = init_distributed(device_type, 90)
    assert options["timeout"] == datetime.timedelta(seconds=90)
    if device_type == "cuda":
        assert (options["backend"], options["device_id"]) == ("nccl", torch.device("cuda", 2))
    else:
        assert (options["backend"], options["device_id"], ctx.device.type) == ("gloo", None, "cpu")


@pytest.mark.parametrize(
    ("device", "local_rank", "message"),
    [
        ("cuda:0", 2, "device 'cuda:0' contradicts LOCAL_RANK 2: .* pass --device cuda or auto"),
        ("cuda", 5, r"device cuda:5 was asked for .* sees 4 CUDA device\(s\): cuda:0 to cuda:3"),
    ],
)
def test_a_device_the_rank_cannot_have_is_one_line_before_any_work(
    gpus, monkeypatch, device, local_rank, message
):
    under_torchrun(monkeypatch, local_rank)
    with pytest.raises(DeviceError, match=message):
        init_distributed(device, 600)
    assert gpus == []  # no device set, no process group started


def test_a_single_process_makes_its_device_current(gpus, monkeypatch):
    # Bug 3: without set_device, work that follows the current device (Triton launches) ran
    # on cuda:0 while the tensors lived on cuda:1.
    monkeypatch.delenv("RANK", raising=False)
    ctx = init_distributed("cuda:1", 600)
    assert ctx.device == torch.device("cuda", 1)
    assert gpus == [torch.device("cuda", 1)]
    assert init_distributed("cuda", 600).device == torch.device("cuda", 0)


class FakeCudaGenerators:
    """The CUDA generators of `visible` simulated GPUs, as torch.cuda's RNG functions see them:
    a device index past the visible ones raises, as on a real machine."""

    def __init__(self, visible, current=0):
        self.visible, self.current = visible, current
        self.states = {i: torch.full((8,), i, dtype=torch.uint8) for i in range(visible)}

    def _index(self, device):
        index = device if isinstance(device, int) else torch.device(device).index
        index = self.current if index is None else index
        if index >= self.visible:
            raise IndexError(f"CUDA device {index} is not one of the {self.visible} visible")
        return index

    def get(self, device="cuda"):
        return self.states[self._index(device)].clone()

    def set(self, state, device="cuda"):
        self.states[self._index(device)] = state.clone()

    def install(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.visible)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "get_rng_state", self.get)
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set)
        monkeypatch.setattr(
            torch.cuda, "get_rng_state_all", lambda: [self.get(i) for i in range(self.visible)]
        )
        monkeypatch.setattr(
            torch.cuda, "set_rng_state_all", lambda states: [self.set(s, i) for i, s in enumerate(states)]
        )


def test_the_cuda_rng_resumes_on_a_node_with_fewer_gpus(monkeypatch):
    # Bug 5: the states of all the GPUs rank 0 saw were restored by index, so a resume on a
    # node with fewer visible GPUs raised IndexError.
    saving = FakeCudaGenerators(visible=8)
    saving.states[0] = torch.arange(8, dtype=torch.uint8) * 3
    saving.install(monkeypatch)
    state = json.loads(json.dumps(rng_state()))
    resuming = FakeCudaGenerators(visible=1)
    resuming.install(monkeypatch)
    set_rng_state(state)
    assert torch.equal(resuming.states[0], saving.states[0])


def test_an_older_checkpoints_cuda_states_still_restore(monkeypatch):
    older = {**rng_state(), "cuda": [[7] * 8, [9] * 8]}  # every GPU rank 0 saw
    generators = FakeCudaGenerators(visible=1)
    generators.install(monkeypatch)
    set_rng_state(older)
    assert generators.states[0].tolist() == [7] * 8
