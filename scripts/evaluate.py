"""Score a checkpoint on downstream tasks (HellaSwag, ARC, PIQA, LAMBADA, ...) with lm-eval.

    pip install -r requirements-eval.txt        # the optional extra, once
    python scripts/evaluate.py --checkpoint runs/dion2_160m --tasks hellaswag,arc_easy,piqa,lambada_openai
    python scripts/evaluate.py --checkpoint runs/dion2_160m/checkpoints/step_003000 --tasks hellaswag \\
        --limit 500 --include_path my_tasks/

`--checkpoint` is a checkpoint folder, or a run folder (its newest checkpoint). A checkpoint
of any layout (DDP, FSDP, TP, ...) loads into one process: only the model's weights are read.
The model is scored through lm-eval's Python API by an adapter (scripts/lm_eval_adapter.py)
that gives lm-eval its log-likelihoods under the run's tokenizer (GPT-2 for FineWeb runs).
The results, per task its metrics and their standard errors, go to
`<run>/eval/step_NNNNNN.json` (or `--output`), where compare_runs.py and plot_runs.py read them.

Task data comes from the Hugging Face hub through lm-eval, and is cached (HF_HOME); offline
(HF_DATASETS_OFFLINE=1), only cached tasks and local ones (`--include_path`) load.
"""

import argparse
import difflib
import importlib.util
import json
import sys
from pathlib import Path

import torch

from data.tokenizer import TOKENIZERS
from models.gpt_model import GPT
from parallel.process_group import DeviceError, pick_device
from scripts.run_records import evaluation_path
from training.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, load_model
from training.config import KEYS, PRECISIONS, ConfigError, TrainConfig
from training.model_setup import gpt_config
from training.precision import bf16_autocast

INSTALL = "pip install -r requirements-eval.txt"
# The config keys that shape the model a checkpoint holds.
SHAPE_KEYS = ("tokenizer", "model_dim", "n_layer", "n_head", "sequence_length")


class EvaluationError(ValueError):
    """Bad input to an evaluation: a missing extra, an unknown task, data that cannot load."""


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint folder or a run folder")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    parser.add_argument(
        "--num_fewshot", type=int, default=None, help="examples in each prompt (task default)"
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="score only the first LIMIT examples per task"
    )
    parser.add_argument("--batch_size", type=int, default=16, help="sequences per forward pass")
    parser.add_argument("--device", default="auto", help="`auto`, `cpu`, `cuda`, `cuda:N`, `mps`")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="as the config key: bf16 autocast on CUDA under auto",
    )
    parser.add_argument("--include_path", type=Path, default=None, help="a folder of extra task YAMLs")
    parser.add_argument("--output", type=Path, default=None, help="the results' JSON file")
    args = parser.parse_args(argv)
    for name in ("batch_size", "limit"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise EvaluationError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise EvaluationError(f"--num_fewshot must be >= 0, got {args.num_fewshot}")
    args.task_names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not args.task_names:
        raise EvaluationError(f"--tasks '{args.tasks}' names no task")
    return args


def require_lm_eval():
    """Raise EvaluationError with the install line when lm-eval is not installed."""
    if importlib.util.find_spec("lm_eval") is None:
        raise EvaluationError(f"lm-eval is not installed; install the evaluation extra: {INSTALL}")


def resolve_checkpoint(path):
    """(checkpoint folder, its meta): `path` itself, or the newest checkpoint of the run `path`."""
    if path.is_dir() and not (path / "manifest.json").exists() and list_checkpoints(path):
        path = list_checkpoints(path)[-1]
    return path, load_checkpoint(path)


def task_manager(include_path):
    """lm-eval's task index, with the tasks under `include_path` added."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not include_path.is_dir():
        raise EvaluationError(f"--include_path {include_path} is not a folder")
    return TaskManager(include_path=str(include_path) if include_path else None)


def check_tasks(names, manager):
    """Load each task's data once (then it is cached), before the model; a task that cannot
    load is named in one line."""
    for name in names:
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise EvaluationError(f"unknown task '{name}'{hint} (`lm-eval ls tasks` lists them)")
    for name in names:
        try:
            manager.load([name])
        except Exception as e:  # noqa: BLE001 - datasets raises many kinds; each becomes one line
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise EvaluationError(
                f"task {name}'s data could not be loaded ({type(e).__name__}: {reason}); fetch it once with "
                "network access (it is cached under HF_HOME), or unset HF_DATASETS_OFFLINE"
            ) from None


def load_gpt(checkpoint, meta, device):
    """The checkpoint's model on `device`, in one process, and its tokenizer."""
    saved = meta["config"]
    cfg = TrainConfig(**{k: saved.get(k, KEYS[k].default) for k in SHAPE_KEYS})
    with torch.device("meta"):
        model = GPT(gpt_config(cfg))
    model.to_empty(device=device)
    model.init_weights(0)  # the buffers (rotary tables); the checkpoint overwrites every weight
    load_model(checkpoint, model)
    return model, TOKENIZERS[cfg.tokenizer]


def metrics_of(results):
    """{task: {metric: value}} from lm-eval's results, without its filter suffix (`acc,none`)."""
    return {
        task: {
            key.split(",")[0]: value
            for key, value in values.items()
            if "," in key and isinstance(value, (int, float))
        }
        for task, values in results["results"].items()
    }


def main(argv=None):
    """Command-line entry point; returns the results written."""
    args = parse_args(argv)
    require_lm_eval()
    checkpoint, meta = resolve_checkpoint(args.checkpoint)
    output = args.output or evaluation_path(checkpoint.parent.parent, meta["step"])
    if args.output is None and checkpoint.parent.name != "checkpoints":
        raise EvaluationError(f"checkpoint {checkpoint} is not in a run folder; pass --output")
    device = pick_device(args.device)
    manager = task_manager(args.include_path)
    check_tasks(args.task_names, manager)

    import lm_eval

    from scripts.lm_eval_adapter import GPTLM

    model, tokenizer = load_gpt(checkpoint, meta, device)
    lm = GPTLM(model, tokenizer, args.batch_size, bf16_autocast(args.precision, device))
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=args.task_names,
        task_manager=manager,
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        log_samples=False,
        bootstrap_iters=1000,
    )
    record = {
        "checkpoint": str(checkpoint),
        "step": meta["step"],
        "tasks": metrics_of(results),
        "samples": {task: n["effective"] for task, n in results.get("n-samples", {}).items()},
        "num_fewshot": args.num_fewshot,
        "limit": args.limit,
        "lm_eval": lm_eval.__version__,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=1) + "\n")
    for task, values in record["tasks"].items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in values.items() if not k.endswith("_stderr"))
        print(f"{task}: {shown}")
    print(f"wrote {output}")
    return record


if __name__ == "__main__":
    try:
        main()
    except (EvaluationError, CheckpointError, ConfigError, DeviceError) as e:
        sys.exit(f"error: {e}")
