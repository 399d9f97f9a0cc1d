"""The optimizer diagnostics of training/diagnostics.py against a direct computation on a small
model: update and weight RMS and momentum norms from copies of the tensors, Newton-Schulz's
orthogonality error from its first matrix of each shape."""

import math

import pytest
import torch

from optimizers.newton_schulz import newton_schulz
from parallel.layout import Layout
from parallel.process_group import DistContext
from training.config import load_config
from training.diagnostics import Diagnostics
from training.run_setup import build_run


def setup(optimizer):
    shape = ["--model_dim", "64", "--n_layer", "2", "--n_head", "4", "--sequence_length", "16"]
    cfg = load_config([*shape, "--tokenizer", "bytes", "--optimizer", optimizer])
    run = build_run(cfg, Layout(), DistContext(0, 1, torch.device("cpu")), data="random")
    return run.model, run.optimizer


def gradients(model, seed):
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator)


def dion2_selection(x, fraction=0.5):
    """Dion2's slices of the matrix x (its rows, or columns when it is tall), and the sorted
    indices of the `fraction` of them with the largest l1 norms."""
    slices = x if x.shape[0] <= x.shape[1] else x.T
    k = math.ceil(fraction * len(slices))
    return slices, slices.abs().sum(-1).topk(k).indices.sort().values


def rms(tensors):
    return math.sqrt(sum(float(t.pow(2).sum()) for t in tensors) / sum(t.numel() for t in tensors))


@pytest.mark.parametrize("optimizer", ["muon", "dion2", "dion", "adamw"])
def test_diagnostics_equal_a_direct_computation(optimizer):
    model, opt = setup(optimizer)
    diagnostics = Diagnostics(model, opt, every=2)
    gradients(model, 0)
    first_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    opt.step()  # a step unmeasured first, so that momentum and weights have moved
    assert not diagnostics.due(1, last=False) and diagnostics.due(2, last=False) and diagnostics.due(3, True)
    gradients(model, 1)
    roles = model.param_roles()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    inputs = {name: opt.momentum_buffer(p).clone() for name, p in roles["matrix"]}
    diagnostics.before_step()
    opt.step()
    record = diagnostics.after_step()

    groups = {role: [n for n, _ in named] for role, named in roles.items()}
    for layer in range(2):
        groups[f"matrix/layer{layer}"] = [n for n in groups["matrix"] if n.startswith(f"blocks.{layer}.")]
    params = dict(model.named_parameters())
    for group, names in groups.items():
        changes = [params[n].detach() - before[n] for n in names]
        assert record[f"update_rms/{group}"] == pytest.approx(rms(changes), rel=1e-5)
        assert record[f"weight_rms/{group}"] == pytest.approx(
            rms([params[n].detach() for n in names]), rel=1e-5
        )
        momentum = math.sqrt(sum(float(opt.momentum_buffer(params[n]).pow(2).sum()) for n in names))
        assert record[f"momentum_norm/{group}"] == pytest.approx(momentum, rel=1e-5)
    assert record["update_rms/matrix"] > 0

    errors = {k: v for k, v in record.items() if k.startswith("ortho_error/")}
    if optimizer == "muon":
        # Muon orthonormalizes mu M + G, all matrices of a shape in one batch.
        first = {}
        for name, p in roles["matrix"]:
            first.setdefault(tuple(p.shape), name)
        assert set(errors) == {f"ortho_error/{m}x{n}" for m, n in first}
        for (m, n), name in first.items():
            x = (0.95 * inputs[name] + params[name].grad)[None]
            distance = torch.linalg.svdvals(newton_schulz(x, use_polar_express=True)[0]) - 1
            rms_distance = float(distance.square().mean().sqrt())
            assert errors[f"ortho_error/{m}x{n}"] == pytest.approx(rms_distance, abs=1e-5)
            largest = float(distance.abs().max())
            assert record[f"ortho_error_max/{m}x{n}"] == pytest.approx(largest, abs=1e-5)
    elif optimizer == "dion2":
        # Dion2 orthonormalizes M[K], the half (ortho_fraction 0.5) of the slices along the
        # shorter side with the largest l1 norms of M + G: rows of 64 x 64 and 64 x 256, columns
        # of 256 x 64, whose first bucket comes before 64 x 256's.
        first, coverage, waits = {}, [], []
        for name, _ in roles["matrix"]:
            x = inputs[name] + params[name].grad
            selected, chosen = dion2_selection(x)
            first.setdefault(tuple(selected[chosen].shape), selected[chosen])
            # The selection of the first step, whose momentum was G alone.
            _, before = dion2_selection(first_grads[name])
            last = torch.zeros(len(selected))
            last[before], last[chosen] = 1, 2
            coverage.append(float((last > 0).float().mean()))
            waits.append(int((2 - last).max()))  # the longest wait, still going on at step 2
        assert (
            set(errors)
            == {f"ortho_error/{m}x{n}" for m, n in first}
            == {"ortho_error/32x64", "ortho_error/32x256"}
        )
        for (m, n), x in first.items():
            distance = torch.linalg.svdvals(newton_schulz(x[None], use_polar_express=True)[0]) - 1
            assert errors[f"ortho_error/{m}x{n}"] == pytest.approx(
                float(distance.square().mean().sqrt()), abs=1e-5
            )
            assert record[f"ortho_error_max/{m}x{n}"] == pytest.approx(float(distance.abs().max()), abs=1e-5)
        assert record["selection_coverage_mean"] == pytest.approx(sum(coverage) / len(coverage))
        assert record["selection_coverage_min"] == pytest.approx(min(coverage))
        # A slice chosen at step 2 that never was before had waited 1 step; none waited longer.
        assert record["selection_longest_wait"] == max(1, *waits)
    else:  # Dion's factors come from a QR, AdamW has no Newton-Schulz
        assert errors == {}
    assert opt.orthogonality_errors() == {}  # capturing stopped with the measured step
