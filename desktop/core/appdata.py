"""Where the desktop app keeps its per-user data (settings, wrapped device keys, the gallery). Qt-free."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

from hediff.common.files import atomic_write  # noqa: F401 - re-exported: the one implementation lives in common

APP_DIR_NAME = "hediff"
DATA_DIR_ENV = "HEDIFF_DATA_DIR"


def default_data_dir(
    *, env: Mapping[str, str] | None = None, platform: str | None = None, home: Path | None = None
) -> Path:
    """``$HEDIFF_DATA_DIR``, else the platform's per-user application data folder.

    Linux and other Unixes: ``$XDG_DATA_HOME/hediff`` (default ``~/.local/share/hediff``); macOS:
    ``~/Library/Application Support/hediff``; Windows: ``%APPDATA%\\hediff``. Nothing is created here.
    ``env``, ``platform`` and ``home`` are for tests (default: ``os.environ``, ``sys.platform``, ``Path.home()``).
    """
    env = os.environ if env is None else env
    platform = sys.platform if platform is None else platform
    override = env.get(DATA_DIR_ENV, "").strip()
    if override:
        return Path(override).expanduser()
    home = Path.home() if home is None else home
    if platform.startswith("win"):
        appdata = env.get("APPDATA", "").strip()
        return (Path(appdata) if appdata else home / "AppData" / "Roaming") / APP_DIR_NAME
    if platform == "darwin":
        return home / "Library" / "Application Support" / APP_DIR_NAME
    xdg = env.get("XDG_DATA_HOME", "").strip()
    # the XDG spec says relative paths are invalid and must be ignored
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else home / ".local" / "share"
    return base / APP_DIR_NAME


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
