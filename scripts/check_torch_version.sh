#!/usr/bin/env bash
# Run the test suite under another torch release, in a venv of its own:
#
#     bash scripts/check_torch_version.sh 2.11.0 [--python 3.12] [pytest args...]
#
# The GPU image we borrow has torch 2.11 (with triton 3.6) on Python 3.12 and installs nothing,
# so the code must work there as well as on the torch and Python that requirements.txt and CI
# use. `--python X.Y` builds the venv with pythonX.Y (default: python3). The venv lives in
# .venvs/torch-VERSION-pyX.Y and is reused on later runs.
set -euo pipefail
usage="usage: bash scripts/check_torch_version.sh TORCH_VERSION [--python X.Y] [pytest args...]"
version="${1:?$usage}"
shift
python="python3"
if [ "${1:-}" = "--python" ]; then
    python="python${2:?$usage}"
    shift 2
fi
# A pyenv shim exists for every installed version but runs only the active ones
# (PYENV_VERSION=3.11.7:3.12.1 makes both active).
"$python" -c "" 2>/dev/null || { echo "check_torch_version: $python does not run here; $usage" >&2; exit 2; }
cd "$(dirname "$0")/.."
venv=".venvs/torch-$version-py$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
# Everything requirements.txt pins, except torch and the packages whose version follows it:
# triton comes as torch's own dependency (3.6 for torch 2.11), and numpy stays below 2.4,
# since Triton 3.6's interpreter (TRITON_INTERPRET=1, as the tests run it) fails under numpy
# 2.4 with "only 0-dimensional arrays can be converted to Python scalars".
others=$(grep -vE '^(torch|triton|numpy)[=<> ;]' requirements-dev.txt requirements.txt requirements-eval.txt | grep -vE '^[^:]*:(-r |#|$)' | cut -d: -f2-)
# shellcheck disable=SC2086
"$venv/bin/python" -m pip install -q "torch==$version" "numpy<2.4" $others
"$venv/bin/python" -c "import sys, torch, triton, numpy; print(f'Python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}, numpy {numpy.__version__}')"
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline "$venv/bin/python" -m pytest "$@"
