"""Results files: what a script printed, written to markdown under the line that says what made
it (the command, the commit, the machine and the date). The docs link these files and never
copy a measured figure by hand; a file is rewritten by rerunning its command."""

import contextlib
import datetime
import io
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from optimizers.matrix_optimizer import native_bf16

REPO = Path(__file__).resolve().parents[1]


def _git(*args):
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()


# What the scripts write: a rewritten results file or figure is no change to the code measured.
OUTPUTS = ("docs/results", "docs/figures")


def commit():
    """The checkout's short commit, with "+changes" when tracked files other than the scripts'
    outputs differ from it."""
    changed = _git("status", "--porcelain", "--untracked-files=no", "--", ".", *(f":!{o}" for o in OUTPUTS))
    return (_git("rev-parse", "--short", "HEAD") or "unknown") + ("+changes" if changed else "")


def cpu_name():
    """The CPU's model name, its cores, its widest vector instructions as torch uses them, and
    whether it multiplies bf16 natively (which sets Newton-Schulz's default dtype)."""
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), name)
    bf16 = "native bf16" if native_bf16(torch.device("cpu")) else "no native bf16"
    return f"{name}, {os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()}, {bf16}"


def machine(device):
    """The processor that ran the measurement: the GPU's name on CUDA, else the CPU's."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}, torch {torch.__version__})"
    return f"{cpu_name()} (torch {torch.__version__})"


class _Tee(io.TextIOBase):
    """Writes to a stream and keeps a copy."""

    def __init__(self, stream):
        self.stream, self.copy = stream, io.StringIO()

    def write(self, text):
        self.copy.write(text)
        return self.stream.write(text)

    def flush(self):
        self.stream.flush()


@contextlib.contextmanager
def results_file(path, script, argv, device, note="", markdown=False):
    """Inside the block, what is printed also goes to the results file `path` (None: no file),
    written when the block ends under the line naming `script` run with `argv` (the command
    line after the script's name), the commit, the machine of `device` (None for figures that
    no machine measured: a plan, a count) and the date. `note` follows that line (what kind of
    figures they are). Printed text is kept as it looks, in a code block, unless it is
    `markdown` already."""
    if path is None:
        yield
        return
    tee = _Tee(sys.stdout)
    with contextlib.redirect_stdout(tee):
        yield
    command = " ".join(["python", f"scripts/{script}", *argv])
    where = f" on {machine(device)}," if device is not None else ","
    after = f" {note}" if note else ""
    header = f"Written by `{command}` at commit {commit()}{where} {datetime.date.today()}.{after}\n\n"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    text = tee.copy.getvalue()
    Path(path).write_text(header + (text if markdown else f"```\n{text}```\n"))
