"""Per-step metrics: a JSONL file in the run folder and, when asked for, Weights & Biases."""

import json
import math
import uuid
from pathlib import Path


class MetricsLogger:
    """Appends one JSON record per step to runs/<run>/metrics.jsonl and mirrors it to wandb.

    On resume from `resume_step`, records past that step (written before a crash) are
    dropped first, so the file holds exactly one record per step.
    """

    def __init__(self, run_dir, cfg, resume_step=None, wandb_id=None):
        self.path = Path(run_dir) / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line and json.loads(line)["step"] <= resume_step
            ]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(self.path)
        elif resume_step is None:
            self.path.unlink(missing_ok=True)
        self.file = self.path.open("a")
        self.wandb_run = None
        self.wandb_id = wandb_id or uuid.uuid4().hex[:8]
        if cfg.wandb_project:
            import wandb  # lazy: training never needs wandb unless it is asked for

            self.wandb_run = wandb.init(
                project=cfg.wandb_project,
                name=cfg.run_name,
                id=self.wandb_id,
                resume="allow",
                config=vars(cfg),
                dir=str(run_dir),
            )

    def log(self, record):
        """Write one step's record; `record["step"]` is the number of completed steps. A NaN or
        inf is written as null (bare NaN is not JSON); the record's `nonfinite` names it."""
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        self.file.write(json.dumps(record, allow_nan=False) + "\n")
        self.file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(record, step=record["step"])

    def close(self):
        """Flush and close the file and the wandb run."""
        self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def read_metrics(run_dir):
    """The records of a run's metrics.jsonl, in order."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line]
