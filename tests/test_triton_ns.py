"""The Triton Newton-Schulz kernels against plain PyTorch, in Triton's CPU interpreter."""

import pytest
import torch

pytest.importorskip("triton")  # the interpreter is switched on in conftest.py

from optimizers.triton_ns import sym_gram  # noqa: E402

pytestmark = pytest.mark.triton


@pytest.mark.parametrize("shape", [(1, 5, 7), (3, 17, 33), (2, 40, 21)])
def test_symmetric_gram_and_its_epilogue(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    A = x @ x.mT
    torch.testing.assert_close(sym_gram(x), A, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        sym_gram(A, A, alpha=0.5, beta=-2.0), 0.5 * A @ A - 2.0 * A, rtol=1e-5, atol=1e-3
    )


@pytest.mark.parametrize("shape", [(2, 20, 45), (3, 37, 19), (1, 16, 16)])
def test_newton_schulz_through_the_kernels_matches_pytorch(shape):
    from optimizers.newton_schulz import newton_schulz

    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(newton_schulz(x, use_triton=True), newton_schulz(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("restarts", [(), (0, 2)])
def test_the_gram_form_through_the_kernels_matches_pytorch(restarts):
    from optimizers.newton_schulz import newton_schulz

    x = torch.randn(2, 12, 50, generator=torch.Generator().manual_seed(3))
    kernels = newton_schulz(x, use_triton=True, use_gram=True, restarts=restarts)
    torch.testing.assert_close(
        kernels, newton_schulz(x, use_gram=True, restarts=restarts), rtol=1e-4, atol=1e-4
    )


def muon_step(use_triton, compile=False):
    from optimizers import Muon

    gen = torch.Generator().manual_seed(2)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(24, 40), (24, 40), (50, 18)]]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    Muon(params, lr=0.02, use_triton=use_triton, compile=compile).step()
    return [p.detach() for p in params]


def test_muon_with_kernels_matches_muon_without():
    for got, want in zip(muon_step(True), muon_step(False), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_with_compile_the_kernels_run_uncompiled_and_the_rest_compiled(monkeypatch):
    from torch._dynamo.testing import CompileCounter

    import optimizers.compiled as compiled

    counter = CompileCounter()
    monkeypatch.setattr(compiled, "BACKEND", counter)
    got = muon_step(True, compile=True)
    assert counter.frame_count == 4  # momentum and update of the two shapes; no Newton-Schulz
    for a, b in zip(got, muon_step(False), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_without_cuda_or_the_interpreter_it_warns_once_and_falls_back(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.warns(UserWarning, match="Triton cannot run on cpu") as caught:
        got = muon_step(True)
    assert len([w for w in caught if "Triton" in str(w.message)]) == 1
    for a, b in zip(got, muon_step(False), strict=True):
        assert torch.equal(a, b)


def test_use_triton_without_triton_is_a_clear_error(monkeypatch):
    import importlib.util

    from optimizers import Muon

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a)
    )
    with pytest.raises(ValueError, match="use_triton=True needs the triton package"):
        Muon([torch.nn.Parameter(torch.randn(4, 4))], use_triton=True)
