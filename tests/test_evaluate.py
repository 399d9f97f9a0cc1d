"""scripts/evaluate.py: a local multiple-choice task scored through lm-eval, against the
accuracy computed here from the model's log-likelihoods; its refusals; and the scores in
sweep.py, compare_runs.py and plot_runs.py."""

import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
import yaml

from scripts import compare_runs, evaluate, plot_runs, sweep
from scripts.run_records import evaluation_path, load_runs
from tests.conftest import REPO, TINY, fake_run, torchrun
from training.checkpoint import list_checkpoints, load_checkpoint

TASKS = REPO / "tests" / "eval_tasks"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def train_tiny(runs_dir, name, layout=()):
    """A short tiny_cpu run (in one process, or on the torchrun `layout`); return its folder."""
    argv = ["--config", str(REPO / "configs/tiny_cpu.yaml")]
    for key, value in {
        "runs_dir": runs_dir,
        "run_name": name,
        "num_iterations": 30,
        "val_loss_every": 30,
    }.items():
        argv += [f"--{key}", str(value)]
    argv += ["--val_tokens", "4096", "--sample_tokens", "0", "--ns_dtype", "fp32"]
    if layout:
        assert torchrun(2, [*argv, *layout]).returncode == 0
    else:
        subprocess.run([sys.executable, "train.py", *argv], cwd=REPO, check=True, capture_output=True)
    return runs_dir / name


def run_evaluate(tmp_path, *args):
    """evaluate.py in a fresh process, offline, with an empty Hugging Face cache."""
    env = {**os.environ, **OFFLINE, "HF_HOME": str(tmp_path / "hf")}
    return subprocess.run(
        [sys.executable, "scripts/evaluate.py", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def direct_accuracy(checkpoint):
    """The task's accuracy from the model's log-likelihoods, one choice at a time: each choice
    follows the question after a space, and the likeliest choice is the answer."""
    meta = load_checkpoint(checkpoint)
    model, tokenizer = evaluate.load_gpt(checkpoint, meta, torch.device("cpu"))
    docs = [json.loads(line) for line in (TASKS / "tiny_choice.jsonl").read_text().splitlines()]
    correct = 0
    for doc in docs:
        scores = []
        for choice in doc["choices"]:
            context = tokenizer.encode(doc["question"])
            whole = tokenizer.encode(doc["question"] + " " + choice)
            assert whole[: len(context)] == context
            with torch.no_grad():
                logits = model(torch.tensor([whole[:-1]]))[0, :, : tokenizer.vocab_size]
            log_probs = F.log_softmax(logits.double(), dim=-1)
            scores.append(sum(log_probs[i - 1, whole[i]].item() for i in range(len(context), len(whole))))
        correct += max(range(len(scores)), key=scores.__getitem__) == doc["answer"]
    return correct / len(docs)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [(), ("--fs_size", "2")], ids=["one-process", "fsdp2"])
def test_accuracy_equals_the_models_own_log_likelihoods(tmp_path, layout):
    run = train_tiny(tmp_path, "tiny", layout)
    done = run_evaluate(
        tmp_path, "--checkpoint", str(run), "--tasks", "tiny_choice", "--include_path", str(TASKS)
    )
    assert done.returncode == 0, done.stderr[-3000:]
    step = load_checkpoint(list_checkpoints(run)[-1])["step"]
    record = json.loads(evaluation_path(run, step).read_text())
    assert record["step"] == 30 and record["samples"] == {"tiny_choice": 16}
    accuracy = direct_accuracy(list_checkpoints(run)[-1])
    assert record["tasks"]["tiny_choice"]["acc"] == pytest.approx(accuracy, abs=1e-12)
    assert f"tiny_choice: acc {accuracy:.4f}" in done.stdout


def test_without_lm_eval_one_line_names_the_extra(monkeypatch, tmp_path):
    real = evaluate.importlib.util.find_spec
    monkeypatch.setattr(
        evaluate.importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a)
    )
    with pytest.raises(
        evaluate.EvaluationError, match=r"lm-eval is not installed.*pip install -r requirements-eval\.txt"
    ):
        evaluate.main(["--checkpoint", str(tmp_path), "--tasks", "hellaswag"])


@pytest.mark.slow
def test_refusals_are_one_line_and_write_nothing(tmp_path):
    run = train_tiny(tmp_path, "tiny")
    cases = [
        (["--tasks", "hellaswag"], r"task hellaswag's data could not be loaded \(.*\); fetch it once"),
        (["--tasks", "hellaswg"], r"unknown task 'hellaswg'; did you mean 'hellaswag'\?"),
        (["--tasks", "tiny_choice", "--limit", "0"], r"--limit must be >= 1, got 0"),
    ]
    for args, message in cases:
        done = run_evaluate(tmp_path, "--checkpoint", str(run), *args)
        assert done.returncode == 1 and "Traceback" not in done.stderr
        assert re.fullmatch(rf"error: {message}.*\n", done.stderr.splitlines(keepends=True)[-1]), done.stderr
    missing = run_evaluate(tmp_path, "--checkpoint", str(tmp_path / "none"), "--tasks", "tiny_choice")
    assert missing.stderr.startswith("error: checkpoint") and "does not exist" in missing.stderr
    assert not (run / "eval").exists()


def offline_sweep(tmp_path, monkeypatch):
    """A one-point tiny sweep file, with the Hugging Face libraries offline and an empty cache."""
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    base = tmp_path / "tiny.yaml"
    base.write_text(yaml.safe_dump({**TINY, "lr": 0.02, "scalar_lr": 0.01}))
    path = tmp_path / "scored.yaml"
    path.write_text(yaml.safe_dump({"base": str(base), "overrides": {}, "grid": {"optimizer": ["dion2"]}}))
    return path


@pytest.mark.slow
def test_sweep_scores_each_finished_point_once(tmp_path, capsys, monkeypatch):
    path = offline_sweep(tmp_path, monkeypatch)
    argv = [str(path), "--runs_dir", str(tmp_path / "runs"), "--evaluate", "tiny_choice"]
    argv += ["--evaluate_args", f"--include_path {TASKS} --limit 8"]
    assert sweep.main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"optimizer=dion2: evaluated: tiny_choice/acc \d\.\d{4}$", out, re.M), out
    run = tmp_path / "runs" / "scored" / "optimizer=dion2"
    assert json.loads(evaluation_path(run, TINY["num_iterations"]).read_text())["samples"] == {
        "tiny_choice": 8
    }
    assert sweep.main(argv) == 0
    assert "evaluated" not in capsys.readouterr().out  # scored before: nothing runs again


def test_sweep_refuses_bad_evaluation_options_before_any_run(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"base": "configs/tiny_cpu.yaml", "overrides": {}, "grid": {"seed": [0]}}))
    with pytest.raises(sweep.SweepError, match="--evaluate_args is read only with --evaluate"):
        sweep.main([str(path), "--runs_dir", str(tmp_path), "--evaluate_args", "--limit 3"])
    with pytest.raises(evaluate.EvaluationError, match="--limit must be >= 1, got 0"):
        sweep.main(
            [str(path), "--runs_dir", str(tmp_path), "--evaluate", "piqa", "--evaluate_args", "--limit 0"]
        )
    assert not (tmp_path / "s").exists()


def scored(run, step, acc, stderr):
    """Write an evaluation of `run` as evaluate.py does."""
    path = evaluation_path(run, step)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"step": step, "tasks": {"piqa": {"acc": acc, "acc_stderr": stderr}}}))


def test_scores_reach_compare_runs_and_plot_runs(tmp_path):
    def records(val):
        return [
            {
                "step": s,
                "tokens": 10 * s,
                "train_loss": 3.0,
                "step_time": 1.0,
                **({"val_loss": val} if s == 4 else {}),
            }
            for s in range(1, 5)
        ]

    for seed, acc in enumerate([0.60, 0.64]):
        scored(fake_run(tmp_path, f"muon{seed}", records(2.0), optimizer="muon", seed=seed), 4, acc, 0.01)
    for seed, acc in enumerate([0.70, 0.74]):
        scored(fake_run(tmp_path, f"dion2_{seed}", records(1.9), seed=seed), 4, acc, 0.01)
    runs = load_runs([tmp_path])
    table = compare_runs.comparison(runs, "optimizer=muon")[0]
    assert "| configuration | scored | piqa/acc | p |" in table
    interval = compare_runs.mean_interval([0.70, 0.74])
    p = compare_runs.welch([0.70, 0.74], [0.60, 0.64])[3]
    row = f"| optimizer=dion2 | 2 | 0.7200 [{interval[1]:.4f}, {interval[2]:.4f}] | {p:.3g} |"
    assert row in table
    assert "| optimizer=muon | 2 | 0.6200 [" in table and "| baseline |" in table
    rows = plot_runs.final_loss_tables(runs)
    assert "| run | evaluated step | piqa/acc |" in rows
    assert re.search(r"\| optimizer=dion2, seed=1 \| 4 \| 0\.7400 ± 0\.0100 \|", rows), rows


@pytest.mark.slow
def test_a_slurm_job_scores_a_point_that_finished_before(tmp_path, capsys, monkeypatch):
    path = offline_sweep(tmp_path, monkeypatch)
    local = [str(path), "--runs_dir", str(tmp_path / "runs")]
    assert sweep.main(local) == 0
    run = tmp_path / "runs" / "scored" / "optimizer=dion2"
    trained = (run / "train.log").read_text()
    slurm = [*local, "--launcher", "slurm", "--submitit_cluster", "local", "--evaluate", "tiny_choice"]
    slurm += ["--evaluate_args", f"--include_path {TASKS} --limit 4"]
    assert sweep.main(slurm) == 0
    out = capsys.readouterr().out
    assert "optimizer=dion2: finished before, to be scored" in out and "1 jobs" in out
    scores = evaluation_path(run, TINY["num_iterations"])
    deadline = time.monotonic() + 180
    while not scores.is_file():
        assert time.monotonic() < deadline, (
            (run / "eval.log").read_text() if (run / "eval.log").exists() else ""
        )
        time.sleep(0.2)
    assert json.loads(scores.read_text())["samples"] == {"tiny_choice": 4}
    assert (run / "train.log").read_text() == trained  # the job only scored the run
    assert sweep.main(slurm) == 0
    out = capsys.readouterr().out
    assert "optimizer=dion2: finished before, skipped" in out and "0 jobs" in out
