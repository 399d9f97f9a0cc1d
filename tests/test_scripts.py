"""The benchmark scripts run end to end at toy sizes (their timings are not asserted)."""

import datetime
import math
import re
import statistics
import subprocess
import sys

import pytest
import torch

from scripts.bench_newton_schulz import main as bench_newton_schulz
from scripts.bench_optimizer import gpt_matrix_shapes, ns_flops
from scripts.bench_optimizer import main as bench_optimizer
from scripts.bench_train import peak_tflops
from scripts.bench_train import report as bench_train_report
from tests.conftest import REPO


def test_gpt_matrix_shapes():
    assert gpt_matrix_shapes(8, 2) == [(8, 8)] * 8 + [(32, 8), (8, 32)] * 2


def test_ns_flops_counts_the_slices_each_optimizer_orthonormalizes():
    fp32 = torch.float32
    # Muon: the whole 64 x 16 matrix, 1:4, in the Gram form: 4 s^2 l + 2 (17 s^3).
    assert ns_flops("muon", [(64, 16)], fp32) == 4 * 16 * 16 * 64 + 34 * 16**3
    # Dion2 selects 4 of the 16 columns: a 4 x 64 slice, Gram; plain 5 (4 s^2 l + 2 s^3).
    assert ns_flops("dion2", [(64, 16)], fp32) == 4 * 4 * 4 * 64 + 34 * 4**3
    assert ns_flops("dion2", [(64, 16)], fp32, gram=False) == 5 * (4 * 4 * 4 * 64 + 2 * 4**3)
    # NorDion2 selects 16 of the 64 rows: a square 16 x 16 slice, plain in either setting.
    assert ns_flops("nordion2", [(64, 16)], fp32) == ns_flops("nordion2", [(64, 16)], fp32, gram=False)
    assert ns_flops("nordion2", [(64, 16)], fp32) == 5 * 6 * 16**3


def test_bench_optimizer_prints_the_table_and_ratios(tmp_path, capsys):
    png = tmp_path / "bench.png"
    times = bench_optimizer(["--model_dim", "32", "--n_layer", "1", "--steps", "2", "--png", str(png)])
    out = capsys.readouterr().out
    median = {name: statistics.median(values) for name, values in times.items()}
    assert list(times) == ["muon", "dion2 1", "dion2 0.5", "dion2 0.25", "dion2 0.125", "muon NS matmuls"]
    for name, values in times.items():
        row = rf"{min(values) * 1e3:.1f}\s+{median[name] * 1e3:.1f}\s+{median[name] / median['muon']:.3f}"
        assert re.search(rf"^{re.escape(name)}\s+{row}$", out, flags=re.MULTILINE), name
    # The targets are printed, never asserted (timings on a shared CPU): their ratios are checked.
    ns_ratio = median["muon"] / median["muon NS matmuls"]
    assert f"muon step / its NS matmuls alone: {ns_ratio:.3f} (target <= 1.3)" in out
    assert f"dion2 0.25 step / muon step: {median['dion2 0.25'] / median['muon']:.3f} (target <= 0.12)" in out
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


def run_script(name, *args):
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / name), *args], capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_bench_train_compares_optimizers_on_cpu():
    done = run_script(
        "bench_train.py",
        "--config",
        "configs/tiny_cpu.yaml",
        "--optimizer",
        "muon,dion2,adamw",
        "--steps",
        "2",
        "--warmup",
        "1",
        *("--model_dim", "32", "--n_layer", "1", "--batch_size", "8", "--device_batch_size", "4"),
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "cpu: median of 2 steps after 1 warm-up steps, 512 tokens/step" in out
    for name in ("muon", "dion2", "adamw"):
        # step ms, tokens/s, the two shares and the peak memory
        assert re.search(rf"^{name}\s+[\d.]+\s+[\d,]+\s+[\d.]+%\s+[\d.]+%\s+[\d.]+$", out, re.M), name
        ratios = out[out.index("ratios to muon") :]
        assert re.search(rf"^{name}\s+[\d.]+\s+[\d.]+\s+[\d.]+$", ratios, re.M), name
    assert re.search(r"^muon\s+1\.000\s+1\.000\s+1\.000$", out, re.M)
    assert "MFU" not in out  # CUDA only


def test_bench_train_report_derives_its_figures_from_the_measurements(capsys):
    # Timings are never asserted; what the report computes from them is.
    base = {"device": "NVIDIA H100", "device_type": "cuda", "tokens_per_step": 1000, "peak_tflops": 1.0}
    base |= {"flops_per_token": 1e8, "diagnostics_every": 10, "measured_step": None}
    results = {
        "muon": {**base, "step": 0.5, "forward_backward": 0.4, "optimizer": 0.1, "peak_bytes": 2**30},
        "dion2": {**base, "step": 0.25, "forward_backward": 0.2, "optimizer": 0.05, "peak_bytes": 2**31},
    }
    results["dion2"]["measured_step"] = 0.35
    bench_train_report(results, steps=4, warmup=1)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "NVIDIA H100: median of 4 steps after 1 warm-up steps, 1,000 tokens/step"
    # tokens/s = tokens per step / step; MFU = FLOPs per token x tokens/s / peak.
    assert lines[2].split() == ["muon", "500.0", "2,000", "80.0%", "20.0%", "1.00", "20.0%"]
    assert lines[3].split() == ["dion2", "250.0", "4,000", "80.0%", "20.0%", "2.00", "40.0%"]
    # The measured step's excess (100 ms) over 10 steps, as a share of a step (250 ms).
    assert lines[4] == (
        "dion2: diagnostics every 10 steps: a measured step takes 350.0 ms against 250.0 ms: "
        "4.00% of the step time"
    )
    assert [line.split() for line in lines[-2:]] == [
        ["muon", "1.000", "1.000", "1.000"],
        ["dion2", "2.000", "0.500", "2.000"],
    ]


@pytest.mark.slow
def test_bench_train_compares_activation_checkpointing():
    done = run_script(
        "bench_train.py",
        *("--config", "configs/tiny_cpu.yaml", "--optimizer", "dion2", "--steps", "1", "--warmup", "0"),
        *("--activation_checkpointing", "none,full"),
    )
    assert done.returncode == 0, done.stderr
    for mode in ("none", "full"):
        assert re.search(
            rf"^dion2 ac={mode}\s+[\d.]+\s+[\d,]+\s+[\d.]+%\s+[\d.]+%\s+[\d.]+$", done.stdout, re.M
        )
    assert "ratios to dion2 ac=none" in done.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--optimizer", "muon,sgd"], "--optimizer 'muon,sgd': unknown sgd; allowed: dion2, nordion2, muon"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--activation_checkpointing", "none,half"], "activation_checkpointing must be one of none, full"),
        (["--n_layers", "2"], "error: command line: unknown key '--n_layers'; did you mean 'n_layer'?"),
    ],
)
def test_bench_train_bad_input_is_one_line(args, message):
    done = run_script("bench_train.py", "--config", "configs/tiny_cpu.yaml", *args)
    assert done.returncode != 0
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_peak_table_picks_the_most_specific_name(monkeypatch):
    cuda = torch.device("cuda")
    for name, peak in [
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
    ]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert peak_tflops(cuda, None) == peak
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Some Future GPU")
    assert peak_tflops(cuda, None) is None
    assert peak_tflops(cuda, 500.0) == 500.0
    assert peak_tflops(torch.device("cpu"), None) is None


def test_bench_newton_schulz_runs_every_contender_it_can(capsys):
    bench_newton_schulz(
        ["--shape", "8", "20", "--batch", "2", "--dtype", "fp32", "--steps", "2", "--warmup", "1"]
    )
    out = capsys.readouterr().out
    assert "Newton-Schulz of 2 x 8 x 20 in fp32 on cpu, median of 2 calls; Gram / plain FLOPs 0.73" in out
    for name in ("pytorch", "torch.compile", "pytorch gram", "torch.compile gram"):
        assert re.search(rf"^{re.escape(name)}\s+[\d.]+\s+[\d.]+$", out, re.M), name


@pytest.mark.slow
def test_gpu_check_lists_its_checks_and_without_cuda_says_so_in_one_line():
    listed = run_script("gpu_check.py", "--dry-run")
    assert listed.returncode == 0, listed.stderr
    names = [line.split("  ")[0] for line in listed.stdout.splitlines()]
    assert names[:4] == [
        "triton products",
        "triton newton-schulz",
        "triton launch placement",
        "triton bf16 timing",
    ]
    assert {"fsdp bf16 1 rank", "compile", "no host sync", "160m dion2", "160m adamw"} <= set(names)
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the check would run")
    run = run_script("gpu_check.py")
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        f"gpu_check: no CUDA device here (torch {torch.__version__}); nothing to check"
    ]
    unknown = run_script("gpu_check.py", "--only", "fsdp")
    assert (
        unknown.returncode == 2
        and "--only: unknown check 'fsdp'; the checks: triton products" in unknown.stderr
    )


# gpu_check.py run as `python scripts/gpu_check.py` runs it.
RUN_GPU_CHECK = (
    "import runpy\nsys.argv = ['gpu_check.py']\nrunpy.run_path('scripts/gpu_check.py', run_name='__main__')"
)


def with_hidden(packages, code):
    """Run `code` in a fresh Python in the repository, as if `packages` were not installed."""
    hide = f"import sys\nfor name in {packages!r}: sys.modules[name] = None\n"
    return subprocess.run(
        [sys.executable, "-c", hide + code], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def test_gpu_check_names_every_missing_package_in_one_line():
    run = with_hidden(
        ("yaml", "triton"),
        RUN_GPU_CHECK,
    )
    assert run.returncode == 1, run.stderr
    assert run.stdout.splitlines() == [
        "gpu_check: missing packages: PyYAML, triton; install them: pip install PyYAML triton"
    ]


def test_gpu_check_in_a_checkout_pip_has_not_installed_says_how_to_run_it():
    run = with_hidden(
        ("optimizers",),
        RUN_GPU_CHECK,
    )
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.splitlines() == [
        "gpu_check: the repository is not installed; from its root run "
        "`python -m pip install --no-deps --no-build-isolation -e .`, or `python -m scripts.gpu_check`"
    ]


@pytest.mark.slow
def test_gpu_check_trains_without_tiktoken():
    # data/tokenizer.py imported tiktoken at the top, so every check that read the config died
    # on an image with torch and nothing else; only GPT-2's text needs it.
    run = with_hidden(
        ("tiktoken", "tiktoken_ext", "tiktoken.load"),
        "from scripts.gpu_check import SMALL, train_losses, training_run\n"
        "print(train_losses(training_run([*SMALL, '--device', 'cpu', '--n_layer', '1']), 2))",
    )
    assert run.returncode == 0, run.stderr
    assert len(eval(run.stdout)) == 2


# A stand-in for microsoft/dion's package, so that the comparison scripts' plumbing is tested
# without it: our own classes under its names, taking (and ignoring) its newton_schulz_func.
FAKE_DION = """
from optimizers import Dion2 as _Dion2, Dion3 as _Dion3, Muon as _Muon, NorDion2 as _NorDion2
from optimizers import NorMuon as _NorMuon


def _theirs(cls):
    class Theirs(cls):
        def __init__(self, params, newton_schulz_func=None, **kwargs):
            super().__init__(params, **kwargs)

    return Theirs


Muon, NorMuon, Dion2, NorDion2, Dion3 = map(_theirs, (_Muon, _NorMuon, _Dion2, _NorDion2, _Dion3))
"""


@pytest.fixture
def fake_dion(tmp_path):
    (tmp_path / "checkout" / "dion").mkdir(parents=True)
    (tmp_path / "checkout" / "dion" / "__init__.py").write_text(FAKE_DION)
    return tmp_path / "checkout"


def test_bench_optimizer_against_a_reference_prints_every_pair_and_ratio(fake_dion, capsys):
    argv = ["--against", str(fake_dion), "--model_dims", "16", "--n_layer", "1", "--steps", "1"]
    results, own = bench_optimizer([*argv, "--warmup", "1"])
    out = capsys.readouterr().out
    for name in ("muon", "normuon", "dion2", "nordion2"):
        pairs = [results[(16, name, mode)] for mode in ("defaults", "fp32")]
        cells = "".join(
            rf"\s+{t['ours'] * 1e3:.1f}\s+{t['theirs'] * 1e3:.1f}\s+{t['ours'] / t['theirs']:.2f}x\s+[\d.]+x"
            for t in pairs
        )
        assert re.search(rf"^\s+16 {name}\s*{cells}$", out, flags=re.M), name
    median = {name: statistics.median(values) for name, values in own[16].items()}
    assert (
        f"muon step / its NS matmuls {median['muon'] / median['muon NS matmuls']:.3f} (target <= 1.3), "
        f"dion2 0.25 / muon {median['dion2 0.25'] / median['muon']:.3f} (target <= 0.12)"
    ) in out


def test_compare_reference_passes_on_the_same_rules_and_refuses_a_bad_path(fake_dion, capsys, tmp_path):
    from scripts.compare_reference import main

    main(["--against", str(fake_dion / "dion")])
    out = capsys.readouterr().out
    assert re.search(r"^nordion2\s+0.25 tall\s+1.000000$", out, flags=re.M)
    assert "lowest cosine 1.000000" in out
    with pytest.raises(SystemExit, match="neither a checkout of microsoft/dion"):
        main(["--against", str(tmp_path)])


def test_a_results_file_says_what_made_its_figures(tmp_path, capsys):
    from scripts.results import commit, machine, results_file

    path = tmp_path / "results" / "bench.md"
    with results_file(path, "bench_x.py", ["--steps", "2"], "cpu"):
        print("| a | 1.0 |")
    assert capsys.readouterr().out == "| a | 1.0 |\n"  # still printed
    header, body = path.read_text().split("\n\n", 1)
    assert header.startswith(f"Written by `python scripts/bench_x.py --steps 2` at commit {commit()} on ")
    assert machine("cpu") in header and header.endswith(f"{datetime.date.today()}.")
    assert body == "```\n| a | 1.0 |\n```\n"
    with results_file(None, "bench_x.py", [], "cpu"):
        print("nothing kept")
    assert list(path.parent.iterdir()) == [path]


def test_bench_train_reads_shards_without_validation_data():
    # gpu_check's 160M rows read the shipped shards through the loader with dion2_160m's
    # val_tokens, more than its val shard holds: a benchmark never evaluates, so reads none.
    from scripts.bench_train import measure

    argv = ["--config", "configs/tiny_cpu.yaml", "--model_dim", "32", "--n_layer", "1", "--device", "cpu"]
    argv += ["--batch_size", "8", "--device_batch_size", "4", "--val_tokens", "10485760"]
    result = measure(argv, "dion2", steps=1, warmup=0, peak_override=None, data="shards")
    assert result["step"] > 0 and math.isfinite(result["final_loss"])
