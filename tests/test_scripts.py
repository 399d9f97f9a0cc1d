"""The benchmark scripts run end to end at toy sizes (their figures are not asserted)."""

import re

from scripts.bench_optimizer import gpt_matrix_shapes
from scripts.bench_optimizer import main as bench_optimizer


def test_gpt_matrix_shapes():
    assert gpt_matrix_shapes(8, 2) == [(8, 8)] * 8 + [(32, 8), (8, 32)] * 2


def test_bench_optimizer_prints_the_table_and_ratios(tmp_path, capsys):
    png = tmp_path / "bench.png"
    bench_optimizer(["--model_dim", "32", "--n_layer", "1", "--steps", "2", "--png", str(png)])
    out = capsys.readouterr().out
    for name in ("muon", "dion2 1", "dion2 0.5", "dion2 0.25", "dion2 0.125", "muon NS matmuls"):
        assert re.search(rf"^{re.escape(name)}\s+[\d.]+\s+[\d.]+\s+[\d.]+$", out, flags=re.MULTILINE), name
    assert re.search(r"muon step / its NS matmuls alone: [\d.]+ \(target <= 1.3\)", out)
    assert re.search(r"dion2 0.25 step / muon step: [\d.]+ \(target <= 0.12\)", out)
    assert png.stat().st_size > 1000
