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

# The GUI tests run Qt offscreen, which still links these system libraries (Debian/Ubuntu names); the Ray Serve
# tests start a real redis-server. Tests must fail, not skip, when these are missing, so --test installs them.
TEST_APT_PACKAGES=(libegl1 libgl1 libfontconfig1 libxkbcommon0 libglib2.0-0 libdbus-1-3 redis-server)
if [[ "${1:-}" == "--test" ]] && command -v apt-get >/dev/null && command -v dpkg-query >/dev/null; then
  missing=()
  for pkg in "${TEST_APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
  done
  if (( ${#missing[@]} )); then
    SUDO=""
    [[ $(id -u) -ne 0 ]] && SUDO=sudo
    $SUDO apt-get update -q
    $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
fi

if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
# shellcheck disable=SC2086
.venv/bin/python -m pip install -q --disable-pip-version-check $TORCH_SPEC
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${EXTRAS}"
.venv/bin/python -c "import torch, tenseal, diffusers; print('hediff set-up ok: torch', torch.__version__, '| diffusers', diffusers.__version__, '| tenseal', tenseal.__version__)"
