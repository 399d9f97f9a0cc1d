"""Finished or running training runs read back from their folders, for plot_runs.py and
compare_runs.py: where the runs are, their configs and metrics, and labels that tell them apart."""

import json
import re
import statistics
from pathlib import Path

import yaml

from optimizers.registry import OPTIMIZER_KEYS, OPTIMIZERS, reads
from training.config import RUN_KEYS
from training.metrics import read_metrics

# Keys that name a run rather than describe it.
NOT_LABELS = ("run_name", "runs_dir", "resume", "wandb_project")
# Keys that only some optimizers read; a label shows them only for those.
READERS = {
    key: tuple(name for name in OPTIMIZERS if reads(name, key))
    for key in OPTIMIZER_KEYS
    if key not in RUN_KEYS
}


# evaluate.py's results: one JSON file per evaluated checkpoint, under the run's folder.
EVALUATIONS = "eval"
EVALUATION_RE = re.compile(r"^step_(\d+)\.json$")


def evaluation_path(run_dir, step):
    """Where evaluate.py writes the downstream results of a run's checkpoint of `step`."""
    return Path(run_dir) / EVALUATIONS / f"step_{step:06d}.json"


def load_evaluation(run_dir):
    """The newest downstream results of a run: {"step", "metrics": {"task/metric": value}}, or None."""
    folder = Path(run_dir) / EVALUATIONS
    found = sorted(
        (int(m.group(1)), p) for p in folder.glob("step_*.json") if (m := EVALUATION_RE.match(p.name))
    )
    if not found:
        return None
    step, path = found[-1]
    try:
        tasks = json.loads(path.read_text())["tasks"]
    except (OSError, ValueError, KeyError) as e:
        raise RunsError(f"{path} is not an evaluation written by evaluate.py: {e}") from None
    metrics = {f"{task}/{name}": value for task, values in tasks.items() for name, value in values.items()}
    return {"step": step, "metrics": metrics}


class RunsError(ValueError):
    """A folder that holds no run to read, or a run that cannot be read."""


def find_runs(paths):
    """The run folders (each with a metrics.jsonl) named by `paths` or found beneath them at any
    depth, in order."""
    runs = []
    for path in map(Path, paths):
        if (path / "metrics.jsonl").is_file():
            runs.append(path)
        elif path.is_dir() and (found := sorted(p.parent for p in path.rglob("metrics.jsonl"))):
            runs.extend(found)
        else:
            raise RunsError(
                f"{path} is neither a run folder (with metrics.jsonl) nor a folder with runs beneath it"
            )
    return runs


def load_run(run_dir):
    """A run's config (a dict) and metric records."""
    config_path = Path(run_dir) / "config.yaml"
    if not config_path.is_file():
        raise RunsError(f"{run_dir} has metrics.jsonl but no config.yaml")
    return yaml.safe_load(config_path.read_text()), read_metrics(run_dir)


def labels(configs):
    """One label per config: the keys whose values differ between the configs, as key=value."""
    every_key = dict.fromkeys(k for c in configs for k in c)
    keys = [k for k in every_key if k not in NOT_LABELS and len({repr(c.get(k)) for c in configs}) > 1]
    out = []
    for config in configs:
        shown = [k for k in keys if config.get("optimizer") in READERS.get(k, (config.get("optimizer"),))]
        out.append(", ".join(f"{k}={config.get(k)}" for k in shown) or config["run_name"])
    return out


def load_runs(paths, axis="steps"):
    """Every run under `paths` as a dict: its config and records; `label` (what sets it apart),
    `seedless` (the label of its configuration over seeds); `val`, its (step, val loss) pairs;
    `x`, step -> steps or tokens as `axis` says; `tokens`, step -> tokens; `evaluation`, its
    newest downstream results (`load_evaluation`) or None."""
    run_dirs = find_runs(paths)
    loaded = [load_run(d) for d in run_dirs]
    configs = [c for c, _ in loaded]
    seedless = labels([{k: v for k, v in c.items() if k != "seed"} for c in configs])
    return [
        {
            "config": config,
            "records": records,
            "label": label,
            "seedless": seedless[i],
            "x": {r["step"]: r["step"] if axis == "steps" else r["tokens"] for r in records},
            "val": [(r["step"], r["val_loss"]) for r in records if "val_loss" in r],
            "tokens": {r["step"]: r["tokens"] for r in records},
            "evaluation": load_evaluation(run_dir),
        }
        for i, (run_dir, (config, records), label) in enumerate(
            zip(run_dirs, loaded, labels(configs), strict=True)
        )
    ]


def mean_train_loss(records, start, end):
    """The mean train loss of the steps after `start` up to `end`. In a single pass over the data
    each batch is scored before the model trains on it, so this is a held-out loss. Skipped
    steps, whose loss was not finite (null), are left out."""
    losses = [r["train_loss"] for r in records if start < r["step"] <= end and r["train_loss"] is not None]
    return statistics.mean(losses)


def tail_train_loss(records):
    """The mean train loss over the last quarter of the steps: a held-out loss over many more
    tokens than a small validation set."""
    last = records[-1]["step"]
    return mean_train_loss(records, 0.75 * last, last)
