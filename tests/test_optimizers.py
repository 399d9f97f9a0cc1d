"""The optimizers against plain, per-matrix reference versions of their update rules.

Each reference below is the textbook rule in float64, one matrix at a time. The fast paths
(batched, fp32) must agree with them to the tolerance stated in each test.
"""

import copy
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from optimizers import AdamWLion, Dion, Dion2, Dion3, Muon, NorDion2, NorMuon
from optimizers.dion import orthonormalize_columns
from optimizers.dion2 import num_selected
from optimizers.newton_schulz import (
    POLAR_EXPRESS,
    POLAR_EXPRESS_SAFETY,
    QUINTIC,
    gram,
    newton_schulz,
    newton_schulz_flops,
    orthogonality_error,
    use_gram,
)

SHAPES = [(32, 32), (24, 40), (40, 24), (3, 16, 24)]  # square, wide, tall, a batch of matrices
# Where the singular values of a well-conditioned input end up after 5 steps.
BAND = {True: (0.8, 1.2), False: (0.65, 1.2)}  # Polar Express, classic quintic


def ref_newton_schulz(x, polar_express=True):
    coeffs, safety, eps = (
        (POLAR_EXPRESS, POLAR_EXPRESS_SAFETY, 1e-6) if polar_express else (QUINTIC, 1.0, 1e-7)
    )
    tall = x.shape[0] > x.shape[1]
    X = (x.T if tall else x).double()
    X = X / (X.norm() * safety + eps)
    for a, b, c in coeffs:
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


def ref_scale(shape, adjust_lr="spectral_norm"):
    m, n = shape[-2:]
    return {"spectral_norm": math.sqrt(m / n), "rms_norm": 0.2 * math.sqrt(max(m, n)), None: 1.0}[adjust_lr]


def ref_muon(w, g, m, lr, mu, wd, nesterov=False, adjust_lr="spectral_norm", cautious=False):
    m = mu * m + g
    u = g + mu * m if nesterov else m
    o = ref_newton_schulz(u)
    decay = lr * wd * w * ((o * w >= 0) if cautious else 1)
    return w - decay - lr * ref_scale(w.shape, adjust_lr) * o, m


def ref_dion2(w, g, m, lr, fraction, mu, wd, rows=None, decay="selective", cautious=False, rms=False):
    """Algorithm 1, on the shorter side. `rows` forces the selection (for random). With
    `cautious`, the selected rows decay only where O W >= 0; with `rms`, the update has Muon's
    RMS: O times sqrt(min(m, n) / min(k, n)), the ratio of the two's unit singular values."""
    scale = ref_scale(w.shape)
    options = (rows, decay, scale, cautious, rms)
    if w.shape[0] > w.shape[1]:  # select columns: run the row rule on the transposes
        w_t, m_t = ref_dion2_rows(w.T, g.T, m.T, lr, fraction, mu, wd, *options)
        return w_t.T, m_t.T
    return ref_dion2_rows(w, g, m, lr, fraction, mu, wd, *options)


def ref_dion2_rows(w, g, m, lr, fraction, mu, wd, rows, decay, scale, cautious=False, rms=False):
    m = m + g
    k = math.ceil(fraction * w.shape[0])
    if rows is None:
        rows = m.abs().sum(dim=1).topk(k).indices.sort().values
    o = ref_newton_schulz(m[rows])
    if rms:
        o = o * math.sqrt(min(w.shape) / min(k, w.shape[1]))
    m = m * mu if decay == "full" else m.index_copy(0, rows, m[rows] * mu)
    decayed = w * (1 - lr * wd)
    if cautious:
        decayed[rows] = w[rows] - lr * wd * w[rows] * (o * w[rows] >= 0)
    w = decayed.index_add(0, rows, -lr * scale * o)
    return w, m


def ref_normuon(w, g, m, v, lr, mu, wd, beta2, eps):
    m = mu * m + g
    o = ref_newton_schulz(m)
    v = beta2 * v + (1 - beta2) * (o**2).mean(dim=1)
    o2 = o / (v.sqrt()[:, None] + eps)
    o2 = o2 * o.norm() / (o2.norm() + eps)
    return w * (1 - lr * wd) - lr * ref_scale(w.shape) * o2, m, v


def ref_nordion2(w, g, m, v, lr, fraction, mu, wd, beta2, eps, rows=None, decay="selective"):
    """NorDion2: Dion2 on the rows whatever the shape, then NorMuon's normalization of the
    selected rows with their own second moments. `rows` forces the selection."""
    m = m + g
    if rows is None:
        rows = m.abs().sum(dim=1).topk(math.ceil(fraction * w.shape[0])).indices.sort().values
    o = ref_newton_schulz(m[rows])
    v = v.index_copy(0, rows, beta2 * v[rows] + (1 - beta2) * (o**2).mean(dim=1))
    o2 = o / (v[rows].sqrt()[:, None] + eps)
    o2 = o2 * o.norm() / (o2.norm() + eps)
    m = m * mu if decay == "full" else m.index_copy(0, rows, m[rows] * mu)
    w = (w * (1 - lr * wd)).index_add(0, rows, -lr * ref_scale(w.shape) * o2)
    return w, m, v


def ref_dion(w, g, m, q, lr, mu, wd, cautious=False):
    m = m + g
    p, _ = torch.linalg.qr(m @ q)
    r = m.T @ p
    m = m - (1 - mu) * p @ r.T
    q = r / r.norm(dim=0, keepdim=True)
    update = p @ q.T
    decay = lr * wd * w * ((update * w >= 0) if cautious else 1)
    return w - decay - lr * math.sqrt(w.shape[0] / w.shape[1]) * update, m, q


def ref_lion(w, g, m, lr, beta1, beta2, wd):
    c = beta1 * m + (1 - beta1) * g
    return w * (1 - lr * wd) - lr * c.sign(), beta2 * m + (1 - beta2) * g


def matrices(t):
    return t.reshape(-1, *t.shape[-2:])


def run_steps(optimizer_cls, shape, steps=3, seed=0, **kwargs):
    """Run `steps` updates on one parameter; return the weights before, the grads and after."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(shape, generator=gen)
    start = p.clone()
    opt = optimizer_cls([p], **kwargs)
    grads = []
    for _ in range(steps):
        grads.append(torch.randn(shape, generator=gen))
        p.grad = grads[-1].clone()
        opt.step()
    return start, grads, p, opt


def test_newton_schulz_matches_the_reference_and_the_band():
    gen = torch.Generator().manual_seed(0)
    for polar_express in (True, False):
        for shape in [(3, 24, 40), (2, 40, 24), (1, 17, 17)]:
            x = torch.randn(shape, generator=gen)
            fast = newton_schulz(x, polar_express)
            for i in range(shape[0]):
                ref = ref_newton_schulz(x[i], polar_express)
                torch.testing.assert_close(fast[i].double(), ref, atol=2e-5, rtol=0)
        # On a well-conditioned wide matrix the singular values land in the iteration's band.
        s = torch.linalg.svdvals(newton_schulz(torch.randn(64, 256, generator=gen), polar_express))
        low, high = BAND[polar_express]
        assert low < s.min() and s.max() < high


@pytest.mark.parametrize("polar_express", [True, False])
@pytest.mark.parametrize("restarts", [(), (0, 2), (1, 3)])
def test_gram_newton_schulz_matches_the_reference(polar_express, restarts):
    gen = torch.Generator().manual_seed(0)
    for shape in [(3, 16, 64), (2, 64, 16), (1, 24, 40)]:
        x = torch.randn(shape, generator=gen)
        fast = newton_schulz(x, polar_express, use_gram=True, restarts=restarts)
        for i in range(shape[0]):
            torch.testing.assert_close(
                fast[i].double(), ref_newton_schulz(x[i], polar_express), atol=5e-5, rtol=0
            )


def ill_conditioned(m, n, condition, generator):
    """An m x n matrix (m <= n) with singular values spaced in log from 1 to 1 / condition."""
    u = torch.linalg.qr(torch.randn(m, m, generator=generator, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, m, generator=generator, dtype=torch.float64)).Q
    return ((u * torch.logspace(0, -math.log10(condition), m, dtype=torch.float64)) @ v.T).float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(192, 768), (192, 3072)])  # the 160M model's Dion2 slices at 0.25
def test_gram_newton_schulz_is_as_orthonormal_as_the_plain_form(dtype, shape):
    """The Gram form's RMS and largest |sigma - 1| within 10% of the plain form's, on a
    Gaussian and an ill-conditioned input (condition number 1e4)."""
    gen = torch.Generator().manual_seed(0)
    for x in (torch.randn(shape, generator=gen), ill_conditioned(*shape, 1e4, gen)):
        plain, gram_form = newton_schulz(x, dtype=dtype), newton_schulz(x, dtype=dtype, use_gram=True)
        assert (orthogonality_error(gram_form) <= 1.1 * orthogonality_error(plain)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("polar_express", [True, False])
def test_newton_schulz_flops_count_every_product(dtype, polar_express):
    # Below 128 rows `gram` is one full bmm, so the counter sees every product at full cost.
    for shape, use_gram_form in [((2, 24, 96), True), ((2, 96, 24), True), ((2, 32, 48), False)]:
        with FlopCounterMode(display=False) as counter:
            newton_schulz(torch.randn(shape), polar_express, dtype, use_gram=use_gram_form)
        expected = shape[0] * newton_schulz_flops(*shape[1:], polar_express, use_gram_form, dtype)
        assert counter.get_total_flops() == expected


def test_auto_picks_the_gram_form_where_it_costs_less():
    assert not use_gram("auto", 768, 768, torch.float32)  # square: plain
    assert use_gram("auto", 768, 3072, torch.float32) and use_gram("auto", 3072, 768, torch.float32)
    assert not use_gram("auto", 192, 3072, torch.bfloat16)  # bf16: never, unless forced
    assert use_gram(True, 192, 3072, torch.bfloat16)
    assert use_gram(True, 768, 768, torch.float32) and not use_gram(False, 192, 3072, torch.float32)
    for m, n in [(64, 64), (64, 128), (64, 192), (64, 256), (64, 1024)]:
        cheaper = newton_schulz_flops(m, n, use_gram=True) < newton_schulz_flops(m, n)
        assert not use_gram("auto", m, n, torch.float32) or cheaper


@pytest.mark.parametrize("cls", [Muon, NorMuon, Dion2, NorDion2])
def test_every_newton_schulz_optimizer_takes_the_gram_form(cls):
    """The Gram form's steps equal the plain form's (each checked against its reference
    above), on a wide and a tall matrix and a batch of them; NorMuon's and NorDion2's
    division by the rows' second moments magnifies fp32 rounding a little."""
    shapes = [(16, 64), (64, 16), (2, 16, 64)]
    runs = []
    for gram_setting in (False, True):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
        opt = cls(params, lr=0.05, use_gram_newton_schulz=gram_setting)
        for _ in range(2):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        runs.append(params)
    for plain, gram_form in zip(*runs, strict=True):
        torch.testing.assert_close(gram_form, plain, atol=3e-5, rtol=0)


@pytest.mark.parametrize(
    ("shape", "block_rows"), [((2, 200, 130), 64), ((3, 256, 300), None), ((1, 7, 9), 3)]
)
def test_symmetric_gram_equals_the_full_product(shape, block_rows):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(gram(x, block_rows), torch.bmm(x, x.mT), atol=1e-4, rtol=1e-5)


def test_newton_schulz_through_the_blocked_path():
    x = torch.randn(1, 150, 300, generator=torch.Generator().manual_seed(0))  # m >= 128: blocked on CPU
    torch.testing.assert_close(newton_schulz(x)[0].double(), ref_newton_schulz(x[0]), atol=2e-5, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    "options",
    [{}, {"nesterov": True}, {"adjust_lr": "rms_norm"}, {"adjust_lr": None}, {"cautious_wd": True}],
)
def test_muon_matches_reference(shape, options):
    kwargs = {"lr": 0.05, "mu": 0.9, "weight_decay": 0.1, **options}
    start, grads, p, _ = run_steps(Muon, shape, **kwargs)
    for i in range(len(matrices(start))):
        w, m = matrices(start)[i].double(), torch.zeros(shape[-2:], dtype=torch.float64)
        for g in grads:
            w, m = ref_muon(
                w,
                matrices(g)[i].double(),
                m,
                kwargs["lr"],
                kwargs["mu"],
                kwargs["weight_decay"],
                options.get("nesterov", False),
                options.get("adjust_lr", "spectral_norm"),
                options.get("cautious_wd", False),
            )
        torch.testing.assert_close(matrices(p)[i].double(), w, atol=1e-5, rtol=0)


def test_muon_flatten_treats_a_3d_tensor_as_one_matrix():
    start, grads, p, _ = run_steps(Muon, (4, 3, 5), flatten=True, lr=0.05)
    w, m = start.reshape(4, 15).double(), torch.zeros(4, 15, dtype=torch.float64)
    for g in grads:
        w, m = ref_muon(w, g.reshape(4, 15).double(), m, 0.05, 0.95, 0.01)
    torch.testing.assert_close(p.reshape(4, 15).double(), w, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.25, 0.1])
@pytest.mark.parametrize("decay", ["selective", "full"])
def test_dion2_l1_matches_reference(shape, fraction, decay):
    kwargs = {"lr": 0.05, "fraction": fraction, "ef_decay": 0.9, "weight_decay": 0.1, "decay": decay}
    start, grads, p, opt = run_steps(Dion2, shape, steps=4, **kwargs)
    momentum = opt.state[p]["momentum"]
    for i in range(len(matrices(start))):
        w, m = matrices(start)[i].double(), torch.zeros(shape[-2:], dtype=torch.float64)
        for g in grads:
            w, m = ref_dion2(w, matrices(g)[i].double(), m, 0.05, fraction, 0.9, 0.1, decay=decay)
        torch.testing.assert_close(matrices(p)[i].double(), w, atol=1e-5, rtol=0)
        torch.testing.assert_close(matrices(momentum)[i].double(), m, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (3, 16, 24)])
@pytest.mark.parametrize("options", [{"cautious_wd": True}, {"match_muon_rms": True}])
def test_dion2_options_match_reference(shape, options):
    kwargs = {"lr": 0.05, "fraction": 0.25, "ef_decay": 0.9, "weight_decay": 0.1, **options}
    start, grads, p, _ = run_steps(Dion2, shape, steps=3, **kwargs)
    for i in range(len(matrices(start))):
        w, m = matrices(start)[i].double(), torch.zeros(shape[-2:], dtype=torch.float64)
        for g in grads:
            w, m = ref_dion2(
                w,
                matrices(g)[i].double(),
                m,
                0.05,
                0.25,
                0.9,
                0.1,
                cautious=options.get("cautious_wd", False),
                rms=options.get("match_muon_rms", False),
            )
        torch.testing.assert_close(matrices(p)[i].double(), w, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cls", [Dion2, NorDion2])
def test_matching_muons_rms_scales_the_update_by_about_one_over_root_fraction(cls):
    """The scaled update's RMS is Muon's, about 1 / sqrt(fraction) times the paper's."""
    rms = {}
    for name, cls_, options in [
        ("plain", cls, {}),
        ("matched", cls, {"match_muon_rms": True}),
        ("muon", Muon, {}),
    ]:
        start, _, p, _ = run_steps(cls_, (64, 256), steps=1, lr=0.05, weight_decay=0, **options)
        rms[name] = (p - start).square().mean().sqrt()
    assert rms["matched"] / rms["plain"] == pytest.approx(2.0, rel=1e-4)  # fraction 0.25
    assert rms["matched"] == pytest.approx(rms["muon"], rel=0.05)


@pytest.mark.parametrize("cls", [Muon, NorMuon, Dion2, NorDion2, Dion])
def test_scheduled_weight_decay_follows_the_schedule(cls):
    """With scheduled_wd, steps at half the base lr decay as a plain run with half the weight
    decay; the same steps without it do not."""
    runs = {}
    for name, options in [
        ("scheduled", {"scheduled_wd": True}),
        ("half", {"weight_decay": 0.1}),
        ("plain", {}),
    ]:
        gen = torch.Generator().manual_seed(0)
        p = torch.nn.Parameter(torch.randn(8, 16, generator=gen))
        opt = cls([p], **{"lr": 0.1, "weight_decay": 0.2, **options})
        for _ in range(2):
            opt.param_groups[0]["lr"] = 0.05  # the schedule at half its peak
            p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        runs[name] = p.detach()
    torch.testing.assert_close(runs["scheduled"], runs["half"], atol=1e-6, rtol=0)
    assert (runs["scheduled"] - runs["plain"]).abs().max() > 1e-4


@pytest.mark.parametrize("shape", SHAPES)
def test_dion2_fraction_one_is_muon_without_nesterov(shape):
    _, _, dion2, _ = run_steps(Dion2, shape, steps=5, fraction=1.0, ef_decay=0.95, lr=0.05)
    _, _, muon, _ = run_steps(Muon, shape, steps=5, mu=0.95, nesterov=False, lr=0.05)
    torch.testing.assert_close(dion2, muon, atol=1e-6, rtol=0)


def changed_slices(before, after, rows_are_slices):
    diff = (after - before).abs()
    return (diff.sum(dim=1) if rows_are_slices else diff.sum(dim=0)).nonzero().flatten()


@pytest.mark.parametrize(("shape", "fraction"), [((24, 40), 0.25), ((40, 24), 0.3), ((16, 16), 0.5)])
@pytest.mark.parametrize("selection", ["l1", "random"])
def test_dion2_step_properties(shape, fraction, selection):
    """One step from a non-zero momentum: exactly k slices change, chosen as the rule says,
    unselected momentum is old + grad, selected momentum is mu (old + grad), and the applied
    update divided by the lr scale has singular values in the Newton-Schulz band."""
    gen = torch.Generator().manual_seed(1)
    lr, mu = 0.05, 0.9
    p = torch.randn(shape, generator=gen)
    opt = Dion2([p], lr=lr, fraction=fraction, ef_decay=mu, weight_decay=0.0, selection=selection, seed=3)
    old_m = torch.randn(shape, generator=gen)
    opt.state[p]["momentum"].copy_(old_m)
    grad = torch.randn(shape, generator=gen)
    p.grad = grad
    before = p.clone()
    opt.step()
    rows_are_slices = shape[0] <= shape[1]
    k = num_selected(fraction, min(shape))
    chosen = changed_slices(before, p, rows_are_slices)
    assert len(chosen) == k
    accumulated = old_m + grad
    if selection == "l1":
        l1 = accumulated.abs().sum(dim=1 if rows_are_slices else 0)
        assert set(chosen.tolist()) == set(l1.topk(k).indices.tolist())
    view = (lambda t: t) if rows_are_slices else (lambda t: t.T)
    new_m = view(opt.state[p]["momentum"])
    unchosen = torch.ones(min(shape), dtype=torch.bool)
    unchosen[chosen] = False
    assert torch.equal(new_m[unchosen], view(accumulated)[unchosen])
    torch.testing.assert_close(new_m[chosen], mu * view(accumulated)[chosen])
    update = view(before - p)[chosen] / (lr * ref_scale(shape))
    s = torch.linalg.svdvals(update)
    assert BAND[True][0] < s.min() and s.max() < BAND[True][1]


def test_dion2_random_selection_is_seeded_and_moves():
    def rows(seed, steps=4):
        gen = torch.Generator().manual_seed(0)
        p = torch.randn(16, 32, generator=gen)
        opt = Dion2([p], fraction=0.25, selection="random", seed=seed, weight_decay=0.0)
        picks = []
        for _ in range(steps):
            before = p.clone()
            p.grad = torch.randn(16, 32, generator=gen)
            opt.step()
            picks.append(changed_slices(before, p, True).tolist())
        return picks

    assert rows(7) == rows(7)
    assert rows(7) != rows(8)
    assert len({tuple(r) for r in rows(7)}) > 1  # a new draw every step


def test_dion2_random_selection_in_a_bucket_of_batches_and_single_matrices():
    # One bucket (matrices of 12 x 20): a single matrix first, then a batch of three.
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(12, 20, generator=gen), torch.randn(3, 12, 20, generator=gen)]
    opt = Dion2(params, fraction=0.25, selection="random", weight_decay=0.0)
    before = [p.clone() for p in params]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    for old, new in zip(before, params, strict=True):
        for old_matrix, new_matrix in zip(old.reshape(-1, 12, 20), new.reshape(-1, 12, 20), strict=True):
            assert len(changed_slices(old_matrix, new_matrix, True)) == 3


def test_dion2_random_matches_reference_on_its_rows():
    gen = torch.Generator().manual_seed(2)
    p = torch.randn(12, 20, generator=gen)
    opt = Dion2([p], lr=0.05, fraction=0.25, ef_decay=0.9, weight_decay=0.1, selection="random")
    w, m = p.double().clone(), torch.zeros(12, 20, dtype=torch.float64)
    for _ in range(3):
        before = p.clone()
        g = torch.randn(12, 20, generator=gen)
        p.grad = g.clone()
        opt.step()
        rows = changed_slices(before * (1 - 0.05 * 0.1), p, True)
        w, m = ref_dion2(w, g.double(), m, 0.05, 0.25, 0.9, 0.1, rows=rows)
        torch.testing.assert_close(p.double(), w, atol=1e-5, rtol=0)


def test_dion2_selection_stats():
    p = torch.randn(8, 24)
    opt = Dion2([p], fraction=0.25, selection="random", seed=0)
    seen, waits = torch.zeros(8, dtype=torch.bool), torch.zeros(8, dtype=torch.long)
    longest = 0
    for _ in range(6):
        before = p.clone()
        p.grad = torch.randn(8, 24)
        opt.step()
        chosen = changed_slices(before * (1 - 0.01 * 0.01), p, True)
        waits += 1
        waits[chosen] = 0
        seen[chosen] = True
        longest = max(longest, waits.max().item())
    (stats,) = opt.selection_stats()
    assert stats == {"coverage": seen.float().mean().item(), "longest_wait": longest}


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_normuon_matches_reference_and_keeps_the_frobenius_norm(shape):
    kwargs = {"lr": 0.05, "mu": 0.9, "weight_decay": 0.1, "muon_beta2": 0.8}
    start, grads, p, opt = run_steps(NorMuon, shape, **kwargs)
    w, m, v = (
        start.double(),
        torch.zeros(shape, dtype=torch.float64),
        torch.zeros(shape[0], dtype=torch.float64),
    )
    for g in grads:
        w, m, v = ref_normuon(w, g.double(), m, v, 0.05, 0.9, 0.1, 0.8, 1e-8)
    torch.testing.assert_close(p.double(), w, atol=1e-5, rtol=0)
    torch.testing.assert_close(opt.state[p]["row_second_moment"][0].double(), v, atol=1e-7, rtol=1e-5)
    # The applied update has the Frobenius norm of the orthonormalized matrix.
    before = p.clone()
    p.grad = torch.randn(shape)
    momentum = opt.state[p]["momentum"] * 0.9 + p.grad
    opt.step()
    update = (before * (1 - 0.05 * 0.1) - p) / (0.05 * ref_scale(shape))
    assert update.norm().item() == pytest.approx(newton_schulz(momentum).norm().item(), rel=1e-4)


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (16, 16), (3, 20, 12)])
@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.25])
@pytest.mark.parametrize("decay", ["selective", "full"])
def test_nordion2_matches_reference(shape, fraction, decay):
    kwargs = {"lr": 0.05, "fraction": fraction, "mu": 0.9, "weight_decay": 0.1, "muon_beta2": 0.8}
    start, grads, p, opt = run_steps(NorDion2, shape, steps=4, decay=decay, **kwargs)
    state = opt.state[p]
    for i in range(len(matrices(start))):
        w, m = matrices(start)[i].double(), torch.zeros(shape[-2:], dtype=torch.float64)
        v = torch.zeros(shape[-2], dtype=torch.float64)
        for g in grads:
            w, m, v = ref_nordion2(
                w, matrices(g)[i].double(), m, v, 0.05, fraction, 0.9, 0.1, 0.8, 1e-8, decay=decay
            )
        torch.testing.assert_close(matrices(p)[i].double(), w, atol=1e-5, rtol=0)
        torch.testing.assert_close(matrices(state["momentum"])[i].double(), m, atol=1e-5, rtol=0)
        torch.testing.assert_close(state["row_second_moment"][i].double(), v, atol=1e-7, rtol=1e-4)


def test_nordion2_random_selection_matches_reference_on_its_rows():
    start, grads, p, opt = run_steps(NorDion2, (12, 30), steps=3, fraction=0.25, selection="random", mu=0.9)
    w, m, v = start.double(), torch.zeros(12, 30, dtype=torch.float64), torch.zeros(12, dtype=torch.float64)
    for step, g in enumerate(grads, start=1):
        rows = torch.randperm(12, generator=opt._generator(opt.param_groups[0], p, step))[:3].sort().values
        w, m, v = ref_nordion2(w, g.double(), m, v, 0.01, 0.25, 0.9, 0.01, 0.95, 1e-8, rows=rows)
    torch.testing.assert_close(p.double(), w, atol=1e-5, rtol=0)


def test_dion3_is_nordion2():
    assert Dion3 is NorDion2
    assert NorDion2([torch.zeros(4, 4)]).param_groups[0]["algorithm"] == "nordion2"


ROW_BLOCK_CLASSES = [
    (Muon, {"nesterov": True}),
    (NorMuon, {}),
    (Dion2, {"fraction": 0.3}),
    (NorDion2, {"fraction": 0.3}),
]


def blockwise_and_separate(cls, kwargs, shape, option, sizes, steps=3):
    """The weights after `steps` steps of one parameter cut by `option` (num_heads or
    split_sizes), and of its row blocks as separate parameters in one group, on the same
    gradients."""
    gen = torch.Generator().manual_seed(0)
    whole = torch.randn(shape, generator=gen)
    parts = [b.clone() for b in whole.split(sizes)]
    together = cls([{"params": [whole], **option}], lr=0.05, **kwargs)
    apart = cls(parts, lr=0.05, **kwargs)
    for _ in range(steps):
        grad = torch.randn(shape, generator=gen)
        whole.grad = grad.clone()
        for part, g in zip(parts, grad.split(sizes), strict=True):
            part.grad = g.clone()
        together.step()
        apart.step()
    return whole, torch.cat(parts)


@pytest.mark.parametrize(("cls", "kwargs"), ROW_BLOCK_CLASSES)
@pytest.mark.parametrize("shape", [(12, 20), (24, 4)])
def test_per_head_update_equals_the_heads_as_separate_matrices(cls, kwargs, shape):
    # (24, 4) cuts into 3 tall heads of (8, 4): Dion2 selects their columns.
    whole, separate = blockwise_and_separate(cls, kwargs, shape, {"num_heads": 3}, shape[0] // 3)
    torch.testing.assert_close(whole, separate, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("cls", "kwargs"), ROW_BLOCK_CLASSES)
def test_split_update_equals_the_blocks_as_separate_matrices(cls, kwargs):
    # Unequal blocks, a wide one and a tall one among them (a fused q, k, v under GQA).
    sizes = [16, 4, 4, 30]
    whole, separate = blockwise_and_separate(cls, kwargs, (54, 20), {"split_sizes": sizes}, sizes)
    torch.testing.assert_close(whole, separate, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("cls", "kwargs"), ROW_BLOCK_CLASSES)
def test_a_batch_of_matrices_is_updated_as_its_matrices_one_by_one(cls, kwargs):
    # A (3, 12, 20) parameter (three MoE experts), and its three matrices as parameters.
    gen = torch.Generator().manual_seed(0)
    batch = torch.randn(3, 12, 20, generator=gen)
    matrices = [m.clone() for m in batch]
    together, apart = cls([batch], lr=0.05, **kwargs), cls(matrices, lr=0.05, **kwargs)
    for _ in range(3):
        batch.grad = torch.randn(3, 12, 20, generator=gen)
        for m, g in zip(matrices, batch.grad, strict=True):
            m.grad = g.clone()
        together.step()
        apart.step()
    torch.testing.assert_close(batch, torch.stack(matrices), atol=1e-6, rtol=0)


def test_dion2_random_selection_draws_per_head():
    p = torch.randn(12, 20)
    opt = Dion2([{"params": [p], "num_heads": 3}], fraction=0.25, selection="random")
    p.grad = torch.randn(12, 20)
    opt.step()
    assert opt.selection_stats()[0]["coverage"] == 3 / 12  # one of each head's 4 rows


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"num_heads": 5}, "num_heads 5 does not divide the 12 rows of a \\(12, 20\\) matrix"),
        ({"num_heads": 0}, "num_heads must be a positive integer, got 0"),
        ({"split_sizes": [4, 4]}, "split_sizes \\[4, 4\\] must add up to the 12 rows"),
        ({"split_sizes": [12]}, "split_sizes must be a list of 2 or more positive integers"),
        ({"num_heads": 2, "split_sizes": [6, 6]}, "num_heads and split_sizes cannot both be set"),
        ({"num_heads": 2, "flatten": True}, "cannot be used with flatten"),
    ],
)
def test_bad_row_blocks(option, message):
    with pytest.raises(ValueError, match=message):
        Muon([{"params": [torch.zeros(12, 20)], **option}])
    with pytest.raises(ValueError, match="Dion has no per-head or split update"):
        Dion([{"params": [torch.zeros(12, 20)], "num_heads": 2}])


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (16, 16)])
@pytest.mark.parametrize(("rank_fraction", "cautious"), [(1.0, False), (0.25, False), (0.25, True)])
def test_dion_matches_reference(shape, rank_fraction, cautious):
    start, grads, p, opt = run_steps(
        Dion,
        shape,
        steps=3,
        lr=0.05,
        mu=0.9,
        weight_decay=0.1,
        rank_fraction=rank_fraction,
        cautious_wd=cautious,
    )
    assert opt.param_groups[0]["qr_method"] == "cholesky_qr"
    # The reference starts from the same Q, read from a fresh optimizer's state.
    fresh = Dion([torch.zeros(shape)], rank_fraction=rank_fraction)
    q = next(iter(fresh.state.values()))["q"][0].double()
    w, m = start.double(), torch.zeros(shape, dtype=torch.float64)
    for g in grads:
        w, m, q = ref_dion(w, g.double(), m, q, 0.05, 0.9, 0.1, cautious)
    torch.testing.assert_close(p.double(), w, atol=1e-5, rtol=0)
    torch.testing.assert_close(opt.state[p]["momentum"].double(), m, atol=1e-5, rtol=0)


@pytest.mark.parametrize("qr_method", ["cholesky_qr", "qr"])
def test_dion_error_feedback_and_rank(qr_method):
    gen = torch.Generator().manual_seed(4)
    p = torch.randn(24, 40, generator=gen)
    opt = Dion([p], lr=0.05, mu=0.9, weight_decay=0.0, rank_fraction=0.25, qr_method=qr_method)
    for _ in range(3):
        old_m = opt.state[p]["momentum"].clone()
        q = opt.state[p]["q"][0].clone()
        p.grad = torch.randn(24, 40, generator=gen)
        before = p.clone()
        opt.step()
        # Error feedback: M_new = (I - (1 - mu) P P^T)(M_old + G), with P = orth((M_old + G) Q).
        acc = (old_m + p.grad).double()
        basis, _ = torch.linalg.qr(acc @ q.double())
        expected = acc - 0.1 * basis @ basis.T @ acc
        torch.testing.assert_close(opt.state[p]["momentum"].double(), expected, atol=1e-5, rtol=0)
        s = torch.linalg.svdvals((before - p).double())
        assert s[5] / s[0] > 1e-2 and s[6] / s[0] < 1e-4  # rank r = ceil(0.25 * 24) = 6
        torch.testing.assert_close(opt.state[p]["q"].norm(dim=-2), torch.ones(1, 6))


def test_adamw_equals_torch():
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(5, 3, generator=gen), torch.randn(7, generator=gen)]
    theirs = [p.clone() for p in params]
    ours_opt = AdamWLion([{"params": params, "beta2": 0.99}], lr=0.01, weight_decay=0.1, epsilon=1e-6)
    theirs_opt = torch.optim.AdamW(theirs, lr=0.01, betas=(0.9, 0.99), weight_decay=0.1, eps=1e-6)
    for _ in range(5):
        for a, b in zip(params, theirs, strict=True):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        ours_opt.step()
        theirs_opt.step()
    for a, b in zip(params, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=0)


def test_lion_matches_reference_in_every_class():
    for cls in (AdamWLion, Muon, Dion2, NorMuon, Dion):
        gen = torch.Generator().manual_seed(0)
        p = torch.randn(6, 4, generator=gen)
        w, m = p.clone(), torch.zeros(6, 4)
        opt = cls([{"params": [p], "algorithm": "lion", "betas": (0.8, 0.9)}], lr=0.01, weight_decay=0.5)
        for _ in range(4):
            p.grad = torch.randn(6, 4, generator=gen)
            w, m = ref_lion(w, p.grad, m, 0.01, 0.8, 0.9, 0.5)
            opt.step()
        torch.testing.assert_close(p, w, atol=1e-6, rtol=0)


def test_group_overrides_are_honoured():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 8, generator=gen), torch.randn(8, 8, generator=gen)
    opt = Muon(
        [
            {"params": [a]},
            {
                "params": [b],
                "algorithm": "adamw",
                "lr": 0.5,
                "beta1": 0.5,
                "weight_decay": 0.0,
                "epsilon": 1e-3,
            },
        ],
        lr=0.01,
    )
    assert opt.param_groups[1]["betas"] == (0.5, 0.95)
    b_ref = b.clone()
    torch_opt = torch.optim.AdamW([b_ref], lr=0.5, betas=(0.5, 0.95), weight_decay=0.0, eps=1e-3)
    for p in (a, b):
        p.grad = torch.randn(8, 8, generator=gen)
    b_ref.grad = b.grad.clone()
    opt.step()
    torch_opt.step()
    torch.testing.assert_close(b, b_ref)


ALL = [
    (Muon, {}),
    (Muon, {"nesterov": True}),
    (NorMuon, {}),
    (Dion2, {"fraction": 0.5}),
    (Dion2, {"fraction": 0.25, "selection": "random"}),
    (NorDion2, {"fraction": 0.5}),
    (Dion, {"rank_fraction": 0.5}),
]


@pytest.mark.parametrize(("cls", "kwargs"), ALL)
def test_state_is_eager_and_round_trips(cls, kwargs):
    gen = torch.Generator().manual_seed(0)
    params = [
        torch.randn(8, 12, generator=gen),
        torch.randn(12, 8, generator=gen),
        torch.randn(5, generator=gen),
    ]
    groups = [{"params": params[:2]}, {"params": params[2:], "algorithm": "adamw"}]
    opt = cls(groups, lr=0.02, **kwargs)
    assert len(opt.state) == 3  # every parameter has its state before the first step
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    copies = [p.clone() for p in params]
    restored = cls([{"params": copies[:2]}, {"params": copies[2:], "algorithm": "adamw"}], lr=0.02, **kwargs)
    restored.load_state_dict(saved)
    # torch.optim's load casts state to the parameter's dtype: Dion2's int64 selection record
    # came back as fp32.
    for p, c in zip(params, copies, strict=True):
        assert {k: v.dtype for k, v in restored.state[c].items()} == {
            k: v.dtype for k, v in opt.state[p].items()
        }
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    for p, c, g in zip(params, copies, grads, strict=True):
        p.grad, c.grad = g.clone(), g.clone()
    opt.step()
    restored.step()
    for p, c in zip(params, copies, strict=True):
        assert torch.equal(p, c)


@pytest.mark.parametrize(("cls", "kwargs"), ALL)
def test_parameters_without_grad_are_untouched(cls, kwargs):
    a, b = torch.randn(8, 12), torch.randn(8, 12)
    opt = cls([a, b], lr=0.02, **kwargs)
    a.grad = torch.randn(8, 12)
    before = b.clone()
    opt.step()
    assert torch.equal(b, before)
    assert not torch.equal(a, before)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda p: Dion2([p], fraction=0.0), r"fraction must lie in \(0, 1\], got 0.0"),
        (lambda p: Dion2([p], fraction=1.5), r"fraction must lie in \(0, 1\], got 1.5"),
        (lambda p: Dion2([p], selection="top"), "selection must be one of l1, random, got 'top'"),
        (lambda p: Dion2([p], decay="half"), "decay must be one of selective, full, got 'half'"),
        (
            lambda p: Muon([p], use_gram_newton_schulz="yes"),
            "use_gram_newton_schulz must be one of true, false, auto, got 'yes'",
        ),
        (lambda p: Muon([p], adjust_lr="fan_in"), "adjust_lr must be one of spectral_norm, rms_norm, null"),
        (lambda p: NorDion2([p], mu=1.0), r"mu must lie in \[0, 1\), got 1.0"),
        (lambda p: NorDion2([p], muon_beta2=-0.1), r"muon_beta2 must lie in \[0, 1\)"),
        (
            lambda p: Muon([{"params": [p], "algorithm": "sgd"}]),
            "unknown algorithm 'sgd'; Muon takes muon, adamw",
        ),
        (lambda p: Dion([p], rank_fraction=2.0), r"rank_fraction must lie in \(0, 1\]"),
        (lambda p: Muon([p], mu=1.0), r"mu must lie in \[0, 1\)"),
        (lambda p: Muon([torch.zeros(3)]), "needs tensors of 2 or more dimensions"),
    ],
)
def test_bad_arguments(build, message):
    with pytest.raises(ValueError, match=message):
        build(torch.zeros(4, 4))


def test_nordion2_takes_microsoft_dions_names():
    p = torch.zeros(4, 4)
    group = NorDion2([p], None, 0.02, 0.5, mu=0.9, muon_beta2=0.8).param_groups[0]
    assert (group["lr"], group["fraction"], group["mu"], group["muon_beta2"]) == (0.02, 0.5, 0.9, 0.8)
    with pytest.raises(TypeError, match="takes microsoft/dion's mu"):
        NorDion2([p], ef_decay=0.9)
    with pytest.raises(TypeError):  # mu and what follows are keywords, never bound by position
        NorDion2([p], None, 0.02, 0.5, 0.9)


def test_step_takes_a_closure():
    # torch.optim's contract: step() runs the closure once, with gradients on (step itself runs
    # under no_grad), steps on the gradients it made, and returns its loss.
    p = torch.randn(4, 4, requires_grad=True)
    start = p.detach().clone()
    opt = Dion2([p], lr=0.1)
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        loss = (p**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure=closure)
    assert calls == [True]
    assert loss.item() == pytest.approx(float((start**2).sum()))
    assert not torch.equal(p.detach(), start)  # the step used the closure's gradient


def test_cholesky_qr_is_orthonormal_on_an_ill_conditioned_matrix():
    # Shifted CholeskyQR3 replaces the fallback to QR (whose test made the host wait): at a
    # condition number of 1e6, where plain Cholesky-QR's Gram matrix is not positive definite
    # in fp32, it still gives the Q of the QR.
    gen = torch.Generator().manual_seed(0)
    u, v = (
        torch.linalg.qr(torch.randn(64, 16, generator=gen)).Q,
        torch.linalg.qr(torch.randn(16, 16, generator=gen)).Q,
    )
    p = (u * torch.logspace(0, -6, 16)) @ v.T
    assert torch.linalg.cholesky_ex(p.T @ p).info > 0
    basis = orthonormalize_columns(p[None], "cholesky_qr")[0]
    torch.testing.assert_close(basis.T @ basis, torch.eye(16), atol=1e-5, rtol=0)
    q, r = torch.linalg.qr(p.double())
    torch.testing.assert_close(basis.double()[:, :4], (q * r.diagonal().sign())[:, :4], atol=1e-4, rtol=0)


@pytest.mark.parametrize("m", [2048, 8192])
def test_cholesky_qr_is_orthonormal_at_gpu_sizes(m):
    # Dion's P at the 1B model's sizes (r = 1024), condition number 1e5. With an fp32 Gram
    # matrix the shift exceeds its trace at 8192 x 1024 and Q^T Q was 1.0 off I at both sizes.
    gen = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(m, 1024, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(1024, 1024, generator=gen)).Q
    p = (u * torch.logspace(0, -5, 1024)) @ v.T
    basis = orthonormalize_columns(p[None], "cholesky_qr")[0]
    torch.testing.assert_close(basis.T @ basis, torch.eye(1024), atol=1e-5, rtol=0)


def test_cholesky_qr_of_a_rank_deficient_matrix_is_finite_and_spans_it():
    # A rank-2 matrix of 8 columns still gives a finite basis whose span holds every column.
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(1, 64, 2, generator=gen) @ torch.randn(1, 2, 8, generator=gen)
    basis = orthonormalize_columns(p, "cholesky_qr")
    assert basis.isfinite().all()
    u, s, _ = torch.linalg.svd(basis[0], full_matrices=False)
    span = u[:, s > 0.5]  # the basis's directions of about unit length
    torch.testing.assert_close(span @ (span.T @ p[0]), p[0], atol=1e-4, rtol=0)
    assert not orthonormalize_columns(torch.zeros(1, 8, 4), "cholesky_qr").any()


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "expected"),
    [(False, False, torch.float32), (True, False, torch.bfloat16), (False, True, torch.bfloat16)],
)
def test_newton_schulz_defaults_to_bf16_where_the_cpu_has_it(monkeypatch, avx512_bf16, amx, expected):
    from optimizers.matrix_optimizer import default_ns_dtype

    monkeypatch.undo()  # the tests' fp32 default off: the rule itself is under test
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert default_ns_dtype(torch.device("cpu")) == expected
    assert default_ns_dtype(torch.device("cuda")) == torch.bfloat16
    p = torch.zeros(4, 4)
    assert Muon([p]).param_groups[0]["ns_dtype"] is None  # None: the device's default, at each step
