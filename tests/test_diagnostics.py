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


def rms(tensors):
    return math.sqrt(sum(float(t.pow(2).sum()) for t in tensors) / sum(t.numel() for t in tensors))


@pytest.mark.parametrize("optimizer", ["muon", "dion2", "dion", "adamw"])
def test_diagnostics_equal_a_direct_computation(optimizer):
    model, opt = setup(optimizer)
    diagnostics = Diagnostics(model, opt, every=2)
    gradients(model, 0)
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
        # Dion2 orthonormalizes half (ortho_fraction 0.5) of the slices along the shorter side.
        assert set(errors) == {"ortho_error/32x64", "ortho_error/32x256"}
        assert {"selection_coverage_mean", "selection_longest_wait"} <= set(record)
    else:  # Dion's factors come from a QR, AdamW has no Newton-Schulz
        assert errors == {}
    assert opt.orthogonality_errors() == {}  # capturing stopped with the measured step
