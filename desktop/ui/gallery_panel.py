"""The Gallery tab: finished images as thumbnails with their settings; load settings back, open, export, delete.

Storage, export and corrupt-entry handling are desktop.core's (Gallery); this panel only shows and calls it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from PySide6.QtCore import QMimeData, QSize, Qt, QUrl, Signal
from PySide6.QtGui import QColor, QDesktopServices, QIcon, QImage, QPainter, QPixmap
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListView,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from hediff.desktop.core.gallery import EXPORT_SCALES, matches
from hediff.desktop.ui.dialogs import MessageLabel, PanelMessages, StatusLabel, ask_yes_no, dim, error_text
from hediff.desktop.ui.preview import ImageViewer, copy_image

THUMB = 128
_ID_ROLE = Qt.ItemDataRole.UserRole


def _format_time(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def _encryption_text(entry) -> str:
    p = entry.params
    if p.encryption == "none":
        return "none (plaintext split)"
    text = p.encryption if p.encryption != "min-distortion" else f"min-distortion, tau {p.tau:g}"
    if entry.encrypted_fraction is not None:
        text += f", {entry.encrypted_fraction:.0%} encrypted"
    return f"{text} ({p.he_preset})"


def summary(entry) -> str:
    """The settings of a gallery entry, one per line (tooltip and details); no prompt."""
    p = entry.params
    lines = [
        f"{p.width}×{p.height}, {entry.steps} steps, {p.scheduler}, guidance {p.guidance:g}",
        f"seed {p.seed}" + entry.batch_text(", "),
        f"encryption: {_encryption_text(entry)}",
        f"key: {entry.key_fingerprint or 'none'}",
        f"took {entry.total_s:.1f} s on {entry.server_url or 'unknown server'}",
        f"created {_format_time(entry.created)}",
    ]
    return "\n".join(lines)


def _placeholder() -> QPixmap:
    pixmap = QPixmap(THUMB, THUMB)
    pixmap.fill(QColor("#e6e6e6"))
    painter = QPainter(pixmap)
    painter.setPen(QColor("#888888"))
    painter.drawText(pixmap.rect(), Qt.AlignmentFlag.AlignCenter, "no image")
    painter.end()
    return pixmap


class _GalleryList(QListWidget):
    """Thumbnails; dragging one out of the app carries its PNG file (with the settings) and the image."""

    mime_for: Callable[[list], QMimeData | None] = staticmethod(lambda _items: None)

    def mimeData(self, items) -> QMimeData:
        return self.mime_for(items) or super().mimeData(items)

    def supportedDragActions(self):
        return Qt.DropAction.CopyAction


class GalleryPanel(PanelMessages, QWidget):
    loadSettingsRequested = Signal(object)  # GenerationParams
    statusMessage = Signal(str)

    def __init__(self, services, parent: QWidget | None = None):
        super().__init__(parent)
        self.services = services
        self.confirm: Callable[[str, str], bool] = lambda title, text: ask_yes_no(self, title, text)
        self.ask_export_path: Callable[[str], str | None] = self._ask_export_path
        self.opener: Callable[[QUrl], bool] = QDesktopServices.openUrl
        self._entries: dict[str, object] = {}
        self._thumbs: dict[tuple[str, float], QIcon] = {}

        self.problems_label = MessageLabel(self)
        self.search_edit = QLineEdit()
        self.search_edit.setPlaceholderText("Search: prompt, model, date (2026-12-07), seed")
        self.search_edit.setClearButtonEnabled(True)
        self.search_edit.setToolTip(
            "Every word must match the prompt, model, date, scheduler or seed. Prompts are searchable only while "
            "'remember prompts' is on (Preferences)."
        )
        self.search_edit.textChanged.connect(lambda _text: self.refresh())
        self.list = _GalleryList(self)
        self.list.mime_for = self._mime_for
        self.list.setViewMode(QListView.ViewMode.IconMode)
        self.list.setIconSize(QSize(THUMB, THUMB))
        self.list.setGridSize(QSize(THUMB + 28, THUMB + 40))
        self.list.setResizeMode(QListView.ResizeMode.Adjust)
        self.list.setMovement(QListView.Movement.Static)
        self.list.setDragEnabled(True)  # a thumbnail dragged out carries the PNG file and its pixels
        self.list.setDragDropMode(QListWidget.DragDropMode.DragOnly)
        self.list.setUniformItemSizes(True)
        self.list.setWordWrap(True)
        self.list.setSelectionMode(QListWidget.SelectionMode.SingleSelection)
        self.list.itemSelectionChanged.connect(self._on_selection)
        self.list.itemDoubleClicked.connect(lambda _item: self.view_selected())
        self.empty_label = QLabel("No images yet. Finished generations appear here.")
        self.empty_label.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.empty_label.setWordWrap(True)
        dim(self.empty_label).setContentsMargins(24, 24, 24, 24)

        self.details = QLabel()
        self.details.setWordWrap(True)
        self.details.setTextFormat(Qt.TextFormat.PlainText)
        self.details.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.details.setAlignment(Qt.AlignmentFlag.AlignTop | Qt.AlignmentFlag.AlignLeft)

        self.load_button = QPushButton("Load settings")
        self.view_button = QPushButton("View")
        self.view_button.setToolTip("A large view with zoom (double-click a thumbnail)")
        self.open_button = QPushButton("Open")
        self.open_button.setToolTip("Open in your image viewer")
        self.copy_button = QPushButton("Copy")
        self.copy_button.setToolTip("Copy the image to the clipboard")
        self.export_button = QPushButton("Export…")
        self.delete_button = QPushButton("Delete…")
        self.include_prompt = QCheckBox("Export with the prompt")
        self.include_prompt.setChecked(False)
        self.include_prompt.setToolTip("Exported PNGs carry the settings; the prompt only when this is ticked.")
        self.scale_combo = QComboBox()
        for factor in EXPORT_SCALES:
            self.scale_combo.addItem("as is" if factor == 1 else f"{factor}×", factor)
        self.scale_combo.setToolTip("Export larger: a 128 px image is small at its own size")
        self.smooth_check = QCheckBox("Smooth")
        self.smooth_check.setToolTip("Smooth (Lanczos) upscaling; unticked keeps crisp pixels (nearest)")
        self.load_button.setToolTip("Put this image's settings (including its prompt) back into the form.")
        self.load_button.clicked.connect(self.load_selected)
        self.open_button.clicked.connect(self.open_selected)
        self.view_button.clicked.connect(self.view_selected)
        self.copy_button.clicked.connect(self.copy_selected)
        self.export_button.clicked.connect(self._on_export)
        self.delete_button.clicked.connect(lambda: self.delete_selected(confirm=True))
        buttons = QGridLayout()  # two per row: whole buttons even when the tabs panel is at its narrowest
        for i, b in enumerate(self._action_buttons()):
            buttons.addWidget(b, i // 2, i % 2)
        export_row = QHBoxLayout()
        export_row.addWidget(self.include_prompt)
        export_row.addStretch(1)
        scale_row = QHBoxLayout()
        scale_row.addWidget(QLabel("Size"))
        scale_row.addWidget(self.scale_combo, 1)
        scale_row.addWidget(self.smooth_check)

        self.result_label = MessageLabel(self)
        self.status_label = StatusLabel(self)

        layout = QVBoxLayout(self)
        layout.addWidget(self.problems_label)
        layout.addWidget(self.search_edit)
        layout.addWidget(self.list, 1)
        layout.addWidget(self.empty_label, 1)
        layout.addWidget(self.details)
        layout.addLayout(buttons)
        layout.addLayout(export_row)
        layout.addLayout(scale_row)
        layout.addWidget(self.result_label)
        layout.addWidget(self.status_label)
        self.refresh()

    def _action_buttons(self) -> tuple[QPushButton, ...]:
        return (
            self.load_button,
            self.view_button,
            self.copy_button,
            self.open_button,
            self.export_button,
            self.delete_button,
        )

    @property
    def gallery(self):
        return self.services.gallery

    # --- listing -----------------------------------------------------------------------------------

    def _thumbnail(self, entry) -> QIcon:
        path = Path(entry.image_path)
        try:
            key = (str(path), path.stat().st_mtime)
        except OSError:
            return QIcon(_placeholder())
        icon = self._thumbs.get(key)
        if icon is None:
            pixmap = QPixmap(str(path))
            if pixmap.isNull():
                pixmap = _placeholder()
            else:
                pixmap = pixmap.scaled(
                    THUMB, THUMB, Qt.AspectRatioMode.KeepAspectRatio, Qt.TransformationMode.SmoothTransformation
                )
            icon = self._thumbs[key] = QIcon(pixmap)
        return icon

    def refresh(self) -> None:
        """Re-read the gallery, keeping the selection; corrupt entries become a warning line."""
        keep = self.selected_id()
        try:
            entries = list(self.gallery.entries())
            problems = list(getattr(self.gallery, "problems", []) or [])
        except Exception as e:  # noqa: BLE001 - the panel shows the error and stays usable
            entries, problems = [], [error_text(e)]
        total = len(entries)
        query = self.search_edit.text().strip()
        if query:
            entries = [e for e in entries if matches(e, query)]
        self._entries = {e.id: e for e in entries}
        self.list.blockSignals(True)
        self.list.clear()
        for entry in entries:
            place = f" · {entry.batch_index + 1}/{entry.batch_size}" if entry.batch_size > 1 else ""
            item = QListWidgetItem(self._thumbnail(entry), f"seed {entry.params.seed}{place}\n{entry.steps} steps")
            item.setData(_ID_ROLE, entry.id)
            item.setToolTip(summary(entry))
            item.setTextAlignment(Qt.AlignmentFlag.AlignHCenter | Qt.AlignmentFlag.AlignTop)
            self.list.addItem(item)
        self.list.blockSignals(False)
        live = {str(Path(e.image_path)) for e in entries}
        self._thumbs = {k: v for k, v in self._thumbs.items() if k[0] in live}
        if problems:
            shown = problems[:5] + ([f"… and {len(problems) - 5} more"] if len(problems) > 5 else [])
            noun = "entry" if len(problems) == 1 else "entries"
            self.problems_label.show_message(
                f"{len(problems)} gallery {noun} could not be read and {'is' if len(problems) == 1 else 'are'} "
                "not shown:\n" + "\n".join(f"• {p}" for p in shown),
                "warning",
            )
        else:
            self.problems_label.clear_message()
        self.list.setVisible(bool(entries))
        self.empty_label.setText(
            f"No image matches “{query}” ({total} in the gallery)."
            if query and total
            else "No images yet. Finished generations appear here."
        )
        self.empty_label.setVisible(not entries)
        if keep is not None and keep in self._entries:
            self.select(keep)
        self._on_selection()

    def entry_ids(self) -> list[str]:
        return [self.list.item(i).data(_ID_ROLE) for i in range(self.list.count())]

    def selected_id(self) -> str | None:
        items = self.list.selectedItems()
        return items[0].data(_ID_ROLE) if items else None

    def selected_entry(self):
        return self._entries.get(self.selected_id())

    def select(self, entry_id: str) -> bool:
        for i in range(self.list.count()):
            item = self.list.item(i)
            if item.data(_ID_ROLE) == entry_id:
                self.list.setCurrentItem(item)
                item.setSelected(True)
                return True
        return False

    def _on_selection(self) -> None:
        entry = self.selected_entry()
        for b in self._action_buttons():
            b.setEnabled(entry is not None)
        if entry is None:
            self.details.setText("Select an image to see its settings." if self._entries else "")
            return
        prompt = entry.params.prompt
        if len(prompt) > 200:
            prompt = prompt[:200] + "…"
        self.details.setText(f"Prompt: {prompt}\n" + summary(entry).replace("\n", " · "))

    # --- messages ----------------------------------------------------------------------------------

    def _need_selection(self):
        entry = self.selected_entry()
        if entry is None:
            self._fail("Select an image first.")
        return entry

    # --- actions -----------------------------------------------------------------------------------

    def load_selected(self):
        """Emit ``loadSettingsRequested`` with the selected image's GenerationParams (and return them)."""
        entry = self._need_selection()
        if entry is None:
            return None
        self.loadSettingsRequested.emit(entry.params)
        self._ok("Loaded the image's settings into the form.")
        return entry.params

    def open_selected(self) -> bool:
        entry = self._need_selection()
        if entry is None:
            return False
        path = Path(entry.image_path)
        if not path.exists():
            self._fail(f"The image file {path} is missing.")
            return False
        if not self.opener(QUrl.fromLocalFile(str(path))):
            self._fail(f"No application could open {path}.")
            return False
        self._ok(f"Opened {path.name}.")
        return True

    def view_selected(self) -> ImageViewer | None:
        """Show the selected image large, with zoom; the viewer (non-modal), or None."""
        selected = self._selected_image()
        if selected is None:
            return None
        entry, image = selected
        viewer = ImageViewer(image, f"Seed {entry.params.seed} · {_format_time(entry.created)}", entry.image_path, self)
        viewer.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        viewer.show()
        self.viewer = viewer
        return viewer

    def _selected_image(self):
        """(entry, its image) of the selection, or None after saying why (nothing selected, an unreadable file)."""
        entry = self._need_selection()
        if entry is None:
            return None
        image = QImage(str(entry.image_path))
        if image.isNull():
            self._fail(f"The image file {entry.image_path} cannot be read.")
            return None
        return entry, image

    def _mime_for(self, items) -> QMimeData | None:
        entries = [self._entries.get(item.data(_ID_ROLE)) for item in items]
        entries = [e for e in entries if e is not None]
        if not entries:
            return None
        mime = QMimeData()
        mime.setUrls([QUrl.fromLocalFile(str(e.image_path)) for e in entries])
        image = QImage(str(entries[0].image_path))
        if not image.isNull():
            mime.setImageData(image)
        return mime

    def copy_selected(self) -> bool:
        """The selected image's pixels to the clipboard."""
        selected = self._selected_image()
        if selected is None:
            return False
        _entry, image = selected
        copy_image(image)
        self._ok(f"Copied the image ({image.width()}×{image.height()}) to the clipboard.")
        return True

    def export_selected(
        self, dest, include_prompt: bool = False, scale: int | None = None, smooth: bool | None = None
    ) -> Path | None:
        """Write the selected image as a PNG to ``dest``; the prompt goes into its metadata only if asked.
        ``scale`` / ``smooth``: the upscale (the panel's choice when None)."""
        entry = self._need_selection()
        if entry is None:
            return None
        scale = int(self.scale_combo.currentData()) if scale is None else scale
        smooth = self.smooth_check.isChecked() if smooth is None else smooth
        try:
            dest = Path(
                self.gallery.export(entry.id, Path(dest), include_prompt=include_prompt, scale=scale, smooth=smooth)
            )
        except Exception as e:  # noqa: BLE001
            self._fail(f"Export failed: {error_text(e)}")
            return None
        size = "" if scale == 1 else f", {scale}× {'smooth' if smooth else 'crisp'}"
        prompt = "with the prompt" if include_prompt else "without the prompt"
        self._ok(f"Exported to {dest} ({prompt}{size}).")
        return dest

    def delete_selected(self, confirm: bool = False) -> bool:
        entry = self._need_selection()
        if entry is None:
            return False
        if confirm and not self.confirm("Delete image", "Delete this image and its settings from the gallery?"):
            return False
        try:
            self.gallery.delete(entry.id)
        except Exception as e:  # noqa: BLE001
            self.refresh()
            self._fail(f"Delete failed: {error_text(e)}")
            return False
        self.refresh()
        self._ok("Deleted the image.")
        return True

    def _ask_export_path(self, suggested: str) -> str | None:
        path, _ = QFileDialog.getSaveFileName(self, "Export image", suggested, "PNG images (*.png)")
        return path or None

    def _on_export(self) -> None:
        entry = self._need_selection()
        if entry is None:
            return
        suggested = str(Path.home() / f"hediff-{entry.params.seed}.png")
        path = self.ask_export_path(suggested)
        if not path:
            return
        self.export_selected(path, self.include_prompt.isChecked())
