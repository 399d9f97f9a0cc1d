"""train.py end to end: learning, determinism, exact resume, one-line errors, DDP."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from optimizers.registry import OPTIMIZERS
from tests.conftest import REPO, make_shards, run_train, torchrun, train_argv
from training.checkpoint import list_checkpoints, load_checkpoint

COMPARED = ("train_loss", "val_loss", "lr", "grad_norm", "tokens")


def compared(records):
    return [{k: r.get(k) for k in ("step", *COMPARED)} for r in records]


def test_loss_falls_on_the_embedded_data(tmp_path):
    records = run_train(tmp_path, "learn", num_iterations=80, val_loss_every=20)
    assert records[0]["train_loss"] == pytest.approx(math.log(50304), abs=1e-4)
    assert records[-1]["val_loss"] < 7.6  # two seeds gave 7.22 and 7.20
    assert records[-1]["val_loss"] < records[19]["val_loss"] - 0.5


ORTHONORMAL = {"lr": 0.02, "scalar_lr": 0.01}


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("scalar_opt", ["adamw", "lion"])
def test_every_optimizer_lowers_the_loss(tmp_path, optimizer, scalar_opt):
    settings = ORTHONORMAL if optimizer != "adamw" else {}
    records = run_train(
        tmp_path,
        "o",
        num_iterations=30,
        val_loss_every=10,
        optimizer=optimizer,
        scalar_opt=scalar_opt,
        **settings,
    )
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert vals[0] > vals[1] > vals[2] and vals[2] < vals[0] - 0.5, vals


DION2_RUN = {"num_iterations": 30, "val_loss_every": 10, "optimizer": "dion2", **ORTHONORMAL}


@pytest.fixture(scope="module")
def dion2_default_losses(tmp_path_factory):
    """The train losses of DION2_RUN with Dion2's defaults (l1 selection, selective decay)."""
    return [r["train_loss"] for r in run_train(tmp_path_factory.mktemp("default"), "d", **DION2_RUN)]


@pytest.mark.parametrize("options", [{"selection": "random"}, {"decay": "full"}])
def test_dion2_variants_train(tmp_path, dion2_default_losses, options):
    records = run_train(tmp_path, "v", **DION2_RUN, **options)
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert vals[-1] < vals[0] - 0.3, vals
    # Runs are deterministic: an option that never reached the optimizer would give the default
    # run's losses, step for step. The first two losses come before any difference can show.
    losses = [r["train_loss"] for r in records]
    assert losses[:2] == dion2_default_losses[:2]
    assert all(a != b for a, b in zip(losses[3:], dion2_default_losses[3:], strict=True))


def test_selection_diagnostics_are_logged(tmp_path):
    records = run_train(
        tmp_path, "d", optimizer="dion2", diagnostics_every=4, ortho_fraction=0.25, **ORTHONORMAL
    )
    logged = [r for r in records if "selection_coverage_mean" in r]
    assert [r["step"] for r in logged] == [4, 8]
    assert 0.25 <= logged[0]["selection_coverage_min"] <= logged[1]["selection_coverage_mean"] <= 1
    assert logged[1]["selection_longest_wait"] >= 1


def test_metrics_and_run_folder(tmp_path):
    records = run_train(tmp_path, "m")
    assert [r["step"] for r in records] == list(range(1, 9))
    keys = {"step", "train_loss", "lr", "grad_norm", "tokens", "step_time", "tokens_per_s", "comm_bytes"}
    assert set(records[0]) == keys
    assert records[0]["comm_bytes"] == 0  # one process moves nothing
    assert [r["step"] for r in records if "val_loss" in r] == [4, 8]
    assert records[-1]["tokens"] == 8 * 8 * 16
    run = tmp_path / "m"
    assert "model_dim: 32" in (run / "config.yaml").read_text()
    saved = list_checkpoints(run)[-1]
    assert saved.name == "step_000008" and (saved / ".metadata").is_file()  # a DCP folder
    state = load_checkpoint(saved)
    assert set(state) == {"loader", "rng", "step", "skipped_steps", "config", "wandb_id"}
    assert state["step"] == 8


def test_an_exponent_learning_rate_on_the_command_line(tmp_path):
    records = run_train(tmp_path, "e", lr="3e-4", num_iterations=2)
    assert records[0]["lr"] == 0.0003
    assert "lr: 0.0003" in (tmp_path / "e" / "config.yaml").read_text()


@pytest.mark.slow
def test_no_arguments_help_and_no_run_name_are_one_line_or_help():
    from training.config import KEYS, USAGE

    bare = run_cli([])
    assert (bare.returncode, bare.stderr, bare.stdout) == (1, f"error: {USAGE}\n", "")
    helped = run_cli(["--help"])
    assert helped.returncode == 0 and helped.stderr == ""
    assert all(f"--{key} (" in helped.stdout for key in KEYS)
    nameless = run_cli(["--num_iterations", "1"])
    assert nameless.returncode == 1 and nameless.stderr.count("\n") == 1
    assert nameless.stderr.startswith("error: no run name: pass --config FILE")


def test_same_seed_same_losses_bit_for_bit(tmp_path):
    a = run_train(tmp_path, "a")
    b = run_train(tmp_path, "b")
    c = run_train(tmp_path, "c", seed=1)
    assert compared(a) == compared(b)
    assert [r["train_loss"] for r in a] != [r["train_loss"] for r in c]


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"optimizer": "dion2", "selection": "random", **ORTHONORMAL},
        {"optimizer": "dion", **ORTHONORMAL},
        {"optimizer": "normuon", "scalar_opt": "lion", **ORTHONORMAL},
    ],
)
def test_resume_continues_exactly(tmp_path, options):
    full = run_train(tmp_path, "full", checkpoint_every=4, keep_checkpoints=5, grad_clip=0.5, **options)
    # A copy of the run as it stood at step 4, with a later metrics line that the crash left.
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full", part)
    shutil.rmtree(part / "checkpoints" / "step_000008")
    lines = (part / "metrics.jsonl").read_text().splitlines()
    (part / "metrics.jsonl").write_text("\n".join(lines[:5]) + "\n")
    resumed = run_train(
        tmp_path, "part", checkpoint_every=4, keep_checkpoints=5, grad_clip=0.5, resume="auto", **options
    )
    assert compared(resumed) == compared(full)


def test_resume_from_a_path_and_config_mismatch(tmp_path):
    run_train(tmp_path, "src", checkpoint_every=4, keep_checkpoints=5)
    ckpt = tmp_path / "src" / "checkpoints" / "step_000004"
    records = run_train(tmp_path, "other", resume=str(ckpt))
    assert [r["step"] for r in records] == [5, 6, 7, 8]
    from training.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="different model_dim"):
        run_train(tmp_path, "other2", resume=str(ckpt), model_dim=64)
    with pytest.raises(CheckpointError, match=r"different optimizer \(adamw, config says muon\)"):
        run_train(tmp_path, "other3", resume=str(ckpt), optimizer="muon")


def test_trains_without_wandb_installed(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # any import of wandb would now fail
    assert len(run_train(tmp_path, "nowandb", num_iterations=2)) == 2


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_train(tmp_path, "wb", num_iterations=2, wandb_project="test")
    assert list((tmp_path / "wb" / "wandb").glob("offline-run-*"))


def run_cli(args, **kwargs):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "train.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        **kwargs,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("unknown_key", "error: command line: unknown key '--lerning_rate'; did you mean 'lr'?"),
        ("missing_data", "error: data_dir "),
        ("corrupt_shard", "error: shard "),
        ("other_tokenizer", "error: shard "),
    ],
)
def test_bad_input_is_one_line(tmp_path, case, message):
    data = tmp_path / "data"
    make_shards(data, "x", [5000, 5000])
    extra = {"unknown_key": ["--lerning_rate", "0.1"], "other_tokenizer": ["--tokenizer", "bytes"]}.get(
        case, []
    )
    data_dir = tmp_path / "nope" if case == "missing_data" else data
    if case == "corrupt_shard":
        shard = data / "x_train_000001.bin"
        shard.write_bytes(shard.read_bytes()[:-3])
    result = run_cli([*train_argv(tmp_path / "runs", "e", data_dir=data_dir), *extra])
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert result.stderr.startswith(message), result.stderr
    assert not (tmp_path / "runs").exists()  # refused before any work


@pytest.mark.slow
def test_existing_run_is_never_overwritten(tmp_path):
    run_train(tmp_path, "keep", num_iterations=2)
    before = {p: p.read_bytes() for p in (tmp_path / "keep").rglob("*") if p.is_file()}
    result = run_cli(train_argv(tmp_path, "keep", num_iterations=2))
    assert result.returncode == 1 and "pass --resume auto" in result.stderr
    assert {p: p.read_bytes() for p in (tmp_path / "keep").rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    settings = {"num_iterations": 120, "checkpoint_every": 10, "val_loss_every": 50}
    reference = run_train(tmp_path, "reference", **settings)
    proc = subprocess.Popen(
        [sys.executable, "train.py", *train_argv(tmp_path, "killed", **settings)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpt = tmp_path / "killed" / "checkpoints" / "step_000030"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be killed mid-way"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(list_checkpoints(tmp_path / "killed")[-1])["step"]
    assert 30 <= killed_at < 120
    resumed = run_cli(train_argv(tmp_path, "killed", resume="auto", **settings))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    records = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert compared(records) == compared(reference)


@pytest.mark.slow
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"optimizer": "dion2", "ortho_fraction": 0.25, **ORTHONORMAL},
        # compiled on both ranks, against the eager single process
        {"optimizer": "dion2", "ortho_fraction": 0.25, **ORTHONORMAL, "compile": True},
    ],
)
def test_two_process_ddp_matches_one_process(tmp_path, options):
    single = run_train(tmp_path, "single", num_iterations=5, **{**options, "compile": False})
    args = train_argv(tmp_path, "ddp", num_iterations=5, **options)
    result = torchrun(2, args)
    records = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5], result.stderr[-2000:]
    for a, b in zip(single, records, strict=True):
        for key in ("train_loss", "val_loss", "grad_norm"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), key
    assert load_checkpoint(list_checkpoints(tmp_path / "ddp")[-1])["step"] == 5
    # Dion2 splits its orthonormalization over the ranks and gathers the results.
    assert all((r["comm_bytes"] > 0) == ("optimizer" in options) for r in records)
