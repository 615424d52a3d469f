"""The model manager: the embedded model and added diffusers folders, what each one is (native size, recommended
settings, which splits it supports), and which one the app starts with.

Validation and storage are desktop.core's (ModelLibrary, over hediff.common.models); this dialog shows and calls.
"""

from __future__ import annotations

from collections.abc import Callable

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from hediff.desktop.core.model_library import FAMILY_NAMES, ModelLibrary, describe
from hediff.desktop.ui.dialogs import MessageLabel, error_text
from hediff.desktop.ui.params_form import SPLIT_TIPS

_SPEC_ROLE = Qt.ItemDataRole.UserRole


class ModelManagerDialog(QDialog):
    defaultChanged = Signal(str)  # the new default model's spec
    modelsChanged = Signal()

    def __init__(self, services, parent: QWidget | None = None):
        super().__init__(parent)
        self.setWindowTitle("Models")
        self.setMinimumSize(720, 460)
        self.library = ModelLibrary(services.settings)
        self.ask_folder: Callable[[], str | None] = self._ask_folder
        self._problems: dict[str, str] = {}

        self.list = QListWidget()
        self.list.setMinimumWidth(220)
        self.list.currentItemChanged.connect(lambda *_: self._show_selected())
        self.add_button = QPushButton("Add folder…")
        self.add_button.setToolTip("A diffusers Stable Diffusion 1.x or 2.x folder (model_index.json, unet, vae, …)")
        self.add_button.clicked.connect(self._on_add)
        self.remove_button = QPushButton("Remove")
        self.remove_button.setToolTip("Forget this folder (its files stay where they are)")
        self.remove_button.clicked.connect(self.remove_selected)
        self.default_button = QPushButton("Set as default")
        self.default_button.setToolTip("The model the app starts with")
        self.default_button.clicked.connect(self.set_selected_default)
        left = QVBoxLayout()
        left.addWidget(self.list, 1)
        row = QHBoxLayout()
        row.addWidget(self.add_button)
        row.addWidget(self.remove_button)
        left.addLayout(row)
        left.addWidget(self.default_button)

        self.title = QLabel()
        self.title.setStyleSheet("font-weight: 600; font-size: 13pt;")
        self.path_label = QLabel()
        self.path_label.setWordWrap(True)
        self.path_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.family_label = QLabel()
        self.size_label = QLabel()
        self.recommended_label = QLabel()
        self.recommended_label.setWordWrap(True)
        details = QFormLayout()
        details.addRow("Folder", self.path_label)
        details.addRow("Family", self.family_label)
        details.addRow("Native size", self.size_label)
        details.addRow("Recommended", self.recommended_label)
        self.splits_table = QTableWidget(0, 3)
        self.splits_table.setHorizontalHeaderLabels(["Split", "Supported", "What runs here"])
        self.splits_table.verticalHeader().hide()
        self.splits_table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.splits_table.horizontalHeader().setStretchLastSection(True)
        self.splits_table.setWordWrap(True)
        # the notes column gets its width only once laid out: rows follow, so whole sentences show
        self.splits_table.horizontalHeader().sectionResized.connect(lambda *_: self.splits_table.resizeRowsToContents())
        self.problem_label = MessageLabel(self)
        right = QVBoxLayout()
        right.addWidget(self.title)
        right.addLayout(details)
        right.addWidget(QLabel("Splits its UNet supports"))
        right.addWidget(self.splits_table, 1)
        right.addWidget(self.problem_label)

        body = QHBoxLayout()
        body.addLayout(left)
        body.addLayout(right, 1)
        self.result_label = MessageLabel(self)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addLayout(body, 1)
        layout.addWidget(self.result_label)
        layout.addWidget(buttons)
        self.refresh()

    def resizeEvent(self, event) -> None:
        super().resizeEvent(event)
        # the notes column has its width only once laid out: rows follow it, so whole sentences show
        QTimer.singleShot(0, self, self.splits_table.resizeRowsToContents)

    # --- listing ---

    def refresh(self, select: str | None = None) -> None:
        keep = select or self.selected_spec() or self.library.default
        self.list.blockSignals(True)
        self.list.clear()
        for spec in self.library.specs():
            item = QListWidgetItem(self._item_text(spec))
            item.setData(_SPEC_ROLE, spec)
            item.setToolTip(spec)
            self.list.addItem(item)
            if spec == keep:
                self.list.setCurrentItem(item)
        self.list.blockSignals(False)
        if self.list.currentItem() is None and self.list.count():
            self.list.setCurrentRow(0)
        self._show_selected()

    def _item_text(self, spec: str) -> str:
        name = "Embedded model" if spec == "embedded" else spec.rstrip("/").rsplit("/", 1)[-1]
        return name + ("  (default)" if spec == self.library.default else "")

    def specs(self) -> list[str]:
        return [self.list.item(i).data(_SPEC_ROLE) for i in range(self.list.count())]

    def item_texts(self) -> list[str]:
        return [self.list.item(i).text() for i in range(self.list.count())]

    def selected_spec(self) -> str | None:
        item = self.list.currentItem()
        return item.data(_SPEC_ROLE) if item is not None else None

    def select(self, spec: str) -> None:
        for i in range(self.list.count()):
            if self.list.item(i).data(_SPEC_ROLE) == spec:
                self.list.setCurrentRow(i)

    def _show_selected(self) -> None:
        spec = self.selected_spec()
        self.remove_button.setEnabled(spec is not None and spec != "embedded")
        self.default_button.setEnabled(spec is not None and spec != self.library.default)
        self.splits_table.setRowCount(0)
        self.problem_label.clear_message()
        if spec is None:
            return
        self.path_label.setText(spec if spec != "embedded" else "ships with the app")
        try:
            info = describe(spec)
        except Exception as e:  # noqa: BLE001 - a folder that moved or broke: say so, keep the dialog usable
            self.title.setText(self._item_text(spec))
            for label in (self.family_label, self.size_label, self.recommended_label):
                label.setText("—")
            self.problem_label.show_message(f"This model cannot be used now: {error_text(e)}", "error")
            return
        self.title.setText(info.name + ("  (default)" if spec == self.library.default else ""))
        self.family_label.setText(FAMILY_NAMES.get(info.family, info.family))
        self.size_label.setText(f"{info.native_side} × {info.native_side} px (up to {info.max_side} px)")
        self.recommended_label.setText(
            ", ".join(f"{k} {v:g}" for k, v in info.recommended.items()) or "none: SD's defaults apply"
        )
        self.splits_table.setRowCount(len(info.splits))
        for row, (split, why) in enumerate(info.splits.items()):
            supported = QTableWidgetItem("yes" if why is None else "no")
            supported.setToolTip(why or "")
            self.splits_table.setItem(row, 0, QTableWidgetItem(split))
            self.splits_table.setItem(row, 1, supported)
            note = QTableWidgetItem(why or SPLIT_TIPS.get(split, ""))
            note.setToolTip(note.text())
            self.splits_table.setItem(row, 2, note)
        self.splits_table.resizeColumnToContents(0)
        self.splits_table.resizeColumnToContents(1)
        self.splits_table.resizeRowsToContents()  # the notes wrap: whole sentences, not "…"

    def split_rows(self) -> list[tuple[str, str]]:
        return [
            (self.splits_table.item(r, 0).text(), self.splits_table.item(r, 1).text())
            for r in range(self.splits_table.rowCount())
        ]

    # --- actions ---

    def add_folder(self, folder) -> bool:
        """Validate and add a diffusers folder; False (message shown) when it is not a usable model."""
        try:
            info = self.library.add(folder)
        except Exception as e:  # noqa: BLE001 - ModelError says what is wrong and what to do
            self.result_label.show_message(f"Not added: {error_text(e)}", "error")
            return False
        self.refresh(select=info.spec)
        self.result_label.show_message(f"Added {info.name}: {info.summary()}.", "ok")
        self.modelsChanged.emit()
        return True

    def remove_selected(self) -> bool:
        spec = self.selected_spec()
        if spec is None or spec == "embedded":
            return False
        was_default = spec == self.library.default
        self.library.remove(spec)
        self.refresh(select=self.library.default)
        self.result_label.show_message("Removed from the list; its files were not touched.", "ok")
        self.modelsChanged.emit()
        if was_default:
            self.defaultChanged.emit(self.library.default)
        return True

    def set_selected_default(self) -> bool:
        spec = self.selected_spec()
        if spec is None:
            return False
        self.library.set_default(spec)
        self.refresh(select=spec)
        self.result_label.show_message("The app starts with this model; the form now uses it.", "ok")
        self.defaultChanged.emit(spec)
        return True

    def _ask_folder(self) -> str | None:
        return QFileDialog.getExistingDirectory(self, "Add a diffusers model folder") or None

    def _on_add(self) -> None:
        folder = self.ask_folder()
        if folder:
            self.add_folder(folder)
