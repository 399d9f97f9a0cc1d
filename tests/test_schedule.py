"""The warmup / constant / warmdown schedule."""

import pytest

from training.schedule import lr_multiplier


def schedule(n, warmup, warmdown):
    return [lr_multiplier(s, n, warmup, warmdown) for s in range(n)]


def test_constant_then_linear_decay():
    lrs = schedule(10, 0.0, 0.2)
    assert lrs[:8] == [1.0] * 8
    assert lrs[8:] == [pytest.approx(1.0), pytest.approx(0.5)]


def test_warmup():
    lrs = schedule(10, 0.3, 0.0)
    assert lrs[:3] == [pytest.approx(1 / 3), pytest.approx(2 / 3), 1.0]
    assert lrs[3:] == [1.0] * 7


def test_paper_schedule_reaches_zero_after_the_last_step():
    n = 1000
    lrs = schedule(n, 0.0, 0.25)
    assert lrs[749] == 1.0 and lrs[750] == 1.0
    assert lrs[-1] == pytest.approx(1 / 250)
    steps = [lrs[i] - lrs[i + 1] for i in range(750, n - 1)]
    assert all(d == pytest.approx(1 / 250) for d in steps)  # linear
    assert lr_multiplier(n, n, 0.0, 0.25) == 0.0


def test_no_schedule():
    assert schedule(5, 0.0, 0.0) == [1.0] * 5
