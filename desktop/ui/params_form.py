"""The generation settings form: prompt, sampling, size, encryption, split, model and server."""

from __future__ import annotations

import dataclasses
import random

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QSizePolicy,
    QSpinBox,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

SEED_MAX = 2**31 - 1
ENCRYPTION_LABELS = {
    "full": "Full: encrypt the whole latent",
    "min-distortion": "Min-distortion: encrypt a selection",
    "random-mask": "Random mask: encrypt a fixed random share",
    "none": "None: plaintext baseline",
}
SPLIT_TIPS = {
    "conv_in": "The paper's split: only conv_in runs here; the server can invert its output to the latent",
    "down0.resnet0": "conv_in and the first resnet run here; the server still receives conv_in's output",
    "u1": "U-shaped: the first and last UNet blocks run here; the latent and noise prediction never leave",
    "u2": "U-shaped, deeper: the first and last two UNet blocks run here (models with 3 or more blocks)",
}


def _choices():
    from hediff.common import he
    from hediff.common.schedulers import SCHEDULER_NAMES
    from hediff.common.split import SPLIT_POINTS

    return SCHEDULER_NAMES, {name: p.description for name, p in he.PRESETS.items()}, SPLIT_POINTS


def _u_shaped(split: str) -> bool:
    from hediff.common.split import U_SPLITS

    return split in U_SPLITS


def _defaults():
    from hediff.desktop.core.engine import GenerationParams

    return GenerationParams(prompt="")


class _PromptEdit(QPlainTextEdit):
    """A plain-text prompt box that is as tall as ``lines`` lines and submits on Ctrl+Enter."""

    submitted = Signal()

    def __init__(self, placeholder: str, lines: int):
        super().__init__()
        self.setPlaceholderText(placeholder)
        self.setTabChangesFocus(True)
        h = self.fontMetrics().lineSpacing() * lines + 14
        self.setFixedHeight(h)

    def keyPressEvent(self, event) -> None:
        if event.key() in (Qt.Key.Key_Return, Qt.Key.Key_Enter) and event.modifiers() & (
            Qt.KeyboardModifier.ControlModifier | Qt.KeyboardModifier.MetaModifier
        ):
            self.submitted.emit()
            return
        super().keyPressEvent(event)


class ParamsForm(QWidget):
    """``params()`` builds a GenerationParams from the fields; ``set_params`` / ``load_dict`` fill them."""

    generateRequested = Signal()  # Ctrl+Enter in a prompt box
    serverChanged = Signal(str)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        schedulers, presets, splits = _choices()
        d = _defaults()
        self._activation_dtype = d.activation_dtype
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.setSpacing(8)

        # prompt
        prompt_box = QGroupBox("Prompt")
        pl = QVBoxLayout(prompt_box)
        self.prompt_edit = _PromptEdit("Describe the image…", 3)
        self.prompt_edit.setAccessibleName("Prompt")
        self.negative_edit = _PromptEdit("Negative prompt (optional): what to avoid", 2)
        self.negative_edit.setAccessibleName("Negative prompt")
        self.prompt_edit.submitted.connect(self.generateRequested)
        self.negative_edit.submitted.connect(self.generateRequested)
        pl.addWidget(self.prompt_edit)
        pl.addWidget(self.negative_edit)
        outer.addWidget(prompt_box)

        # sampling
        sampling = QGroupBox("Sampling")
        sf = self._form(sampling)
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(1, 1000)
        self.steps_spin.setValue(d.steps)
        self.guidance_spin = QDoubleSpinBox()
        self.guidance_spin.setRange(0.0, 50.0)
        self.guidance_spin.setSingleStep(0.5)
        self.guidance_spin.setDecimals(1)
        self.guidance_spin.setValue(d.guidance)
        row = QHBoxLayout()
        row.addWidget(self.steps_spin, 1)
        row.addWidget(QLabel("Guidance"))
        row.addWidget(self.guidance_spin, 1)
        sf.addRow("Steps", row)
        self.scheduler_combo = QComboBox()
        self.scheduler_combo.addItems(list(schedulers))
        self._set_combo_text(self.scheduler_combo, d.scheduler)
        sf.addRow("Scheduler", self.scheduler_combo)
        self.seed_spin = QSpinBox()
        self.seed_spin.setRange(0, SEED_MAX)
        self.seed_spin.setValue(d.seed)
        self.seed_random_button = QToolButton()
        self.seed_random_button.setText("New")
        self.seed_random_button.setToolTip("Pick a new random seed")
        self.seed_random_button.clicked.connect(self.randomise_seed)
        self.seed_lock_check = QCheckBox("Keep")
        self.seed_lock_check.setToolTip("Keep this seed; otherwise every Generate picks a new random seed")
        row = QHBoxLayout()
        row.addWidget(self.seed_spin, 1)
        row.addWidget(self.seed_random_button)
        row.addWidget(self.seed_lock_check)
        sf.addRow("Seed", row)
        self.width_spin = self._size_spin(d.width)
        self.height_spin = self._size_spin(d.height)
        row = QHBoxLayout()
        row.addWidget(self.width_spin, 1)
        row.addWidget(QLabel("×"))
        row.addWidget(self.height_spin, 1)
        row.addWidget(QLabel("px"))
        sf.addRow("Size", row)
        outer.addWidget(sampling)

        # privacy
        privacy = QGroupBox("Encryption")
        ef = self._form(privacy)
        self.encryption_combo = QComboBox()
        for mode, label in ENCRYPTION_LABELS.items():
            self.encryption_combo.addItem(label, mode)
        self.encryption_combo.currentIndexChanged.connect(self._encryption_changed)
        ef.addRow("Mode", self.encryption_combo)
        self.tau_spin = QDoubleSpinBox()
        self.tau_spin.setRange(0.0, 1.0)
        self.tau_spin.setDecimals(3)
        self.tau_spin.setSingleStep(0.05)
        self.tau_spin.setValue(d.tau)
        self.tau_spin.setToolTip("Min-distortion budget: smaller encrypts more of the latent")
        self.preset_combo = QComboBox()
        for name, description in presets.items():
            self.preset_combo.addItem(name, name)
            self.preset_combo.setItemData(self.preset_combo.count() - 1, description, Qt.ItemDataRole.ToolTipRole)
        self._set_combo_data(self.preset_combo, d.he_preset)
        self.fraction_spin = QDoubleSpinBox()
        self.fraction_spin.setRange(0.0, 1.0)
        self.fraction_spin.setDecimals(3)
        self.fraction_spin.setSingleStep(0.05)
        self.fraction_spin.setValue(d.mask_fraction)
        self.fraction_spin.setToolTip("Random mask: the share of the latent that is encrypted")
        row = QHBoxLayout()
        row.addWidget(QLabel("τ"))
        row.addWidget(self.tau_spin, 1)
        row.addWidget(QLabel("Share"))
        row.addWidget(self.fraction_spin, 1)
        row.addWidget(QLabel("Preset"))
        row.addWidget(self.preset_combo, 1)
        ef.addRow("", row)
        self.split_combo = QComboBox()
        for name in splits:
            self.split_combo.addItem(name)
            self.split_combo.setItemData(
                self.split_combo.count() - 1, SPLIT_TIPS.get(name, ""), Qt.ItemDataRole.ToolTipRole
            )
        self.split_combo.setToolTip("Which UNet layers run on this machine; U-shaped splits keep the latent here")
        self._set_combo_text(self.split_combo, d.split)
        self.split_combo.currentIndexChanged.connect(self._encryption_changed)
        ef.addRow("Split", self.split_combo)
        outer.addWidget(privacy)

        # backend
        backend = QGroupBox("Backend")
        bf = self._form(backend)
        self.server_combo = QComboBox()
        self.server_combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.server_combo.currentIndexChanged.connect(lambda _i: self.serverChanged.emit(self.server_id() or ""))
        bf.addRow("Server", self.server_combo)
        self.model_combo = QComboBox()
        self.model_combo.setEditable(True)
        self.model_combo.addItem("embedded")
        self.model_combo.setToolTip("'embedded', a diffusers model folder, or a hub id; the server must use the same")
        self.model_combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.model_browse = QToolButton()
        self.model_browse.setText("…")
        self.model_browse.setToolTip("Choose a model folder")
        self.model_browse.clicked.connect(self._browse_model)
        row = QHBoxLayout()
        row.addWidget(self.model_combo, 1)
        row.addWidget(self.model_browse)
        bf.addRow("Model", row)
        outer.addWidget(backend)
        outer.addStretch(1)
        self._encryption_changed()

    # --- construction helpers ---

    @staticmethod
    def _form(box: QGroupBox) -> QFormLayout:
        form = QFormLayout(box)
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        form.setLabelAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        return form

    @staticmethod
    def _size_spin(value: int) -> QSpinBox:
        spin = QSpinBox()
        spin.setRange(0, 4096)
        spin.setSingleStep(8)
        spin.setSpecialValueText("native")  # 0: the model's own size
        spin.setValue(value)
        spin.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        return spin

    @staticmethod
    def _set_combo_text(combo: QComboBox, text: str) -> bool:
        i = combo.findText(str(text))
        if i >= 0:
            combo.setCurrentIndex(i)
        return i >= 0

    @staticmethod
    def _set_combo_data(combo: QComboBox, data) -> bool:
        i = combo.findData(data)
        if i >= 0:
            combo.setCurrentIndex(i)
        return i >= 0

    def _encryption_changed(self, *_args) -> None:
        # a U-shaped split never sends the latent: there is nothing to encrypt or select
        latent_sent = not _u_shaped(self.split_combo.currentText())
        mode = self.encryption_combo.currentData()
        self.encryption_combo.setEnabled(latent_sent)
        self.tau_spin.setEnabled(latent_sent and mode == "min-distortion")
        self.fraction_spin.setEnabled(latent_sent and mode == "random-mask")
        self.preset_combo.setEnabled(latent_sent and mode != "none")

    def _browse_model(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Choose a diffusers model folder")
        if folder:
            self.set_model(folder)

    # --- seed ---

    @property
    def seed_locked(self) -> bool:
        return self.seed_lock_check.isChecked()

    def randomise_seed(self) -> int:
        seed = random.randrange(SEED_MAX)
        self.seed_spin.setValue(seed)
        return seed

    def after_submit(self) -> None:
        """A job was queued with the current settings: move to a new seed unless the user keeps it."""
        if not self.seed_locked:
            self.randomise_seed()

    # --- params ---

    def params(self):
        """The fields as a GenerationParams (not validated: call ``.validate()``)."""
        from hediff.desktop.core.engine import GenerationParams

        return GenerationParams(
            prompt=self.prompt_edit.toPlainText().strip(),
            negative_prompt=self.negative_edit.toPlainText().strip(),
            steps=self.steps_spin.value(),
            guidance=float(self.guidance_spin.value()),
            seed=self.seed_spin.value(),
            width=self.width_spin.value(),
            height=self.height_spin.value(),
            scheduler=self.scheduler_combo.currentText(),
            encryption="none" if _u_shaped(self.split_combo.currentText()) else self.encryption_combo.currentData(),
            tau=float(self.tau_spin.value()),
            mask_fraction=float(self.fraction_spin.value()),
            he_preset=self.preset_combo.currentData(),
            split=self.split_combo.currentText(),
            activation_dtype=self._activation_dtype,
        )

    def set_params(self, params) -> None:
        """Fill every field from a GenerationParams (e.g. "load settings" from the gallery); keeps its seed."""
        self.load_dict(dataclasses.asdict(params))
        self.seed_lock_check.setChecked(True)

    def to_dict(self, include_prompt: bool = False) -> dict:
        d = dataclasses.asdict(self.params())
        if not include_prompt:
            d.pop("prompt", None)
            d.pop("negative_prompt", None)
        return d

    @staticmethod
    def model_defaults(model: str) -> dict:
        """The settings a model folder recommends (its hediff.json), e.g. the embedded model's guidance 2."""
        from hediff.common.models import recommended_settings_for

        return recommended_settings_for(model)

    def load_dict(self, d: dict) -> None:
        """Fill the fields present in ``d``; unknown keys and unusable values are ignored."""
        if not isinstance(d, dict):
            return

        def num(key, cast):
            try:
                return cast(d[key])
            except (KeyError, TypeError, ValueError):
                return None

        if isinstance(d.get("prompt"), str):
            self.prompt_edit.setPlainText(d["prompt"])
        if isinstance(d.get("negative_prompt"), str):
            self.negative_edit.setPlainText(d["negative_prompt"])
        for key, spin, cast in (
            ("steps", self.steps_spin, int),
            ("seed", self.seed_spin, int),
            ("width", self.width_spin, int),
            ("height", self.height_spin, int),
            ("guidance", self.guidance_spin, float),
            ("tau", self.tau_spin, float),
            ("mask_fraction", self.fraction_spin, float),
        ):
            value = num(key, cast)
            if value is not None:
                spin.setValue(value)
        if isinstance(d.get("scheduler"), str):
            self._set_combo_text(self.scheduler_combo, d["scheduler"])
        if isinstance(d.get("encryption"), str):
            self._set_combo_data(self.encryption_combo, d["encryption"])
        if isinstance(d.get("he_preset"), str):
            self._set_combo_data(self.preset_combo, d["he_preset"])
        if isinstance(d.get("split"), str):
            self._set_combo_text(self.split_combo, d["split"])
        if isinstance(d.get("activation_dtype"), str):
            self._activation_dtype = d["activation_dtype"]
        self._encryption_changed()

    # --- model and server ---

    def model(self) -> str:
        return self.model_combo.currentText().strip() or "embedded"

    def set_model(self, model: str) -> None:
        model = str(model)
        if self.model_combo.findText(model) < 0:
            self.model_combo.addItem(model)
        self._set_combo_text(self.model_combo, model)
        self.model_combo.setToolTip(model)

    def set_servers(self, servers, selected: str | None = None) -> None:
        """Fill the chooser from settings.servers, keeping ``selected`` (or the current choice) when it exists."""
        keep = selected if selected is not None else self.server_id()
        self.server_combo.blockSignals(True)
        self.server_combo.clear()
        for server in servers:
            where = "on this machine" if server.local else server.url
            self.server_combo.addItem(server.name, server.id)
            self.server_combo.setItemData(self.server_combo.count() - 1, where, Qt.ItemDataRole.ToolTipRole)
        if keep is not None:
            self._set_combo_data(self.server_combo, keep)
        self.server_combo.blockSignals(False)
        self.serverChanged.emit(self.server_id() or "")

    def server_id(self) -> str | None:
        data = self.server_combo.currentData()
        return str(data) if data is not None else None

    def select_server(self, server_id: str) -> bool:
        return self._set_combo_data(self.server_combo, server_id)
