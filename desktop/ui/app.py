"""Start the desktop app: ``run_gui()`` (``hediff gui``, or ``python -m hediff.desktop.ui.app``)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

APP_NAME = "HE-Diffusion"


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="hediff gui", description="the HE-Diffusion desktop app")
    parser.add_argument("--data-dir", type=Path, default=None, help="settings, keys and gallery (default: per user)")
    parser.add_argument("--screenshot", type=Path, default=None, help="save the window as PNG once it is up, then quit")
    return parser.parse_known_args(argv)


def display_problem(env=None, platform: str = sys.platform) -> str | None:
    """Why Qt could not open a window here, before Qt aborts the process over it."""
    env = os.environ if env is None else env
    if not platform.startswith("linux") or env.get("QT_QPA_PLATFORM"):
        return None
    if env.get("DISPLAY") or env.get("WAYLAND_DISPLAY"):
        return None
    return (
        "no display found (neither DISPLAY nor WAYLAND_DISPLAY is set); run it in a desktop session, "
        "or set QT_QPA_PLATFORM=offscreen to run without one"
    )


# the xcb platform plugin of Qt 6 loads these at start and aborts the process when one is missing
XCB_LIBRARIES = {"xcb-cursor": "libxcb-cursor0", "xcb-icccm": "libxcb-icccm4", "xcb-keysyms": "libxcb-keysyms1"}


def missing_system_libraries(
    env=None, platform: str = sys.platform, find_library: Callable[[str], str | None] | None = None
) -> str | None:
    """The apt line that installs the X11 libraries Qt needs but this machine lacks, before Qt aborts over them."""
    env = os.environ if env is None else env
    if not platform.startswith("linux") or env.get("QT_QPA_PLATFORM", "xcb") != "xcb":
        return None  # offscreen, wayland: the xcb plugin is not loaded
    if find_library is None:
        import ctypes.util

        find_library = ctypes.util.find_library
    missing = [package for name, package in XCB_LIBRARIES.items() if not find_library(name)]
    if not missing:
        return None
    return f"the desktop app needs {', '.join(missing)}; install with: sudo apt-get install {' '.join(missing)}"


def run_gui(argv: list[str] | None = None, services=None) -> int:
    """Open the main window and run the event loop; returns the exit code.

    ``argv``: like ``sys.argv`` (the default): the program name, then ``--data-dir DIR`` and Qt's own options.
    ``services``: an AppServices to use instead of building one (``--data-dir`` is ignored then).
    """
    argv = list(sys.argv if argv is None else argv) or ["hediff"]
    args, qt_args = _parse(argv[1:])
    problem = display_problem() or missing_system_libraries()
    if problem:
        print(f"hediff gui: {problem}", file=sys.stderr)
        return 2

    from PySide6.QtWidgets import QApplication, QMessageBox

    app = QApplication.instance() or QApplication([argv[0], *qt_args])
    app.setApplicationName("hediff")
    app.setApplicationDisplayName(APP_NAME)
    app.setOrganizationName("hediff")

    if services is None:
        try:
            from hediff.desktop.core.services import AppServices

            services = AppServices(data_dir=args.data_dir)
        except Exception as e:  # noqa: BLE001 - nothing works without settings and keys: say why, stop
            log.error("could not start: %s", type(e).__name__)
            QMessageBox.critical(None, APP_NAME, f"HE-Diffusion could not start:\n\n{e}")
            return 1

    from hediff.desktop.ui.main_window import MainWindow

    window = MainWindow(services)
    app.aboutToQuit.connect(window.shutdown)
    window.show()
    if args.screenshot is not None:  # a check that the app comes up (e.g. from a bundle), with evidence
        from PySide6.QtCore import QTimer

        def shoot() -> None:
            window.grab().save(str(args.screenshot))
            window.close()

        QTimer.singleShot(1500, shoot)
    try:
        return int(app.exec())
    finally:
        window.shutdown()


if __name__ == "__main__":
    sys.exit(run_gui())
