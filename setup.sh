#!/usr/bin/env bash
# Creates .venv and installs surgery into it, every package at the version CI passed with
# (requirements/lock.txt, as pip constraints). On a machine without torch, the CPU build torch==2.13.0
# goes in first so that no CUDA wheels are pulled in by the other requirements.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
if ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q "torch==2.13.0"
fi
python -m pip install -q -c requirements/lock.txt -e ".[test,eval]"
