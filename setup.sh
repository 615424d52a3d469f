#!/usr/bin/env bash
# Sets up .venv in the repository root: a pinned torch first (CPU build here; set HEDIFF_TORCH to override,
# e.g. HEDIFF_TORCH="torch==2.13.0 --index-url <your CUDA wheel index>" on a GPU server), then the project.
#   ./setup.sh          the client (CLI, Python API, desktop app) and the backend
#   ./setup.sh --test   plus the test dependencies
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${HEDIFF_TORCH:-torch==2.13.0}"
EXTRAS="[gui]"
[[ "${1:-}" == "--test" ]] && EXTRAS="[gui,test]"

if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
# shellcheck disable=SC2086
.venv/bin/python -m pip install -q --disable-pip-version-check $TORCH_SPEC
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${EXTRAS}"
.venv/bin/python -c "import torch, tenseal, diffusers; print('hediff set-up ok: torch', torch.__version__, '| diffusers', diffusers.__version__, '| tenseal', tenseal.__version__)"
