"""How a sweep's points run: several at once on this machine, or one Slurm job each.

Both launchers start train.py the same way (`command`), always with `--resume auto`, so a
point that was stopped, preempted or requeued continues from its newest checkpoint, and a
finished one is skipped by whichever launcher comes next. Each launch leaves `launch.json` in
the point's folder: who runs it, where, and as which process or job (`sweep.py --status`).
With `--evaluate`, a finished point's newest checkpoint is then scored by scripts/evaluate.py
(`evaluation_command`), its output in the point's eval.log.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import submitit

from scripts.run_records import evaluation_path
from training.checkpoint import list_checkpoints
from training.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
LAUNCH_FILE = "launch.json"
# torchrun dies of a signal it does not handle; these it passes on to the ranks, which
# checkpoint on the ones in `preempt_signals` (Slurm's warnings come as SIGUSR1 or SIGUSR2).
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2"
# Slurm's warning (submitit's signal) comes this long before the time limit.
SIGNAL_DELAY_S = 180
# How long torchrun lets the ranks finish after passing a signal on, before it kills them (30 s
# by default). A 1B step plus its checkpoint must fit: see docs/results/plan_1b_8.md for the
# planned step and each rank's weights and state, written at 100 MB/s of shared-filesystem
# bandwidth. Set through the environment: torchrun releases without --shutdown-timeout reject
# the flag but ignore the variable.
SHUTDOWN_TIMEOUT_S = SIGNAL_DELAY_S - 10
RENDEZVOUS_PORT = 29500


class LaunchError(ValueError):
    """Launcher options that cannot work on this machine."""


def command(argv, nproc, nodes=1, node_rank=0, master=None, job_id=None):
    """The command line that trains one point: train.py itself for one process, else torchrun
    with `nproc` processes on each of `nodes` nodes (meeting at `master` over several)."""
    if nproc == 1 and nodes == 1:
        return [sys.executable, "train.py", *argv]
    if nodes == 1:
        where = ["--standalone"]
    else:
        where = [
            f"--nnodes={nodes}",
            f"--node_rank={node_rank}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint={master}:{RENDEZVOUS_PORT}",
            f"--rdzv_id={job_id}",
        ]
    return [
        "env",
        f"TORCH_ELASTIC_SHUTDOWN_TIMEOUT={SHUTDOWN_TIMEOUT_S}",
        sys.executable,
        "-m",
        "torch.distributed.run",
        *where,
        f"--nproc_per_node={nproc}",
        f"--signals-to-handle={TORCHRUN_SIGNALS}",
        "train.py",
        *argv,
    ]


def newest_step(run_dir):
    """The step of the newest checkpoint of a run (0 if none)."""
    checkpoints = list_checkpoints(run_dir)
    return int(checkpoints[-1].name.removeprefix("step_")) if checkpoints else 0


def evaluation_command(run_dir, evaluate_argv):
    """The command line that scores a run's newest checkpoint: evaluate.py with `evaluate_argv`
    (`--tasks ...` and any other of its options)."""
    return [sys.executable, "scripts/evaluate.py", "--checkpoint", str(run_dir), *evaluate_argv]


def needs_evaluation(run_dir):
    """Whether a run's newest checkpoint has no evaluation yet."""
    return not evaluation_path(run_dir, newest_step(run_dir)).is_file()


def evaluate_run(run_dir, evaluate_argv):
    """Score a run's newest checkpoint, the output appended to its eval.log; return the exit code."""
    with open(Path(run_dir) / "eval.log", "a") as log:
        return subprocess.run(
            evaluation_command(run_dir, evaluate_argv), cwd=REPO, stdout=log, stderr=subprocess.STDOUT
        ).returncode


def write_launch(run_dir, **record):
    """Record how a point was launched (`launch.json`), for `sweep.py --status`."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    record = {"host": socket.gethostname(), "started": time.time(), **record}
    (Path(run_dir) / LAUNCH_FILE).write_text(json.dumps(record) + "\n")


def read_launch(run_dir):
    """A point's launch record, or None."""
    path = Path(run_dir) / LAUNCH_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def process_alive(pid):
    """Whether a process of this machine is still running (a zombie counts as ended)."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return status.rsplit(")", 1)[1].split()[0] != "Z"


def device_slots(parallel, gpus_per_run):
    """The environment of each of `parallel` concurrent runs: disjoint CUDA devices, or on a
    machine without them, an equal share of the CPU's cores as threads of each process."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    import torch  # here, so that sweep.py --help does not load it

    if torch.cuda.is_available():
        devices = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        need = parallel * gpus_per_run
        if need > len(devices):
            raise LaunchError(
                f"--parallel {parallel} x --gpus_per_run {gpus_per_run} needs {need} GPUs, "
                f"this machine has {len(devices)}"
            )
        return [
            {"CUDA_VISIBLE_DEVICES": ",".join(devices[i * gpus_per_run : (i + 1) * gpus_per_run])}
            for i in range(parallel)
        ]
    cores = len(os.sched_getaffinity(0))
    threads = cores // (parallel * gpus_per_run)
    if threads < 1:
        raise LaunchError(
            f"--parallel {parallel} x --gpus_per_run {gpus_per_run} processes need as many cores, "
            f"this machine has {cores}"
        )
    return [{"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}] * parallel


def run_parallel(points, slots, report):
    """Run `points` [(name, run_dir, cmd)], up to len(slots) at once, each with a slot's
    environment; report(name, event, seconds) on 'start' and 'end'. If the sweep is stopped
    (Ctrl-C or SIGTERM), the runs are stopped too, so that no orphan keeps writing."""
    waiting, running, free = list(points), {}, list(range(len(slots)))
    try:
        while waiting or running:
            while waiting and free:
                name, run_dir, cmd = waiting.pop(0)
                slot = free.pop(0)
                Path(run_dir).mkdir(parents=True, exist_ok=True)
                log = open(Path(run_dir) / "train.log", "a")  # noqa: SIM115 (closed when the run ends)
                proc = subprocess.Popen(
                    cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **slots[slot]}
                )
                write_launch(run_dir, launcher="local", pid=proc.pid)
                running[name] = (proc, log, slot, time.perf_counter())
                report(name, "start", 0.0)
            time.sleep(0.1)
            for name, (proc, log, slot, start) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                free.append(slot)
                del running[name]
                report(name, "end", time.perf_counter() - start, proc.returncode)
    finally:
        for proc, log, _, _ in running.values():
            proc.terminate()
            proc.wait()
            log.close()


class PointJob:
    """One grid point as a submitit job: each task (one per node) runs torchrun on its node.

    A job whose run stops short of its end after checkpointing further is requeued: a
    preemption (SIGTERM to every process: the ranks checkpoint and exit) or a crash after a
    checkpoint. submitit's own signal (SIGUSR2 by default: Slurm's time-limit warning, or
    `job._interrupt()`) stops the run the same way first. The requeued job resumes the run
    from its checkpoint. A run that stops without progress fails the job. With `evaluate_argv`,
    the finished run is then scored on the first node (a run finished before is only scored).
    """

    def __init__(self, name, argv, run_dir, num_iterations, nproc_per_node, nodes, evaluate_argv=None):
        self.name, self.argv, self.run_dir = name, list(argv), str(run_dir)
        self.num_iterations, self.nproc_per_node, self.nodes = num_iterations, nproc_per_node, nodes
        self.evaluate_argv = evaluate_argv
        self._child = None

    def __getstate__(self):
        return {**self.__dict__, "_child": None}  # a process does not travel to the next job

    def _finished(self):
        path = Path(self.run_dir) / "metrics.jsonl"
        records = read_metrics(self.run_dir) if path.is_file() else []
        return bool(records) and records[-1]["step"] == self.num_iterations

    def __call__(self):
        env = submitit.JobEnvironment()
        start, code = newest_step(self.run_dir), 0
        if not self._finished():
            cmd = command(
                self.argv,
                self.nproc_per_node,
                self.nodes,
                env.node,
                env.hostnames[0],
                env.job_id.split("_")[0],
            )
            with open(Path(self.run_dir) / "train.log", "a") as log:
                self._child = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
                code = self._wait()
        if env.global_rank != 0:
            return code
        if self._finished():
            result = {"point": self.name, "step": self.num_iterations, "exit": code}
            if self.evaluate_argv is not None:
                result["evaluation_exit"] = evaluate_run(self.run_dir, self.evaluate_argv)
            return result
        if newest_step(self.run_dir) > start:
            # Requeue through submitit's own handler: it calls checkpoint() and requeues the job
            # wherever it runs (scontrol on Slurm, a restart on the local executor).
            signal.raise_signal(submitit.JobEnvironment._usr_sig())
        raise RuntimeError(f"{self.name}: train.py exited with {code} at step {start}, without progress")

    def _wait(self):
        # Reaped with waitpid and polled, never Popen.wait(): checkpoint() also waits from a
        # signal handler, and Popen.wait() holds a lock that the interrupted wait would keep.
        while self._child.returncode is None:
            try:
                pid, status = os.waitpid(self._child.pid, os.WNOHANG)
            except ChildProcessError:  # reaped by the other wait
                while self._child.returncode is None:
                    time.sleep(0.05)
                break
            if pid:
                self._child.returncode = os.waitstatus_to_exitcode(status)
            else:
                time.sleep(0.2)
        return self._child.returncode

    def checkpoint(self):
        """submitit's hook before a requeue: stop the run (it checkpoints its step) and resubmit."""
        if self._child is not None and self._child.returncode is None:
            self._child.send_signal(signal.SIGTERM)
            self._wait()
        return submitit.helpers.DelayedSubmission(self)


def submit(points, folder, cluster, options, evaluate_argv=None):
    """Submit one PointJob per point [(name, run_dir, argv, num_iterations)] through submitit on `cluster`
    (slurm, or local/debug to try the jobs on this machine), each scored after training with
    `evaluate_argv` when given; return the jobs."""
    gpus_per_run, gpus_per_node = options["gpus_per_run"], options["gpus_per_node"]
    nodes = -(-gpus_per_run // gpus_per_node)
    if nodes > 1 and gpus_per_run % gpus_per_node:
        raise LaunchError(
            f"--gpus_per_run {gpus_per_run} over several nodes must be a multiple of --gpus_per_node "
            f"{gpus_per_node}"
        )
    per_node = min(gpus_per_run, gpus_per_node)
    # The jobs import this module by name and run train.py from the repository.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    parameters = {
        "timeout_min": options["time"],
        "nodes": nodes,
        "tasks_per_node": 1,
        "slurm_signal_delay_s": SIGNAL_DELAY_S,
        "slurm_additional_parameters": {"requeue": True},
    }
    if cluster == "slurm":
        parameters |= {"gpus_per_node": per_node, "cpus_per_task": options["cpus_per_task"]}
        for key in ("partition", "account", "constraint"):
            if options[key]:
                parameters[f"slurm_{key}"] = options[key]
    executor.update_parameters(**parameters)
    jobs = []
    for name, run_dir, argv, num_iterations in points:
        executor.update_parameters(name=name)
        job = executor.submit(PointJob(name, argv, run_dir, num_iterations, per_node, nodes, evaluate_argv))
        write_launch(run_dir, launcher="slurm", cluster=cluster, job_id=job.job_id, folder=str(folder))
        jobs.append(job)
    return jobs


def job_state(record):
    """The launcher's word on a launch record: 'running' or 'ended' for a process of this
    machine (a local run, or a job of submitit's local executor), else Slurm's job state."""
    if record is None:
        return "-"
    if record.get("cluster", "local") != "slurm":
        if record["host"] != socket.gethostname():
            return "unknown"
        return "running" if process_alive(int(record.get("pid") or record["job_id"])) else "ended"
    try:
        return submitit.SlurmJob(record["folder"], record["job_id"]).state.lower()
    except Exception:  # noqa: BLE001 (no sacct here, or the job is forgotten: say so, not crash)
        return "unknown"
