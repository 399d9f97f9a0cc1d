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


def test_bench_optimizer_sweeps_model_dims(tmp_path, capsys):
    png = tmp_path / "dims.png"
    bench_optimizer(["--model_dims", "16", "32", "--n_layer", "1", "--steps", "1", "--png", str(png)])
    out = capsys.readouterr().out
    summary = out[out.index("median optimizer.step() in ms, by model_dim") :]
    assert re.search(
        r"^model_dim\s+muon\s+dion2 1\s+dion2 0.5\s+dion2 0.25\s+dion2 0.125\s+muon NS matmuls$",
        summary,
        re.M,
    )
    for dim in (16, 32):
        assert re.search(rf"^\s+{dim}(\s+[\d.]+){{6}}$", summary, flags=re.MULTILINE), dim
        assert f"GPT of model_dim {dim};" in out  # the per-dimension table
    assert png.stat().st_size > 5000
