"""Screenshots of the main window for the docs, each at 1024x700, 1280x800 and 1920x1080: mid-generation (the
x0 preview), finished (a batch of BATCH images, shown as a grid), the privacy tab, the gallery and the form with
image to image open on the first image; and the model manager, preferences and large image view dialogs at their
own size.

    python -m hediff.desktop.ui.screenshots OUT_DIR [--model PATH] [--steps N] [--size PX]

Runs offscreen (QT_QPA_PLATFORM=offscreen unless set) with a local backend, a throw-away data directory and an
in-memory keyring, so it touches none of the user's settings, keys or gallery.
"""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from PySide6.QtCore import QObject, Slot  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402

# Prompts the embedded shapes model was trained to follow (its vocabulary has no words for anything else).
PROMPT = "a large yellow star at the top right on a black background"
SECOND_PROMPT = "a pink circle above a green square on a blue background"
NEGATIVE = ""
BATCH = 4  # the second job's images: the finished view and the gallery show a batch


def _wait(app, predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        app.processEvents()
        time.sleep(0.01)
    app.processEvents()
    return True


class _Shooter(QObject):
    """Receives the worker's signals on the GUI thread (a QObject slot, not a plain function)."""

    def __init__(self, window, path: Path, at_step: int):
        super().__init__()
        self.window, self.path, self.at_step = window, path, at_step
        self.paths: list[Path] = []
        self.steps = 0
        self.shot = False
        self.finished: list[int] = []
        self.failed: list[str] = []

    @Slot(object)
    def on_step(self, _update) -> None:
        self.steps += 1
        if self.steps == self.at_step and not self.shot:
            self.window.tabs.setCurrentWidget(self.window.timing_chart)
            self.paths = grab_at_sizes(self.window, self.path)
            self.shot = bool(self.paths)

    @Slot(int, object)
    def on_finished(self, job_id: int, _result) -> None:
        self.finished.append(job_id)

    @Slot(int, str)
    def on_failed(self, _job_id: int, message: str) -> None:
        self.failed.append(message)


WINDOW_SIZES = ((1024, 700), (1280, 800), (1920, 1080))


def grab_at_sizes(window, path: Path) -> list[Path]:
    """The window at each of WINDOW_SIZES, as ``path`` with ``-WxH`` before the suffix; ends at 1280x800."""
    written = []
    for width, height in (*WINDOW_SIZES, (1280, 800)):
        window.resize(width, height)
        QApplication.processEvents()
        target = path.with_name(f"{path.stem}-{width}x{height}{path.suffix}")
        if target not in written and window.grab().save(str(target)):
            written.append(target)
    return written


def take_screenshots(out_dir: Path, model: str = "embedded", steps: int = 20, size: int = 128) -> list[Path]:
    from hediff.desktop.core.keystore import MemoryKeyring, SecretStore
    from hediff.desktop.core.services import AppServices
    from hediff.desktop.ui.main_window import MainWindow

    out_dir.mkdir(parents=True, exist_ok=True)
    app = QApplication.instance() or QApplication(["hediff-screenshots"])
    app.setApplicationDisplayName("HE-Diffusion")
    written: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="hediff-screens-") as tmp:
        services = AppServices(data_dir=Path(tmp), secrets=SecretStore(MemoryKeyring()))
        window = MainWindow(services)
        window.resize(1280, 800)
        window.show()
        form = window.form
        form.prompt_edit.setPlainText(PROMPT)
        form.negative_edit.setPlainText(NEGATIVE)
        form.steps_spin.setValue(steps)
        form.width_spin.setValue(size)
        form.height_spin.setValue(size)
        form.seed_spin.setValue(1234)
        form.seed_lock_check.setChecked(True)
        form.scheduler_combo.setCurrentText("plms")
        form.set_model(model)
        local = next((s for s in services.settings.servers if s.local), None)
        if local is not None:
            form.select_server(local.id)

        generating = out_dir / "main-window-generating.png"
        shooter = _Shooter(window, generating, max(1, steps // 2))
        window.worker.stepUpdate.connect(shooter.on_step)  # after the window's own slot: the window is up to date
        window.worker.jobFinished.connect(shooter.on_finished)
        window.worker.jobFailed.connect(shooter.on_failed)
        first = window.generate()
        form.prompt_edit.setPlainText(SECOND_PROMPT)
        form.count_spin.setValue(BATCH)
        second = window.generate()  # shows a queued job in the first screenshot
        if first is None or second is None:
            raise RuntimeError(f"could not queue the jobs: {window.message_label.text()}")
        ok = _wait(app, lambda: len(shooter.finished) + len(shooter.failed) >= 2, 600)
        if not ok or shooter.failed or not shooter.shot:
            window.close()
            raise RuntimeError(f"generation did not finish: {shooter.failed or 'timeout'}")
        written += shooter.paths
        for tab, name in (
            (window.timing_chart, "main-window-done"),
            (window.privacy_panel, "main-window-privacy"),
            (window.gallery_panel, "main-window-gallery"),
        ):
            window.tabs.setCurrentWidget(tab)
            written += grab_at_sizes(window, out_dir / f"{name}.png")
        oldest = services.gallery.entries()[-1]  # the first job's image, the picture to start from
        form.count_spin.setValue(1)
        form.choose_init_image(str(oldest.image_path))
        form.strength_spin.setValue(0.6)
        window.tabs.setCurrentWidget(window.timing_chart)
        written += grab_at_sizes(window, out_dir / "main-window-img2img.png")
        form.set_init_image("")
        form.init_toggle.setChecked(False)
        written += grab_dialogs(window, out_dir)
        window.close()
        app.processEvents()
    return written


def grab_dialogs(window, out_dir: Path) -> list[Path]:
    """The model manager, Preferences and the large view of the newest gallery image, each as
    ``name-WxH.png`` at the dialog's own size."""
    written = []
    gallery = window.gallery_panel
    if gallery.entry_ids():
        gallery.select(gallery.entry_ids()[0])
    for name, open_dialog in (
        ("model-manager", lambda: window.open_model_manager(modal=False)),
        ("preferences", lambda: window.open_preferences(config=Path(window.services.data_dir) / "config", modal=False)),
        ("image-viewer", lambda: _viewer(gallery)),
    ):
        dialog = open_dialog()
        if dialog is None:
            continue
        if name == "image-viewer":
            dialog.resize(900, 700)
        QApplication.processEvents()
        target = out_dir / f"{name}-{dialog.width()}x{dialog.height()}.png"
        if dialog.grab().save(str(target)):
            written.append(target)
        dialog.close()
    return written


def _viewer(gallery):
    viewer = gallery.view_selected()
    if viewer is not None:
        viewer.view.preview.set_zoom(4.0)  # 4x: the pixels of a 128 px image, crisp
    return viewer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hediff.desktop.ui.screenshots", description=__doc__.splitlines()[0]
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--model", default="embedded", help="model folder or 'embedded' (default)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=128, help="image width and height in pixels (default 128)")
    args = parser.parse_args(argv)
    try:
        paths = take_screenshots(args.out_dir, args.model, args.steps, args.size)
    except RuntimeError as e:
        print(f"screenshots failed: {e}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
