#!/usr/bin/env bash
# Builds a one-folder desktop bundle of HE-Diffusion with PyInstaller for the OS it runs on
# (Linux here; the same command on macOS or Windows under Git Bash builds theirs; see packaging/README.md).
#   packaging/build_bundle.sh            -> dist/hediff/hediff (run it, or `hediff generate ...`)
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -x .venv/bin/python ]] || ./setup.sh
PY=.venv/bin/python
[[ -x .venv/Scripts/python.exe ]] && PY=.venv/Scripts/python.exe
"$PY" -m pip install -q --disable-pip-version-check "pyinstaller>=6.10"
"$PY" -m PyInstaller --noconfirm --clean --onedir --name hediff \
  --distpath dist --workpath build/pyinstaller --specpath build/pyinstaller \
  --collect-all tenseal --collect-all diffusers --collect-data transformers \
  --collect-submodules transformers.models.clip \
  --copy-metadata torch --copy-metadata diffusers --copy-metadata transformers --copy-metadata tokenizers \
  --copy-metadata safetensors --copy-metadata huggingface_hub --copy-metadata numpy --copy-metadata tqdm \
  --copy-metadata regex --copy-metadata requests --copy-metadata filelock --copy-metadata pyyaml \
  --hidden-import keyring.backends.SecretService --hidden-import keyring.backends.macOS \
  --hidden-import keyring.backends.Windows --hidden-import uvicorn.logging --hidden-import uvicorn.loops.auto \
  --hidden-import uvicorn.protocols.http.auto --hidden-import uvicorn.lifespan.on \
  --add-data "$PWD/assets/embedded:hediff/assets/embedded" --add-data "$PWD/desktop/core/data:hediff/desktop/core/data" \
  "$PWD/packaging/hediff_entry.py"
echo "bundle: dist/hediff/ ($(du -sh dist/hediff | cut -f1))"
