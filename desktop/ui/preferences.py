"""The Preferences dialog: data folder, default server, preview kind, and the two prompt privacy choices.

It edits the app's existing settings (desktop.core.settings.Settings) and the data-folder pointer
(desktop.core.appdata); both validate and store, the dialog only collects the choices.
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from hediff.desktop.core.appdata import choose_data_dir, chosen_data_dir, platform_data_dir
from hediff.desktop.core.settings import PREVIEW_KINDS
from hediff.desktop.ui.dialogs import MessageLabel, dim, error_text, fit_to_width

PREVIEW_LABELS = {
    "predicted": "The predicted final image, every step",
    "none": "None: progress only (nothing on screen until the end)",
}
assert set(PREVIEW_LABELS) == set(PREVIEW_KINDS)


class PreferencesDialog(QDialog):
    """``apply()`` stores the choices (also on OK); ``config`` is the folder of the data-folder pointer."""

    def __init__(self, services, parent: QWidget | None = None, config: Path | None = None):
        super().__init__(parent)
        self.setWindowTitle("Preferences")
        self.setMinimumWidth(520)
        self.services = services
        self.config = config
        s = services.settings
        self.data_dir_before = chosen_data_dir(config)

        self.error_label = MessageLabel(self)
        self.data_dir_edit = QLineEdit(str(self.data_dir_before or ""))
        self.data_dir_edit.setPlaceholderText(f"default: {platform_data_dir()}")
        self.data_dir_edit.setToolTip("Settings, device keys and the gallery; empty for the default")
        browse = QToolButton()
        browse.setText("…")
        browse.setToolTip("Choose a folder")
        browse.clicked.connect(self._browse)
        data_row = QHBoxLayout()
        data_row.addWidget(self.data_dir_edit, 1)
        data_row.addWidget(browse)
        self.data_dir_note = QLabel(f"In use now: {services.data_dir}. A new folder applies from the next start.")
        self.data_dir_note.setWordWrap(True)
        dim(self.data_dir_note)

        self.server_combo = QComboBox()
        for server in s.servers:
            self.server_combo.addItem(server.name, server.id)
        self.server_combo.setCurrentIndex(max(0, self.server_combo.findData(s.selected_server)))
        self.server_combo.setToolTip("The server chosen when the app starts")

        self.preview_combo = QComboBox()
        for kind in PREVIEW_KINDS:
            self.preview_combo.addItem(PREVIEW_LABELS[kind], kind)
        self.preview_combo.setCurrentIndex(max(0, self.preview_combo.findData(s.preview_kind)))

        self.remember_check = QCheckBox("Remember prompts (last prompt, prompt history, gallery search)")
        self.remember_check.setChecked(bool(s.remember_prompt))
        self.remember_check.setToolTip(
            "Off (the default): prompts are kept for this session only and never written to disk"
        )
        self.embed_check = QCheckBox("Write the prompt into saved PNGs")
        self.embed_check.setChecked(bool(s.embed_prompt_in_png))
        self.embed_check.setToolTip(
            "Off (the default): gallery PNGs carry the settings but not the prompt; anyone you share them with "
            "could read it otherwise"
        )

        form = QFormLayout()
        form.addRow("Data folder", data_row)
        form.addRow("", self.data_dir_note)
        form.addRow("Default server", self.server_combo)
        form.addRow("Preview", self.preview_combo)
        form.addRow("Prompts", self.remember_check)
        form.addRow("", self.embed_check)

        self.buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        self.buttons.accepted.connect(self._ok)
        self.buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addWidget(self.error_label)
        layout.addLayout(form)
        layout.addStretch(1)
        layout.addWidget(self.buttons)
        fit_to_width(self)

    def _browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Choose the data folder", self.data_dir_edit.text())
        if folder:
            self.data_dir_edit.setText(folder)

    def apply(self) -> bool:
        """Store the choices; False (message shown, nothing half-stored in the settings) when one is unusable."""
        text = self.data_dir_edit.text().strip()
        wanted = Path(text).expanduser().absolute() if text else None
        try:
            if wanted != self.data_dir_before:
                choose_data_dir(wanted, self.config)
                self.data_dir_before = wanted
        except OSError as e:
            self.error_label.show_message(f"The data folder {text} cannot be used: {e.strerror or e}.", "error")
            return False
        s = self.services.settings
        s.selected_server = self.server_combo.currentData() or s.selected_server
        s.preview_kind = self.preview_combo.currentData()
        s.remember_prompt = self.remember_check.isChecked()
        s.embed_prompt_in_png = self.embed_check.isChecked()
        try:
            s.save()
        except Exception as e:  # noqa: BLE001 - a message in the dialog
            self.error_label.show_message(f"The preferences could not be saved: {error_text(e)}", "error")
            return False
        self.error_label.clear_message()
        return True

    def _ok(self) -> None:
        if self.apply():
            self.accept()
