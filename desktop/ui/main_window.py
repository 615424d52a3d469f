"""The main window: settings on the left, the image in the centre, timing / privacy / servers / keys / gallery on
the right. Generation runs on a GenerationWorker in its own thread; this window only reacts to its signals."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from PySide6.QtCore import QByteArray, Qt, QTimer
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import (
    QApplication,
    QFileDialog,
    QFrame,
    QHBoxLayout,
    QLabel,
    QMainWindow,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSplitter,
    QTabWidget,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from hediff.common.settings import U_SPLITS
from hediff.desktop.core.privacy import init_image_note
from hediff.desktop.core.prompt_history import PromptHistory
from hediff.desktop.ui.dialogs import ask_yes_no, error_text
from hediff.desktop.ui.gallery_panel import GalleryPanel
from hediff.desktop.ui.keys_panel import KeysPanel
from hediff.desktop.ui.notify import Notifier
from hediff.desktop.ui.params_form import ParamsForm
from hediff.desktop.ui.preview import ImageView, compact, image_grid, png_paths
from hediff.desktop.ui.privacy_panel import PrivacyPanel
from hediff.desktop.ui.queue_view import QueueView
from hediff.desktop.ui.servers_panel import ServersPanel
from hediff.desktop.ui.timing_chart import TimingChart, format_seconds
from hediff.desktop.ui.worker import GenerationWorker

log = logging.getLogger(__name__)

ERROR_STYLE = "color: #c62828;"
INFO_STYLE = ""
PRIVATE_STYLE = "color: #2e7d32; font-weight: 600;"
NOT_PRIVATE_STYLE = "color: #c62828; font-weight: 600;"


WINDOW_TITLE = "HE-Diffusion"
WIDE_WINDOW = 1000  # from this width on, every panel gets the width its contents need
NARROW_TABS_WIDTH = 240
CENTRE_MIN_WIDTH = 200


def warm_up_note(evaluations: int, requested: int) -> str:
    """What a scheduler's extra model evaluations are (PLMS adds one warm-up), so that 21 evaluations for 20
    steps asked for does not read as a miscount; empty when there are none."""
    extra = evaluations - requested
    return f" (+{extra} warm-up evaluation{'s' if extra > 1 else ''})" if extra > 0 else ""


def progress_text(done: int, evaluations: int, requested: int) -> str:
    if evaluations == requested:
        return f"step {done} / {requested}"
    return f"{done} / {evaluations}: {requested} steps{warm_up_note(evaluations, requested)}"


def format_eta(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class FittingProgressBar(QProgressBar):
    """Shows its full text, or a short form when the bar is too narrow for it (the centre column of a 1024 px
    window); the full text stays in the tooltip."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self._full = self._short = ""

    def set_texts(self, full: str, short: str | None = None) -> None:
        self._full, self._short = full, short or full
        self.setToolTip(full if short else "")
        self._fit()

    def resizeEvent(self, event) -> None:
        super().resizeEvent(event)
        self._fit()

    def _fit(self) -> None:
        fits = self.fontMetrics().horizontalAdvance(self._full) <= self.width() - 16
        self.setFormat((self._full if fits else self._short).replace("%", "%%"))


class MainWindow(QMainWindow):
    def __init__(self, services, parent: QWidget | None = None):
        super().__init__(parent)
        self.services = services
        self.setWindowTitle(WINDOW_TITLE)
        self._submitted: dict[int, tuple[object, str]] = {}  # job id -> (params, server name)
        self._current_job: int | None = None
        self._shut_down = False

        self.worker = GenerationWorker(services)
        self.prompt_history = PromptHistory(services.settings)
        self.notifier = Notifier(self)
        self._build_ui()
        self._build_menus()
        self._connect_worker()
        self._restore_settings()
        self.worker.start()
        self._queue_changed()

    # --- construction ---

    def _build_ui(self) -> None:
        # left: the form, Generate / Cancel, the queue
        self.form = ParamsForm()
        self.form.generateRequested.connect(self.generate)
        scroll = QScrollArea()
        scroll.setWidget(self.form)
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.generate_button = QPushButton("Generate")
        self.generate_button.setDefault(True)
        self.generate_button.setMinimumHeight(34)
        self.generate_button.setToolTip("Queue a generation with these settings (Ctrl+Enter)")
        self.generate_button.setStyleSheet("font-weight: 600;")
        self.generate_button.clicked.connect(self.generate)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setMinimumHeight(34)
        self.cancel_button.setToolTip("Stop the running job (it ends within one step)")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        buttons = QHBoxLayout()
        buttons.addWidget(self.generate_button, 2)
        buttons.addWidget(self.cancel_button, 1)
        self.queue_view = QueueView()
        self.queue_view.removeRequested.connect(self._remove_pending)
        self.queue_view.moveRequested.connect(self.worker_move)
        self.queue_view.reorderRequested.connect(self.worker_reorder)
        self.queue_view.setMinimumHeight(60)
        left = QWidget()
        ll = QVBoxLayout(left)
        ll.setContentsMargins(8, 8, 4, 8)
        ll.addWidget(scroll, 1)
        # what the chosen server and mode protect, measured, before anything is sent
        self.privacy_line = QLabel("")
        self.privacy_line.setWordWrap(True)
        self.privacy_line.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        ll.addWidget(self.privacy_line)
        ll.addLayout(buttons)
        self.queue_view.setMaximumHeight(110)  # under the image: the form needs the left column's full height
        # the form's own width, so that no field is cut off; the splitter cannot make it narrower
        scrollbar = scroll.verticalScrollBar().sizeHint().width()
        scroll.setMinimumWidth(self.form.minimumSizeHint().width() + scrollbar)
        margins = ll.contentsMargins()
        left.setMinimumWidth(scroll.minimumWidth() + margins.left() + margins.right())

        # centre: the image, progress, the last message
        self.image_view = ImageView()
        self.preview = self.image_view.preview
        self.preview.pngDropped.connect(self.load_png)
        self.reuse_seed_button = QToolButton()
        self.reuse_seed_button.setText("Seed")
        self.reuse_seed_button.setToolTip("Put this image's seed into the form and keep it")
        self.reuse_seed_button.setEnabled(False)
        self.reuse_seed_button.setAutoRaise(True)
        compact(self.reuse_seed_button)
        self.reuse_seed_button.clicked.connect(self.reuse_seed)
        self.image_view.bar.insertWidget(self.image_view.bar.count() - 1, self.reuse_seed_button)
        self._shown_seed: int | None = None
        self._saved_paths: dict[int, str] = {}
        self.setAcceptDrops(True)
        self.progress = FittingProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress.setTextVisible(True)
        self.progress.set_texts("Idle")
        self.progress.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.message_label = QLabel("")
        self.message_label.setWordWrap(True)
        self.message_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.message_label.setMinimumHeight(self.message_label.fontMetrics().height() * 2 + 4)
        self.message_label.setAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop)
        centre = QWidget()
        cl = QVBoxLayout(centre)
        cl.setContentsMargins(4, 8, 4, 8)
        cl.addWidget(self.image_view, 1)
        cl.addWidget(self.progress)
        cl.addWidget(self.message_label)
        cl.addWidget(self.queue_view)
        centre.setMinimumWidth(120)  # the form keeps its width, so small windows (800 px) squeeze the image

        # right: tabs
        self.tabs = QTabWidget()
        self.timing_chart = TimingChart()
        self.privacy_panel = PrivacyPanel()
        self.tabs.addTab(self.timing_chart, "Timing")
        self.tabs.addTab(self.privacy_panel, "Privacy")
        self.servers_panel = ServersPanel(self.services)
        self.keys_panel = KeysPanel(self.services)
        self.gallery_panel = GalleryPanel(self.services)
        self.tabs.addTab(self.servers_panel, "Servers")
        self.tabs.addTab(self.keys_panel, "Keys")
        self.tabs.addTab(self.gallery_panel, "Gallery")
        self.servers_panel.serversChanged.connect(self._servers_changed)
        self.gallery_panel.loadSettingsRequested.connect(self.load_params)
        for panel in (self.servers_panel, self.keys_panel, self.gallery_panel):
            panel.statusMessage.connect(self._panel_message)
        right = QWidget()
        rl = QVBoxLayout(right)
        rl.setContentsMargins(4, 8, 8, 8)
        rl.addWidget(self.tabs)
        # in windows of 1000 px and more the tabs panel gets the width its widest tab needs (a narrower one cuts
        # the tabs' contents off at the window's edge); in smaller windows (small screens) it may shrink
        margins = rl.contentsMargins()
        self._tabs_width = self.tabs.minimumSizeHint().width() + margins.left() + margins.right()
        right.setMinimumWidth(NARROW_TABS_WIDTH)

        self.splitter = QSplitter(Qt.Orientation.Horizontal)
        self.splitter.addWidget(left)
        self.splitter.addWidget(centre)
        self.splitter.addWidget(right)
        self.splitter.setStretchFactor(0, 0)
        self.splitter.setStretchFactor(1, 3)  # a wider window widens the image most, the tabs some (gallery buttons)
        self.splitter.setStretchFactor(2, 1)
        self.splitter.setChildrenCollapsible(False)
        self.splitter.setSizes([left.minimumWidth(), 600, 400])
        self.splitter.splitterMoved.connect(lambda *_: self._fit_tabs())
        self.setCentralWidget(self.splitter)

        self.server_status = QLabel("")
        self.statusBar().addPermanentWidget(self.server_status)
        self.form.serverChanged.connect(self._update_server_status)
        self.form.serverChanged.connect(self._update_privacy_line)
        self.form.split_combo.currentIndexChanged.connect(self._update_privacy_line)
        self.form.encryption_combo.currentIndexChanged.connect(self._update_privacy_line)
        self.form.initImageChanged.connect(self._update_privacy_line)

    def _build_menus(self) -> None:
        file_menu = self.menuBar().addMenu("&File")
        generate = QAction("&Generate", self)
        generate.setShortcut(QKeySequence("Ctrl+Return"))
        generate.triggered.connect(self.generate)
        cancel = QAction("&Cancel current job", self)
        cancel.setShortcut(QKeySequence("Ctrl+."))
        cancel.triggered.connect(self.cancel)
        quit_action = QAction("&Quit", self)
        quit_action.setShortcut(QKeySequence.StandardKey.Quit)
        quit_action.triggered.connect(self.close)
        open_png = QAction("&Load settings from a PNG…", self)
        open_png.setShortcut(QKeySequence.StandardKey.Open)
        open_png.triggered.connect(self._ask_png)
        file_menu.addAction(generate)
        file_menu.addAction(cancel)
        file_menu.addAction(open_png)
        preferences = QAction("&Preferences…", self)
        preferences.setShortcut(QKeySequence.StandardKey.Preferences)
        preferences.setMenuRole(QAction.MenuRole.PreferencesRole)
        preferences.triggered.connect(self.open_preferences)
        models = QAction("&Models…", self)
        models.triggered.connect(self.open_model_manager)
        file_menu.addSeparator()
        file_menu.addAction(models)
        file_menu.addAction(preferences)
        file_menu.addSeparator()
        file_menu.addAction(quit_action)
        view_menu = self.menuBar().addMenu("&View")
        for i in range(self.tabs.count()):
            action = QAction(self.tabs.tabText(i), self)
            action.setShortcut(QKeySequence(f"Ctrl+{i + 1}"))
            action.triggered.connect(lambda _checked=False, i=i: self.tabs.setCurrentIndex(i))
            view_menu.addAction(action)
        help_menu = self.menuBar().addMenu("&Help")
        about = QAction("&About HE-Diffusion", self)
        about.triggered.connect(self._about)
        help_menu.addAction(about)

    def _connect_worker(self) -> None:
        w = self.worker
        w.jobStarted.connect(self._job_started)
        w.stepUpdate.connect(self._step_update)
        w.jobSaved.connect(lambda job_id, path: self._saved_paths.__setitem__(job_id, path))
        w.jobFinished.connect(self._job_finished)
        w.jobFailed.connect(self._job_failed)
        w.jobCancelled.connect(self._job_cancelled)
        w.queueChanged.connect(self._queue_changed)
        w.notice.connect(self.show_info)

    # --- actions ---

    def generate(self) -> int | None:
        """Queue a job with the form's settings; returns its id, or None (with a message) when they are unusable."""
        if self._shut_down:
            return None
        try:
            params = self.form.params()
            params.validate()
        except ValueError as e:
            self.show_error(f"Cannot generate: {e}.")
            return None
        server_id = self.form.server_id()
        if server_id is None:
            self.show_error("Cannot generate: no server is configured; add one in the Servers tab.")
            return None
        native = self.form.native_side()
        # the queue and captions show the real size, not 0x0; img2img's picture sets its own size unless asked
        if native and not params.init_image and not (params.width and params.height):
            params = dataclasses.replace(params, width=params.width or native, height=params.height or native)
        server_name = self.form.server_combo.currentText()
        server = self.services.settings.server(server_id)
        if server.remote and not server.not_private_ok:
            label = self.services.privacy(server, params.split, params.encryption).text
            if not self.confirm(
                "Not private",
                f"{server.name} ({server.url}) proves nothing about what it runs.\n\n{label}.\n\n"
                "Send your prompts and images to this server anyway? You are asked once per server; "
                "'This device (private)' generates without any server.",
            ):
                self.show_info(f"Nothing was sent to {server.name}.")
                return None
            self.services.settings.acknowledge_not_private(server.id)
        job_id = self.worker.submit(params, server_id, self.form.model())
        self._submitted[job_id] = (params, server_name)
        self.prompt_history.add(params.prompt)
        self.form.set_history(self.prompt_history.items())
        self.form.after_submit()
        self._save_settings(params_only=True)
        if self._current_job is not None:
            self.show_info(f"Job #{job_id} queued; it starts when job #{self._current_job} is done.")
        return job_id

    def cancel(self) -> None:
        job_id = self.worker.cancel_current()
        if job_id is not None:
            self.show_info(f"Cancelling job #{job_id}…")
            self.cancel_button.setEnabled(False)

    def load_params(self, params) -> None:
        self.form.set_params(params)
        self.show_info("Settings loaded from the gallery (seed kept).")

    def load_png(self, path) -> bool:
        """Fill the form from the settings in a PNG this app wrote (dropped or opened). A PNG without the prompt
        keeps the form's prompt. False (message shown) when the file carries no usable settings."""
        from hediff.desktop.core.gallery import settings_from_png

        try:
            params = settings_from_png(Path(path))
        except Exception as e:  # noqa: BLE001 - GalleryError and anything unexpected: a message, not a crash
            self.show_error(f"Cannot load settings: {error_text(e)}")
            return False
        kept = ""
        if not params.prompt:  # written without the private fields: the prompts and the init image's name
            params = dataclasses.replace(
                params,
                prompt=self.form.prompt_edit.toPlainText().strip(),
                negative_prompt=self.form.negative_edit.toPlainText().strip(),
                init_image=params.init_image or self.form.init_image(),
            )
            kept = "; it carries no prompt, so yours was kept"
        self.form.set_params(params)
        self.show_info(f"Settings loaded from {Path(path).name} (seed {params.seed} kept){kept}.")
        return True

    def _ask_png(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load settings from a PNG", "", "PNG images (*.png)")
        if path:
            self.load_png(path)

    def open_preferences(self, config=None, modal: bool = True):
        """The Preferences dialog; with ``modal`` False it is shown and returned (tests, screenshots)."""
        from hediff.desktop.ui.preferences import PreferencesDialog

        dialog = PreferencesDialog(self.services, self, config=config)
        dialog.accepted.connect(self.preferences_changed)
        if not modal:
            dialog.show()
            return dialog
        dialog.exec()
        return None

    def open_model_manager(self, modal: bool = True):
        """The model manager; with ``modal`` False it is shown and returned (tests, screenshots)."""
        from hediff.desktop.ui.model_manager import ModelManagerDialog

        dialog = ModelManagerDialog(self.services, self)
        dialog.modelsChanged.connect(lambda: self.form.add_models(dialog.specs()))
        dialog.defaultChanged.connect(self.form.set_model)
        if not modal:
            dialog.show()
            return dialog
        dialog.exec()
        return None

    def preferences_changed(self) -> None:
        """Apply stored preferences to what is on screen."""
        s = self.services.settings
        self.form.select_server(s.selected_server)
        self.prompt_history.sync()  # "remember prompts" off: the stored history goes at this save
        self._save_settings(params_only=True)
        self.gallery_panel.refresh()
        self.show_info("Preferences saved.")

    def reuse_seed(self) -> int | None:
        """Put the shown image's seed into the form and keep it for the next Generate."""
        if self._shown_seed is None:
            return None
        self.form.seed_spin.setValue(self._shown_seed)
        self.form.seed_lock_check.setChecked(True)
        self.show_info(f"Seed {self._shown_seed} is in the form and kept.")
        return self._shown_seed

    def dragEnterEvent(self, event) -> None:
        if png_paths(event.mimeData()):
            event.acceptProposedAction()
        else:
            event.ignore()

    def dropEvent(self, event) -> None:
        paths = png_paths(event.mimeData())
        if paths:
            event.acceptProposedAction()
            self.load_png(paths[0])

    def _remove_pending(self, job_id: int) -> None:
        if self.worker.remove_pending(job_id):
            self._submitted.pop(job_id, None)
            self.show_info(f"Job #{job_id} removed from the queue.")

    def worker_move(self, job_id: int, offset: int) -> None:
        self.worker.move_pending(job_id, offset)

    def worker_reorder(self, ids: list) -> None:
        if not self.worker.reorder_pending(ids):
            self._queue_changed()  # a drop that changed nothing (e.g. above the running job): show the real order

    def _servers_changed(self) -> None:
        self.form.set_servers(self.services.settings.servers)
        self.worker.invalidate_connections()

    def _about(self) -> None:
        QMessageBox.about(
            self,
            "About HE-Diffusion",
            "HE-Diffusion: private Stable Diffusion.\n\nYour machine encodes the prompt, runs the first UNet "
            "layers and encrypts the latent with CKKS; the backend denoises the ciphertexts; your machine "
            "decrypts, previews and decodes.",
        )

    # --- messages ---

    def show_error(self, message: str) -> None:
        self.message_label.setStyleSheet(ERROR_STYLE)
        self.message_label.setText(message)
        self.statusBar().showMessage(message)

    def show_info(self, message: str) -> None:
        self.message_label.setStyleSheet(INFO_STYLE)
        self.message_label.setText(message)
        self.statusBar().showMessage(message, 15000)

    def _panel_message(self, message: str) -> None:
        self.statusBar().showMessage(message, 15000)

    def confirm(self, title: str, text: str) -> bool:
        """Ask yes/no (tests replace this hook)."""
        return ask_yes_no(self, title, text)

    def _update_privacy_line(self, *_args) -> None:
        server_id = self.form.server_id()
        if server_id is None:
            self.privacy_line.clear()
            return
        try:
            split = self.form.split_combo.currentText()
            encryption = "none" if split in U_SPLITS else self.form.encryption_combo.currentData()
            label = self.services.privacy(self.services.settings.server(server_id), split, encryption)
        except (KeyError, ValueError) as e:
            self.privacy_line.setStyleSheet(NOT_PRIVATE_STYLE)
            self.privacy_line.setText(f"Privacy unknown ({e}): treat this as not private")
            return
        self.privacy_line.setStyleSheet(PRIVATE_STYLE if label.private else NOT_PRIVATE_STYLE)
        text = label.text
        if self.form.init_image():
            text += f". {init_image_note(label.private, split)}"
        self.privacy_line.setText(text)

    def _update_server_status(self, server_id: str) -> None:
        for server in self.services.settings.servers:
            if server.id == server_id:
                where = server.url if server.remote else "on this machine"
                self.server_status.setText(f"Server: {server.name} ({where})")
                return
        self.server_status.setText("no server")

    # --- worker signals (GUI thread) ---

    def _job_started(self, job_id: int) -> None:
        self._current_job = job_id
        params, server_name = self._submitted.get(job_id, (None, ""))
        self.timing_chart.clear(params.steps if params is not None else 0)
        if params is not None:
            remote = any(s.remote for s in self.services.settings.servers if s.name == server_name)
            self.privacy_panel.begin_job(
                params, server_name, getattr(self.services.settings, "key_policy", "fresh"), remote=remote
            )
        self.progress.setRange(0, params.steps if params is not None else 1)
        self.progress.setValue(0)
        self.progress.set_texts(f"Job #{job_id}: connecting to {server_name or 'the server'}…", "Connecting…")
        # the last job's image and message belong to it: an old error under a new job reads as the new job's
        self.preview.clear()
        self._shown_seed = None
        self.reuse_seed_button.setEnabled(False)
        self.message_label.clear()
        self.message_label.setStyleSheet(INFO_STYLE)
        self.preview.set_caption(f"Job #{job_id}: preparing…")
        self.cancel_button.setEnabled(True)
        self.statusBar().showMessage(f"Job #{job_id} started on {server_name}.")

    def _step_update(self, update) -> None:
        done = update.index + 1
        params, _server = self._submitted.get(self._current_job, (None, ""))
        counted = progress_text(done, update.total, params.steps if params is not None else update.total)
        if getattr(self.services.settings, "preview_kind", "predicted") == "none":
            self.preview.set_caption(f"Step {done} / {update.total} (preview off in Preferences)")
        else:
            self.preview.set_image(update.preview, caption=f"Predicted final image at {done} / {update.total}")
        self.progress.setRange(0, update.total)
        self.progress.setValue(done)
        eta = format_eta(update.eta_s)
        self.progress.set_texts(f"{counted}, ETA {eta}", f"{done} / {update.total}, ETA {eta}")
        self.setWindowTitle(f"{100 * done // update.total}% · job #{self._current_job} · {WINDOW_TITLE}")
        self.timing_chart.add_update(update)
        self.privacy_panel.update_step(update)

    def _job_finished(self, job_id: int, result) -> None:
        params, _server = self._submitted.pop(job_id, (result.params, ""))
        self._shown_seed = params.seed
        self.reuse_seed_button.setEnabled(True)
        images = list(result.images) or [result.image]
        seeds = f"seed {params.seed}" if len(images) == 1 else f"seeds {params.seed}–{params.seed + len(images) - 1}"
        saved = self._saved_paths.pop(job_id, None)
        self.preview.set_image(
            images[0] if len(images) == 1 else image_grid(images),
            final=True,
            path=saved if len(images) == 1 else None,  # a grid is no one file: the gallery has each image
            caption=f"Job #{job_id} · {seeds} · {result.params.width}×{result.params.height} · "
            f"{format_seconds(result.total_s)}",
        )
        self.progress.setRange(0, max(1, len(result.step_timings)))
        self.progress.setValue(self.progress.maximum())
        note = warm_up_note(len(result.step_timings), params.steps)
        took = format_seconds(result.total_s)
        self.progress.set_texts(f"Done: {params.steps} steps{note} in {took}", f"Done in {took}")
        self.timing_chart.set_result(result)
        self.privacy_panel.finish(result)
        self.gallery_panel.refresh()
        self.keys_panel.refresh()  # a generation with the device-key policy may have just created the key
        self.show_info(f"Job #{job_id} finished in {format_seconds(result.total_s)}; saved to the gallery.")
        self._job_over(job_id)
        if self.user_is_away():
            self.notifier.notify(
                f"Job #{job_id} finished", f"Seed {params.seed}, {format_seconds(result.total_s)}; in the gallery."
            )

    def user_is_away(self) -> bool:
        """The window is not the one the user works in (another app, minimised): tell them when a job ends."""
        return not self.isActiveWindow() or self.isMinimized()

    def _job_failed(self, job_id: int, message: str) -> None:
        self._submitted.pop(job_id, None)
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress.set_texts(f"Job #{job_id} failed")
        self.preview.set_caption("")
        self.show_error(f"Job #{job_id} failed: {message}")
        if self.user_is_away():
            self.notifier.notify(f"Job #{job_id} failed", message)
        self._job_over(job_id)

    def _job_cancelled(self, job_id: int) -> None:
        self._submitted.pop(job_id, None)
        self.progress.set_texts(f"Job #{job_id} cancelled")
        self.preview.set_caption(f"Job #{job_id} was cancelled")
        self.show_info(f"Job #{job_id} cancelled.")
        self._job_over(job_id)

    def _job_over(self, job_id: int) -> None:
        if self._current_job == job_id:
            self._current_job = None
        self.setWindowTitle(WINDOW_TITLE)

    def _queue_changed(self) -> None:
        current = self.worker.current_job()
        self.queue_view.set_jobs(current, self.worker.pending_jobs())
        self.cancel_button.setEnabled(current is not None and not current.cancel.is_set())

    # --- settings ---

    def _restore_settings(self) -> None:
        s = self.services.settings
        self.form.set_servers(s.servers, s.selected_server)
        self.form.set_history(self.prompt_history.items())
        model = getattr(s, "model", "embedded") or "embedded"
        self.form.add_models(getattr(s, "models", []))
        self.form.set_model(model)
        saved = getattr(s, "params", {}) or {}
        # the model's recommended guidance and steps unless the user saved their own
        self.form.load_dict({**self.form.model_defaults(model), **(saved if isinstance(saved, dict) else {})})
        self._update_privacy_line()
        geometry = getattr(s, "window_geometry", None)
        restored = False
        if geometry:
            try:
                restored = self.restoreGeometry(QByteArray.fromBase64(geometry.encode("ascii")))
            except (UnicodeEncodeError, TypeError, ValueError):
                restored = False
        if not restored:
            self.resize(1280, 800)
        if s.splitter_state:
            try:  # Qt keeps each panel at least as wide as its minimum: a stale state cannot cut the form off
                self.splitter.restoreState(QByteArray.fromBase64(s.splitter_state.encode("ascii")))
            except (UnicodeEncodeError, TypeError, ValueError):
                pass
        problem = getattr(s, "problem", None)
        if problem:
            self.show_error(str(problem))

    def _save_settings(self, params_only: bool = False) -> None:
        s = self.services.settings
        s.params = self.form.to_dict(include_prompt=bool(getattr(s, "remember_prompt", False)))
        s.model = self.form.model()
        server_id = self.form.server_id()
        if server_id is not None:
            s.selected_server = server_id
        if not params_only:
            s.window_geometry = bytes(self.saveGeometry().toBase64()).decode("ascii")
            s.splitter_state = bytes(self.splitter.saveState().toBase64()).decode("ascii")
        try:
            s.save()
        except OSError as e:
            self.show_error(f"Could not save the settings: {e}")

    # --- shutdown ---

    def shutdown(self) -> None:
        """Save settings, cancel the running job, wait for the worker; idempotent."""
        if self._shut_down:
            return
        self._shut_down = True
        if self.worker.is_busy():
            self.statusBar().showMessage("Stopping the current job…")
            QApplication.processEvents()
        self._save_settings()
        self.worker.shutdown()

    def resizeEvent(self, event) -> None:
        super().resizeEvent(event)
        QTimer.singleShot(0, self, self._fit_tabs)  # once the splitter has laid its panels out at the new width

    def _fit_tabs(self) -> None:
        """Widen the tabs panel to what its tabs need, taking the width from the image, in a wide window."""
        if self.width() < WIDE_WINDOW:
            return
        sizes = self.splitter.sizes()
        lack = self._tabs_width - sizes[2]
        if lack > 0:
            take = min(lack, sizes[1] - CENTRE_MIN_WIDTH)
            if take > 0:
                self.splitter.setSizes([sizes[0], sizes[1] - take, sizes[2] + take])

    def closeEvent(self, event) -> None:
        waiting = len(self.worker.pending_jobs()) if not self._shut_down else 0
        if waiting:
            answer = QMessageBox.question(
                self,
                "Quit HE-Diffusion?",
                f"{waiting} queued job{'s' if waiting > 1 else ''} will not run, and the running one stops. Quit?",
                QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
                QMessageBox.StandardButton.No,
            )
            if answer != QMessageBox.StandardButton.Yes:
                event.ignore()
                return
        self.shutdown()
        event.accept()
