"""Where the desktop app keeps its per-user data (settings, wrapped device keys, the gallery). Qt-free."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

from hediff.common.files import atomic_write  # noqa: F401 - re-exported: the one implementation lives in common

APP_DIR_NAME = "hediff"
DATA_DIR_ENV = "HEDIFF_DATA_DIR"


DATA_DIR_POINTER = "data-dir"  # in the per-user config folder: the data folder the user chose in Preferences


def config_dir() -> Path:
    """The per-user config folder (platformdirs): it holds only the pointer to a data folder the user chose,
    which cannot live inside the data folder itself."""
    return platformdirs.user_config_path(APP_DIR_NAME, appauthor=False, roaming=True)


def platform_data_dir() -> Path:
    return platformdirs.user_data_path(APP_DIR_NAME, appauthor=False, roaming=True)


def chosen_data_dir(config: Path | None = None) -> Path | None:
    """The data folder chosen in Preferences, or None (the platform's default applies)."""
    try:
        text = (Path(config or config_dir()) / DATA_DIR_POINTER).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return Path(text).expanduser() if text else None


def choose_data_dir(path: Path | None, config: Path | None = None) -> None:
    """Use ``path`` as the data folder from the next start on (None: back to the platform's default). The folder
    is created now (0700), so that a folder that cannot be made is refused here, not at the next start."""
    pointer = Path(config or config_dir()) / DATA_DIR_POINTER
    if path is None:
        pointer.unlink(missing_ok=True)
        return
    path = Path(path).expanduser().absolute()
    ensure_private_dir(path)
    ensure_private_dir(pointer.parent)
    atomic_write(pointer, (str(path) + "\n").encode("utf-8"), mode=0o600)


def default_data_dir(config: Path | None = None) -> Path:
    """``$HEDIFF_DATA_DIR``, else the folder chosen in Preferences, else the platform's per-user application data
    folder (platformdirs): on Linux ``$XDG_DATA_HOME/hediff`` (default ``~/.local/share/hediff``), on macOS
    ``~/Library/Application Support/hediff``, on Windows ``%APPDATA%\\hediff``. Nothing is created here."""
    override = os.environ.get(DATA_DIR_ENV, "").strip()
    if override:
        return Path(override).expanduser()
    return chosen_data_dir(config) or platform_data_dir()


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
