"""Where the desktop app keeps its per-user data (settings, wrapped device keys, the gallery). Qt-free."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

from hediff.common.files import atomic_write  # noqa: F401 - re-exported: the one implementation lives in common

APP_DIR_NAME = "hediff"
DATA_DIR_ENV = "HEDIFF_DATA_DIR"


def default_data_dir() -> Path:
    """``$HEDIFF_DATA_DIR``, else the platform's per-user application data folder (platformdirs): on Linux
    ``$XDG_DATA_HOME/hediff`` (default ``~/.local/share/hediff``), on macOS ``~/Library/Application Support/hediff``,
    on Windows ``%APPDATA%\\hediff``. Nothing is created here."""
    override = os.environ.get(DATA_DIR_ENV, "").strip()
    if override:
        return Path(override).expanduser()
    return platformdirs.user_data_path(APP_DIR_NAME, appauthor=False, roaming=True)


def ensure_private_dir(path: Path, tighten_existing: bool = False) -> Path:
    """Create ``path`` (and parents) if needed; a folder made here is readable by this user only (0700).

    ``tighten_existing``: also restrict an existing folder (for folders the app owns outright, such as ``keys``;
    never for a data folder the user may have pointed at something shared).
    """
    path = Path(path)
    existed = path.is_dir()
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if os.name == "posix" and (tighten_existing or not existed):
        try:
            os.chmod(path, 0o700)
        except OSError:  # not ours to change; the files themselves are still 0600
            pass
    return path
