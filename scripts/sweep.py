"""Run a grid of train.py runs described by a sweep file: here, or as Slurm jobs.

    python scripts/sweep.py configs/sweeps/repro_cpu.yaml              # every point, in turn
    python scripts/sweep.py configs/sweeps/repro_cpu.yaml --parallel 2 # two points at once
    python scripts/sweep.py configs/sweeps/paper_304m.yaml --launcher slurm \\
        --gpus_per_run 8 --partition gpu --time 1440                   # one Slurm job a point
    python scripts/sweep.py configs/sweeps/paper_304m.yaml --status    # each point's state
    python scripts/sweep.py configs/sweeps/paper_304m.yaml --evaluate hellaswag,arc_easy,piqa

A sweep file has three keys:

    base: configs/repro_cpu.yaml       # a train.py config, relative to the repository root
    overrides: {num_iterations: 200}   # keys set for every point
    grid: {ortho_fraction: [0.5, 0.25], selection: [l1, random]}

The points are the product of the grid's lists. `grid` may also be a list of such mappings;
the points are then the union of their products, so that one file can hold Muon next to a
Dion2 fraction sweep. Each point is the run runs/<sweep>/<key=value,...>, named by its grid
values. Running the sweep again, with either launcher, skips finished points and resumes
interrupted ones from their newest checkpoint; a point whose folder holds a run of another
config is refused. The launchers are in scripts/sweep_launchers.py.

With `--evaluate TASKS`, every finished point whose newest checkpoint has no evaluation yet is
scored by scripts/evaluate.py (lm-eval; `--evaluate_args` passes it more options), here after
the training, or inside each Slurm job.
"""

import argparse
import itertools
import shlex
import signal
import sys
from pathlib import Path

import yaml

from scripts import evaluate
from scripts.run_records import load_evaluation
from scripts.sweep_launchers import (
    REPO,
    LaunchError,
    command,
    device_slots,
    evaluate_run,
    job_state,
    needs_evaluation,
    read_launch,
    run_parallel,
    submit,
)
from training.checkpoint import list_checkpoints
from training.config import KEYS, ConfigError, foreign_keys, load_config, to_dict
from training.metrics import read_metrics

# REPO, sweep_launchers': the checkout whose train.py the launchers run. The sweep reads its
# configs and runs there too, even where `scripts` comes from another checkout's editable install.
SWEEP_KEYS = ("base", "overrides", "grid")
# The sweep names and places every run, and resumes it when asked to: a sweep file sets none of these.
OWNED_KEYS = ("run_name", "runs_dir", "resume")
LAUNCHERS = ("local", "slurm")
SLURM_OPTIONS = (
    "gpus_per_run",
    "gpus_per_node",
    "cpus_per_task",
    "time",
    "partition",
    "account",
    "constraint",
)
# Slurm's states of a job that is queued or running.
SLURM_ACTIVE = ("pending", "running", "requeued", "configuring", "completing", "resizing", "suspended")


class SweepError(ValueError):
    """A sweep file or a runs folder that the sweep cannot use."""


def yaml_text(value):
    """A config value spelled as YAML, as train.py reads it back from the command line."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def point_name(point):
    """The run name of a grid point: its keys and values, in grid order, with no path separator."""
    return ",".join(f"{k}={yaml_text(v).replace('/', '_')}" for k, v in point.items())


def _mapping(value, what, source):
    if not isinstance(value, dict):
        raise SweepError(f"{source}: {what} must be a mapping, got {value!r}")
    return value


def grid_points(grid, source):
    """The points of `grid` (a mapping of lists, or a list of them), in order, without repeats."""
    grids = grid if isinstance(grid, list) else [grid]
    points, seen = [], set()
    for sub in grids:
        _mapping(sub, "each grid", source)
        for key, values in sub.items():
            if not isinstance(values, list) or not values:
                raise SweepError(f"{source}: grid key {key} must map to a non-empty list, got {values!r}")
        for combo in itertools.product(*sub.values()):
            point = dict(zip(sub, combo, strict=True))
            if (name := point_name(point)) not in seen:
                seen.add(name)
                points.append(point)
    return points


def _flags(values):
    # train.py keeps a string key's text as typed, so strings go unquoted.
    texts = {k: v if isinstance(v, str) else yaml_text(v) for k, v in values.items()}
    return [item for key, text in texts.items() for item in (f"--{key}", text)]


def _from_repo(path):
    """`path` relative to the repository root when it lies inside it: the runs start there."""
    path = Path(path).resolve()
    return path.relative_to(REPO) if path.is_relative_to(REPO) else path


def load_sweep(path, runs_root):
    """Read and check a sweep file; return its runs folder and [(name, train.py argv, config)].

    Paths are relative to the repository root (or absolute), where train.py runs. Every
    point's config is built and validated here, before anything runs.
    """
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {path} does not exist")
    try:
        sweep = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SweepError(f"sweep file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    _mapping(sweep, "the sweep file", path)
    unknown = [k for k in sweep if k not in SWEEP_KEYS]
    if unknown:
        raise SweepError(f"{path}: unknown key '{unknown[0]}'; a sweep file has {', '.join(SWEEP_KEYS)}")
    if "base" not in sweep or not isinstance(sweep["base"], str):
        raise SweepError(f"{path}: base must name a config file, got {sweep.get('base')!r}")
    base = _from_repo(REPO / sweep["base"])
    if not (REPO / base).is_file():
        raise SweepError(f"{path}: base config {sweep['base']} does not exist")
    overrides = _mapping(sweep.get("overrides") or {}, "overrides", path)
    points = grid_points(sweep.get("grid") or {}, path)
    for key in OWNED_KEYS:
        if key in overrides or any(key in p for p in points):
            raise SweepError(f"{path}: {key} is set by the sweep itself and cannot be swept or overridden")
    runs_dir = _from_repo(Path(runs_root).resolve() / path.stem)
    try:
        base_cfg = load_config(["--config", str(REPO / base)])
    except ConfigError as e:
        raise SweepError(f"{path}: base {e}") from None
    runs = []
    for point in points:
        name = point_name(point) or path.stem
        values = {**overrides, **point}
        # A point that swaps the base's optimizer leaves the base's keys of the old one at
        # their defaults, where the new one does not read them (Muon in a Dion2 sweep).
        optimizer = values.get("optimizer", base_cfg.optimizer)
        resets = {k: KEYS[k].default for k in foreign_keys(base_cfg, optimizer) if k not in values}
        flags = [*_flags({**overrides, **resets, **point}), "--runs_dir", str(runs_dir), "--run_name", name]
        try:
            cfg = load_config(["--config", str(REPO / base), *flags, "--resume", "auto"])
        except ConfigError as e:
            raise SweepError(f"{path}: point {name}: {e}") from None
        runs.append((name, ["--config", str(base), *flags, "--resume", "auto"], cfg))
    return runs_dir, runs


def read_records(run_dir):
    """The metric records a run has written so far ([] if none)."""
    return read_metrics(run_dir) if (Path(run_dir) / "metrics.jsonl").is_file() else []


def last_val_loss(records):
    """The run's latest validation loss (None before its first evaluation)."""
    return next((r["val_loss"] for r in reversed(records) if "val_loss" in r), None)


def finished(records, cfg):
    """Whether a run's records reach its last step."""
    return bool(records) and records[-1]["step"] == cfg.num_iterations


def run_state(run_dir, cfg):
    """'done', 'resume' (has a checkpoint) or 'new'; refuses a folder holding another config's run."""
    saved = Path(run_dir) / "config.yaml"
    if saved.is_file():
        old, new = yaml.safe_load(saved.read_text()), to_dict(cfg)
        changed = [k for k in new if k not in OWNED_KEYS and old.get(k) != new[k]]
        if changed:
            key = changed[0]
            raise SweepError(
                f"{run_dir} holds a run with {key} {old.get(key)!r} but the sweep asks for {new[key]!r}; "
                "remove that folder or pass another --runs_dir"
            )
    if finished(read_records(run_dir), cfg):
        return "done"
    return "resume" if list_checkpoints(run_dir) else "new"


def _exit_on_sigterm(signum, frame):
    sys.exit(128 + signum)


def summary(runs_dir, runs, outcome):
    """The table printed at the end: final val loss, tokens and training time per point."""
    width = max(len(name) for name, _, _ in runs)
    lines = [f"{'run':<{width}}  {'status':<8} {'val_loss':>9} {'tokens':>12} {'train s':>8}"]
    for name, _, _ in runs:
        records = read_records(REPO / runs_dir / name)
        val = last_val_loss(records)
        val = f"{val:.4f}" if val is not None else "-"
        tokens = f"{records[-1]['tokens']:,}" if records else "-"
        seconds = f"{sum(r['step_time'] for r in records):.0f}" if records else "-"
        lines.append(f"{name:<{width}}  {outcome[name]:<8} {val:>9} {tokens:>12} {seconds:>8}")
    return "\n".join(lines)


def parse_args(argv):
    """The sweep's command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sweep", type=Path, help="the sweep file (YAML: base, overrides, grid)")
    parser.add_argument(
        "--runs_dir", type=Path, default=Path("runs"), help="runs go to RUNS_DIR/<sweep name>/"
    )
    parser.add_argument(
        "--gpus_per_run", type=int, default=1, help="processes of each run, one per GPU (torchrun)"
    )
    parser.add_argument(
        "--parallel",
        type=int,
        default=1,
        help="runs at once on this machine, each on its own GPUs (or its share of the CPU cores)",
    )
    parser.add_argument("--launcher", choices=LAUNCHERS, default="local", help="where the runs go")
    parser.add_argument("--status", action="store_true", help="print each point's state, step and loss")
    parser.add_argument("--dry-run", action="store_true", help="print the torchrun commands, run nothing")
    parser.add_argument("--evaluate", metavar="TASKS", help="score finished points on these lm-eval tasks")
    parser.add_argument(
        "--evaluate_args",
        default="",
        help="more options of evaluate.py, such as '--limit 500 --batch_size 32'",
    )
    slurm = parser.add_argument_group("--launcher slurm (through submitit)")
    slurm.add_argument("--partition", help="Slurm partition")
    slurm.add_argument("--account", help="Slurm account")
    slurm.add_argument("--constraint", help="Slurm node constraint, such as h100")
    slurm.add_argument("--time", type=int, default=24 * 60, help="time limit of each job, in minutes")
    slurm.add_argument("--gpus_per_node", type=int, default=8, help="GPUs of one node")
    slurm.add_argument("--cpus_per_task", type=int, default=32, help="CPU cores of each node's task")
    slurm.add_argument(
        "--submitit_cluster",
        choices=("slurm", "local", "debug"),
        default="slurm",
        help="submitit's backend: slurm, or local/debug to try the jobs on this machine",
    )
    args = parser.parse_args(argv)
    for name in ("gpus_per_run", "parallel", "time", "gpus_per_node", "cpus_per_task"):
        if getattr(args, name) < 1:
            raise SweepError(f"--{name} must be >= 1, got {getattr(args, name)}")
    args.evaluate_argv = None
    if args.evaluate is not None:
        args.evaluate_argv = ["--tasks", args.evaluate, *shlex.split(args.evaluate_args)]
        # evaluate.py's own checks, here before any run: its options, and lm-eval installed.
        try:
            evaluate.parse_args(["--checkpoint", ".", *args.evaluate_argv])
        except SystemExit:
            raise SweepError(
                f"--evaluate_args '{args.evaluate_args}' holds options evaluate.py refuses"
            ) from None
        evaluate.require_lm_eval()
    elif args.evaluate_args:
        raise SweepError("--evaluate_args is read only with --evaluate TASKS")
    return args


def status(runs_dir, runs):
    """The table of `--status`: each point's state, step, last train and val loss, and its launch."""
    width = max(len(name) for name, _, _ in runs)
    lines = [f"{'run':<{width}}  {'state':<8} {'step':>11} {'train_loss':>10} {'val_loss':>9}  launch"]
    for name, _, cfg in runs:
        run_dir = REPO / runs_dir / name
        records = read_records(run_dir)
        launch = read_launch(run_dir)
        job = job_state(launch)
        if finished(records, cfg):
            state = "done"
        elif job in SLURM_ACTIVE:  # "running" is a local run's word too
            state = "running"
        else:
            state = "stopped" if records else "new"
        step = f"{records[-1]['step'] if records else 0}/{cfg.num_iterations}"
        train = next((r["train_loss"] for r in reversed(records) if r.get("train_loss") is not None), None)
        val = last_val_loss(records)
        where = (
            "-"
            if launch is None
            else f"{launch['launcher']} {launch.get('job_id', launch.get('pid'))}: {job}"
        )
        lines.append(f"{name:<{width}}  {state:<8} {step:>11} {_loss(train):>10} {_loss(val):>9}  {where}")
    return "\n".join(lines)


def _loss(value):
    return "-" if value is None else f"{value:.4f}"


def main(argv=None):
    """Command-line entry point; returns the exit status (1 if any point failed)."""
    args = parse_args(argv)
    runs_dir, runs = load_sweep(args.sweep, args.runs_dir)
    if args.status:
        print(status(runs_dir, runs))
        return 0
    states = {name: run_state(REPO / runs_dir / name, cfg) for name, _, cfg in runs}
    todo = [(name, argv, cfg) for name, argv, cfg in runs if states[name] != "done"]
    unscored = [
        name
        for name, _, _ in runs
        if args.evaluate_argv is not None
        and states[name] == "done"
        and needs_evaluation(REPO / runs_dir / name)
    ]

    if args.dry_run:
        for name, argv, _ in runs:
            if states[name] == "done":
                print(f"# {name}: finished")
                continue
            print(
                shlex.join(
                    ["torchrun", "--standalone", f"--nproc_per_node={args.gpus_per_run}", "train.py", *argv]
                )
            )
        return 0
    if args.launcher == "slurm":
        for name, _, _ in runs:
            if states[name] == "done":
                print(f"{name}: finished before, " + ("to be scored" if name in unscored else "skipped"))
        todo = [point for point in runs if point[0] in unscored or states[point[0]] != "done"]
        options = {k: getattr(args, k) for k in SLURM_OPTIONS}
        folder = REPO / runs_dir / "submitit"
        jobs = submit(
            [(n, REPO / runs_dir / n, a, c.num_iterations) for n, a, c in todo],
            folder,
            args.submitit_cluster,
            options,
            args.evaluate_argv,
        )
        for (name, _, _), job in zip(todo, jobs, strict=True):
            print(f"{name}: submitted as job {job.job_id}")
        print(f"{len(jobs)} jobs; their logs are in {folder}; `--status` follows them")
        return 0

    slots = device_slots(args.parallel, args.gpus_per_run)
    number = {name: i for i, (name, _, _) in enumerate(runs, 1)}
    outcome = {name: "skipped" for name, _, _ in runs if states[name] == "done"}
    for name in outcome:
        print(f"[{number[name]}/{len(runs)}] {name}: finished before, skipped", flush=True)
    cfgs = {name: cfg for name, _, cfg in runs}

    def report(name, event, seconds, rc=None):
        prefix = f"[{number[name]}/{len(runs)}] {name}:"
        run_dir = REPO / runs_dir / name
        if event == "start":
            checkpoints = list_checkpoints(run_dir)
            resumed = f" (resuming from {checkpoints[-1].name})" if checkpoints else ""
            print(f"{prefix} running{resumed}, log in {run_dir / 'train.log'}", flush=True)
            return
        records = read_records(run_dir)
        # The records decide, not the exit code: a gloo rank rarely aborts at exit after its work.
        if finished(records, cfgs[name]):
            outcome[name] = "done"
            note = f" (exit {rc})" if rc else ""
            val = last_val_loss(records)  # the last step is always evaluated
            print(f"{prefix} done in {seconds:.0f} s, val_loss {val:.4f}{note}", flush=True)
            if args.evaluate_argv is not None:
                unscored.append(name)
        else:
            outcome[name] = "failed"
            last = (run_dir / "train.log").read_text().strip().splitlines()[-1:] or [""]
            print(f"{prefix} FAILED (exit {rc}) after {seconds:.0f} s: {last[0]}", flush=True)

    run_parallel(
        [(name, REPO / runs_dir / name, command(argv, args.gpus_per_run)) for name, argv, _ in todo],
        slots,
        report,
    )
    # One at a time, after the training: an evaluation takes the whole machine.
    for name in unscored:
        run_dir = REPO / runs_dir / name
        code = evaluate_run(run_dir, args.evaluate_argv)
        prefix = f"[{number[name]}/{len(runs)}] {name}:"
        if code:
            outcome[name] = "unscored"
            last = (run_dir / "eval.log").read_text().strip().splitlines()[-1:] or [""]
            print(f"{prefix} evaluation FAILED (exit {code}): {last[0]}", flush=True)
        else:
            scores = load_evaluation(run_dir)["metrics"]
            shown = ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if not k.endswith("_stderr"))
            print(f"{prefix} evaluated: {shown}", flush=True)
    print()
    print(summary(runs_dir, runs, outcome))
    return 1 if {"failed", "unscored"} & set(outcome.values()) else 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # unwinds through train(), which stops the run
    try:
        sys.exit(main())
    except (SweepError, LaunchError, evaluate.EvaluationError) as e:
        sys.exit(f"error: {e}")
