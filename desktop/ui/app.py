"""Start the desktop app: ``run_gui()`` (``hediff gui``, or ``python -m desktop.ui.app``)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)

APP_NAME = "HE-Diffusion"


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="hediff gui", description="the HE-Diffusion desktop app")
    parser.add_argument("--data-dir", type=Path, default=None, help="settings, keys and gallery (default: per user)")
    return parser.parse_known_args(argv)


def run_gui(argv: list[str] | None = None, services=None) -> int:
    """Open the main window and run the event loop; returns the exit code.

    ``argv``: like ``sys.argv`` (the default): the program name, then ``--data-dir DIR`` and Qt's own options.
    ``services``: an AppServices to use instead of building one (``--data-dir`` is ignored then).
    """
    argv = list(sys.argv if argv is None else argv) or ["hediff"]
    args, qt_args = _parse(argv[1:])

    from PySide6.QtWidgets import QApplication, QMessageBox

    app = QApplication.instance() or QApplication([argv[0], *qt_args])
    app.setApplicationName("hediff")
    app.setApplicationDisplayName(APP_NAME)
    app.setOrganizationName("hediff")

    if services is None:
        try:
            from desktop.core.services import AppServices

            services = AppServices(data_dir=args.data_dir)
        except Exception as e:  # noqa: BLE001 - nothing works without settings and keys: say why, stop
            log.error("could not start: %s", type(e).__name__)
            QMessageBox.critical(None, APP_NAME, f"HE-Diffusion could not start:\n\n{e}")
            return 1

    from desktop.ui.main_window import MainWindow

    window = MainWindow(services)
    app.aboutToQuit.connect(window.shutdown)
    window.show()
    try:
        return int(app.exec())
    finally:
        window.shutdown()


if __name__ == "__main__":
    sys.exit(run_gui())
