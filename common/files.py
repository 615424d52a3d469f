"""Writing private files safely: atomic, 0600 from the first byte, never through a symlink, one writer at a time.

Shared by the backend (token store) and the desktop app (settings, wrapped keys, gallery); no Qt, no web.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


class UnsafePathError(OSError):
    """The target is a symlink (or not a regular file): writing would land somewhere the caller did not name."""


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``<path>.lock`` (0600): concurrent read-modify-write cycles take turns.

    On systems without ``fcntl`` the lock is a no-op; the write itself is still atomic.
    """
    path = Path(path)
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o600)
    try:
        try:
            import fcntl
        except ImportError:  # Windows
            yield
            return
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` atomically: a fresh temp file in the same folder (created 0600 with
    O_EXCL | O_NOFOLLOW, so its bytes are never readable by others, not even briefly), fsync, chmod to ``mode``,
    rename, fsync of the folder.

    Refuses (UnsafePathError) when ``path`` is a symlink: a planted link must not redirect a secret elsewhere.
    """
    path = Path(path)
    if path.is_symlink():
        raise UnsafePathError(f"{path} is a symbolic link; refusing to write through it (remove the link)")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | getattr(os, "O_BINARY", 0)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, flags, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if os.name == "posix":
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if os.name == "posix":
        try:
            dir_fd = os.open(path.parent, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(dir_fd)
        except OSError:
            pass
        finally:
            os.close(dir_fd)


def read_regular(path: Path, max_bytes: int) -> bytes:
    """The bytes of a regular file opened without following a symlink, refused when larger than ``max_bytes``."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafePathError(f"{path} is a symbolic link; refusing to read through it (remove the link)") from None
        raise
    with os.fdopen(fd, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"{path} is larger than {max_bytes} bytes; it is not a file this program wrote")
    return data
