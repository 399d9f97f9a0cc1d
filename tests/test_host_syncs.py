"""Where a step would make the host wait for the device, shown on the CPU: reads of a tensor's
value (`_local_scalar_dense`: item, int, bool), tensors made from host values (`lift_fresh`:
torch.tensor), and what crosses from the host to the device."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from data.loader import TokenLoader, find_shards
from optimizers import Dion2, Muon, NorDion2, NorMuon
from tests.conftest import SHAKESPEARE
from training.step import agree

HOST_OPS = ("aten::_local_scalar_dense", "aten::lift_fresh")


class HostTraffic(TorchDispatchMode):
    """Counts the HOST_OPS run inside it, and records each copy to another device as the
    (dtype) it moved."""

    def __init__(self):
        super().__init__()
        self.count, self.crossings = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.name() in HOST_OPS:
            self.count += 1
        if func.name() == "aten::_to_copy" and out.device != args[0].device:
            self.crossings.append(args[0].dtype)
        return out


def test_the_stop_flag_is_made_on_the_device():
    # It was torch.tensor(float(stop), device=...): a copy from the host, a second wait per step.
    loss, norm = torch.tensor(2.5), torch.tensor(1.0)
    with HostTraffic() as traffic:
        outcome = agree(loss, norm, True, 1)
    assert traffic.count == 0
    assert (outcome.train_loss, outcome.grad_norm, outcome.stop_requested) == (2.5, 1.0, True)


def test_the_loader_moves_int32_once_and_widens_on_the_device():
    # It moved inputs and targets as two int64 copies (from pageable memory on CUDA).
    loader = TokenLoader(find_shards(SHAKESPEARE, "train"), 2, 8, device="meta")
    with HostTraffic() as traffic:
        x, y = loader.next_batch()
    assert traffic.crossings == [torch.int32]
    assert (x.dtype, y.dtype, x.device.type, tuple(x.shape)) == (torch.int64, torch.int64, "meta", (2, 8))
    cpu = TokenLoader(find_shards(SHAKESPEARE, "train"), 2, 8)
    x, y = cpu.next_batch()
    assert torch.equal(x[:, 1:], y[:, :-1]) and x.dtype == torch.int64


def steps(opt, params, generator, capture):
    """One step on fresh gradients, counting its host reads, with or without diagnostics."""
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)
    if capture:
        opt.capture_orthogonality()
    with HostTraffic() as traffic:
        opt.step()
    errors = opt.orthogonality_errors()
    return traffic.count, errors


@pytest.mark.parametrize("cls", [Muon, NorMuon, Dion2, NorDion2])
def test_measuring_orthogonality_adds_no_host_read_to_the_step(cls):
    # The step read bool(x[0].any()) and two .item() per shape (an SVD too) in the middle of
    # the overlapped buckets; they are kept and measured once step() has returned.
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=generator) for s in [(16, 24)] * 3 + [(24, 16)]]
    opt = cls(params, lr=0.02)
    plain, none = steps(opt, params, generator, capture=False)
    captured, errors = steps(opt, params, generator, capture=True)
    assert captured == plain and none == {}
    # Dion2 orthonormalizes 4 of the 16 shorter-side slices of each shape, NorDion2 a quarter
    # of the rows.
    shapes = {Muon: {(16, 24), (24, 16)}, NorMuon: {(16, 24), (24, 16)}, Dion2: {(4, 24)}}
    assert set(errors) == shapes.get(cls, {(4, 24), (6, 16)})
    assert all(0 <= rms <= largest < 1 for rms, largest in errors.values())


def test_selection_metrics_read_the_device_once():
    # Two reads per matrix before (.item() and int()); now one copy of all of them. What is
    # left is each matrix's step counter, which lives on the host.
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(16, 24, generator=generator) for _ in range(3)]
    opt = Dion2(params, lr=0.02, fraction=0.25)
    steps(opt, params, generator, capture=False)
    with HostTraffic() as traffic:
        metrics = opt.selection_metrics()
    assert traffic.count == len(params)
    assert metrics["selection_coverage_min"] == 0.25 and metrics["selection_longest_wait"] == 1
