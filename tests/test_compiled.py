"""torch.compile of the optimizers' per-shape math: one region per signature, no recompiles
from a scheduled lr, no silent eager fallback past Dynamo's recompile limit, and the same
step as eager."""

import copy
import math

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import optimizers.compiled as compiled
from optimizers import Dion, Dion2, Muon, NorDion2, NorMuon
from optimizers.newton_schulz import newton_schulz
from parallel.layout import Layout
from parallel.process_group import DistContext
from tests.conftest import TINY, run_train
from training.config import load_config_for
from training.run_setup import build_run

# Fourteen distinct matrix shapes: more than torch._dynamo.config.recompile_limit (8).
MANY_SHAPES = [(8 + 4 * i, 24) for i in range(7)] + [(24, 10 + 4 * i) for i in range(7)]


@pytest.fixture(
    params=[
        pytest.param(True, id="isolate_recompiles"),
        # The older releases' path: the full suite runs it, the fast lane the current one.
        pytest.param(False, id="code_copy", marks=pytest.mark.slow),
    ]
)
def counter(request, monkeypatch):
    """A backend that counts the graphs Dynamo compiles (and runs them eagerly), with each
    way of isolating the regions this torch offers: `isolate_recompiles` (torch 2.13 on),
    and the copy of the function's code that older releases (2.11) need."""
    if request.param and not compiled.ISOLATES_RECOMPILES:
        pytest.skip(f"torch {torch.__version__} has no torch.compile(isolate_recompiles=...)")
    monkeypatch.setattr(compiled, "ISOLATES_RECOMPILES", request.param)
    backend = CompileCounter()
    monkeypatch.setattr(compiled, "BACKEND", backend)
    return backend


def matrices(shapes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=generator)) for s in shapes]


def train_steps(optimizer, params, steps, seed=1):
    """`steps` optimizer steps on seeded gradients, with the lr changing every step."""
    generator = torch.Generator().manual_seed(seed)
    base = [g["lr"] for g in optimizer.param_groups]
    for step in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        for group, lr in zip(optimizer.param_groups, base, strict=True):
            group["lr"] = lr * (1 - step / steps)
        optimizer.step()


def selected_shapes(fraction, rows=False):
    """The distinct shapes Dion2 orthonormalizes: k slices of the longer side's length (with
    `rows`, as NorDion2: k rows of the row length)."""
    if rows:
        return {(math.ceil(fraction * m), n) for m, n in MANY_SHAPES}
    return {(math.ceil(fraction * min(s)), max(s)) for s in MANY_SHAPES}


@pytest.mark.parametrize(
    "cls, options, regions",
    [
        # momentum, Newton-Schulz and update per shape
        (Muon, {}, 3 * len(MANY_SHAPES)),
        (NorMuon, {"nesterov": True}, 3 * len(MANY_SHAPES)),
        # accumulation (and l1 norms), gather and update per shape; Newton-Schulz per shape of
        # the selection. The choice itself (top-k or a random draw) is not compiled.
        (Dion2, {"fraction": 0.25}, 3 * len(MANY_SHAPES) + len(selected_shapes(0.25))),
        (Dion2, {"selection": "random"}, 3 * len(MANY_SHAPES) + len(selected_shapes(0.25))),
        (NorDion2, {"fraction": 0.25}, 3 * len(MANY_SHAPES) + len(selected_shapes(0.25, rows=True))),
        # the update only: Cholesky's fallback to QR is a data-dependent branch
        (Dion, {}, len(MANY_SHAPES)),
    ],
)
def test_one_compile_per_signature_and_none_from_the_lr(counter, cls, options, regions):
    params = matrices(MANY_SHAPES)
    reference = copy.deepcopy(params)
    optimizer = cls(params, lr=0.02, compile=True, **options)
    train_steps(optimizer, params, 1)
    assert counter.frame_count == regions > torch._dynamo.config.recompile_limit
    train_steps(optimizer, params, 3)
    assert counter.frame_count == regions  # three new lr values, no compile
    eager = cls(reference, lr=0.02, **options)
    train_steps(eager, reference, 1)
    train_steps(eager, reference, 3)
    for p, r in zip(params, reference, strict=True):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)


def test_plain_compile_stops_compiling_at_the_recompile_limit():
    # What the regions avoid: one torch.compile over every shape gives up after 8 and
    # runs the rest eagerly, without an error.
    backend = CompileCounter()
    ns = torch.compile(newton_schulz, backend=backend, dynamic=False)
    for shape in MANY_SHAPES:
        ns(torch.randn(*shape))
    assert backend.frame_count == torch._dynamo.config.recompile_limit < len(MANY_SHAPES)


def test_past_the_accumulated_limit_new_shapes_run_eagerly(counter):
    def scaled(x, factor):
        return x * factor

    factor = torch.tensor(3.0)
    # torch's own patch, not monkeypatch: a config key is no plain attribute, and pytest 9.2's
    # monkeypatch deletes it on undo, which breaks every compile after this test.
    with (
        torch._dynamo.config.patch(accumulated_recompile_limit=2),
        pytest.warns(UserWarning, match="scaled has 2 compiled signatures"),
    ):
        results = [compiled.run_compiled(scaled, torch.ones(n), factor) for n in (1, 2, 3, 4)]
    assert counter.frame_count == 2
    assert [r.sum().item() for r in results] == [3.0, 6.0, 9.0, 12.0]


def small_gpt_updates(optimizer, compile, ns_dtype, steps=3):
    """What `steps` steps of the optimizer change in a small GPT's weights. The run's model is
    called directly, never its compiled forward: only the optimizer is compiled."""
    shape = ["--model_dim", "64", "--n_layer", "2", "--n_head", "4", "--sequence_length", "32"]
    argv = [
        *shape,
        *("--batch_size", "2", "--device_batch_size", "2", "--lr", "0.02", "--ortho_fraction", "0.25"),
    ]
    cfg = load_config_for([*argv, "--compile", str(compile).lower()], optimizer)
    run = build_run(cfg, Layout(), DistContext(0, 1, torch.device("cpu")), data="random")
    model, opt = run.model, run.optimizer
    with torch.no_grad():  # the zero-initialized outputs would leave most matrices still
        for p in model.parameters():
            if p.ndim == 2 and not p.any():
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(p.numel()))
    for group in opt.param_groups:
        group["ns_dtype"] = ns_dtype
    tokens = torch.randint(0, 50257, (2, 33), generator=torch.Generator().manual_seed(0))
    initial = copy.deepcopy(model.state_dict())
    for _ in range(steps):
        model(tokens[:, :-1], tokens[:, 1:]).backward()
        opt.step()
        opt.zero_grad()
    return {k: v - initial[k] for k, v in model.state_dict().items()}


def relative_error(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("optimizer", ["muon", "dion2"])
def test_compiled_step_matches_eager_in_bf16(optimizer):
    # The real backend (inductor), with Newton-Schulz in bf16, on a small GPT. bf16 NS is
    # itself 3-8% (relative Frobenius) off the fp32 one here; the compiled step must stay
    # within twice that of the eager bf16 step, and match elsewhere.
    fp32 = small_gpt_updates(optimizer, compile=False, ns_dtype=torch.float32)
    eager = small_gpt_updates(optimizer, compile=False, ns_dtype=torch.bfloat16)
    compiled_updates = small_gpt_updates(optimizer, compile=True, ns_dtype=torch.bfloat16)
    for name, reference in fp32.items():
        bf16_error = relative_error(eager[name], reference)
        assert relative_error(compiled_updates[name], eager[name]) <= 2 * bf16_error + 1e-6, name
    matrices_moved = [n for n, u in fp32.items() if n.startswith("blocks.") and u.ndim == 2 and u.any()]
    assert len(matrices_moved) == 12  # q, k, v, out, fc and proj of both layers


def test_train_with_compile_matches_eager(tmp_path):
    # compile: true compiles the model and the optimizer; the losses stay those of eager.
    options = {**TINY, "optimizer": "dion2", "lr": 0.02, "num_iterations": 3, "val_loss_every": 0}
    eager = run_train(tmp_path, "eager", **options)
    compiled_run = run_train(tmp_path, "compiled", **options, compile=True)
    for a, b in zip(eager, compiled_run, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
