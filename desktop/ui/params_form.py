"""The generation settings form: prompt, sampling, size, count, image to image, LoRAs, encryption, split, model and
server.

Ranges, choices, defaults and tooltips come from the settings model (common.settings), so the form cannot
produce settings that the model, or the server whose limits it was given, refuses.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

from PySide6.QtCore import QSize, Qt, Signal
from PySide6.QtGui import QPixmap
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QFrame,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QMenu,
    QPlainTextEdit,
    QPushButton,
    QSizePolicy,
    QSpinBox,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from hediff.common import settings as gs
from hediff.desktop.ui.dialogs import MessageLabel, dim

U_SPLIT_ENCRYPTION_TEXT = "none (latent stays here)"
ENCRYPTION_LABELS = {
    gs.Encryption.FULL: "Full: encrypt the whole latent",
    gs.Encryption.MIN_DISTORTION: "Min-distortion: encrypt a selection",
    gs.Encryption.RANDOM_MASK: "Random mask: encrypt a fixed random share",
    gs.Encryption.NONE: "None: plaintext baseline",
}
SPLIT_TIPS = {
    "conv_in": "The paper's split: only conv_in runs here; the server can invert its output to the latent",
    "down0.resnet0": "conv_in and the first resnet run here; the server still receives conv_in's output",
    "u1": "U-shaped: the first and last UNet blocks run here; the latent and noise prediction never leave",
    "u2": "U-shaped, deeper: the first and last two UNet blocks run here (models with 3 or more blocks)",
    "u3": "U-shaped, deepest: every down and up block runs here; the server runs only the middle block",
}


def _preset_descriptions() -> dict[str, str]:
    from hediff.common import he

    return {name: he.PRESETS[name].description for name in gs.choices("he_preset")}


def _spin(name: str, spin: QSpinBox | QDoubleSpinBox) -> QSpinBox | QDoubleSpinBox:
    """A spin box with the field's range, default and help."""
    spin.setRange(*gs.bounds(name))
    spin.setValue(gs.default(name))
    spin.setToolTip(gs.help_text(name)[:1].upper() + gs.help_text(name)[1:])
    return spin


INIT_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
INIT_THUMB = 64
LORA_SCALE_RANGE = (-10.0, 10.0)  # diffusers takes any scale; far beyond 1 a LoRA only breaks the image


def _image_paths(mime) -> list[Path]:
    """The local PNG / JPEG files a drop carries."""
    if not mime.hasUrls():
        return []
    return [
        Path(u.toLocalFile())
        for u in mime.urls()
        if u.isLocalFile() and u.toLocalFile().lower().endswith(INIT_IMAGE_SUFFIXES)
    ]


class _InitImageThumb(QLabel):
    """The init image's thumbnail; a PNG or JPEG dropped on it becomes the init image."""

    dropped = Signal(str)

    def __init__(self):
        super().__init__()
        self.setFixedSize(INIT_THUMB, INIT_THUMB)
        self.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.setWordWrap(True)
        self.setFrameShape(QLabel.Shape.StyledPanel)
        self.setAcceptDrops(True)
        self.setAccessibleName("Init image")
        self.show_empty()

    def show_empty(self, text: str = "Drop a picture") -> None:
        self.setPixmap(QPixmap())
        self.setText(text)

    def dragEnterEvent(self, event) -> None:
        if _image_paths(event.mimeData()):
            event.acceptProposedAction()
        else:
            event.ignore()

    def dropEvent(self, event) -> None:
        paths = _image_paths(event.mimeData())
        if paths:
            event.acceptProposedAction()
            self.dropped.emit(str(paths[0]))


class _LoraRow(QWidget):
    """One LoRA of the list: its folder's name, its scale, a remove button."""

    removed = Signal(object)

    def __init__(self, path: str, scale: float, problem: str = ""):
        super().__init__()
        self.path = path
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        self.name_label = QLabel(Path(path).name or path)
        self.name_label.setToolTip(f"{path}\n{problem}" if problem else path)
        self.name_label.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        if problem:
            self.name_label.setText(f"{self.name_label.text()} (not usable)")
            self.name_label.setStyleSheet("color: #b00020;")
        self.scale_spin = QDoubleSpinBox()
        self.scale_spin.setRange(*LORA_SCALE_RANGE)
        self.scale_spin.setDecimals(3)
        self.scale_spin.setSingleStep(0.05)
        self.scale_spin.setValue(scale)
        # the scale exactly as the settings gave it until the user changes it: the server's digest covers it, so
        # a rounded 0.3333 would be another LoRA to it
        self.scale = float(scale)
        self.scale_spin.valueChanged.connect(lambda value: setattr(self, "scale", float(value)))
        self.scale_spin.setToolTip("The scale this LoRA is applied at, on this machine and on the server alike")
        self.scale_spin.setAccessibleName(f"Scale of {self.name_label.text()}")
        self.remove_button = QToolButton()
        self.remove_button.setText("✕")
        self.remove_button.setToolTip(f"Remove the LoRA {Path(path).name or path}")
        self.remove_button.setAccessibleName("Remove LoRA")
        self.remove_button.clicked.connect(lambda: self.removed.emit(self))
        row.addWidget(self.name_label, 1)
        row.addWidget(QLabel("Scale"))
        row.addWidget(self.scale_spin)
        row.addWidget(self.remove_button)

    def entry(self) -> str:
        """``DIR:SCALE``, as the settings hold it."""
        short = f"{self.scale:g}"
        return f"{self.path}:{short if float(short) == self.scale else repr(self.scale)}"  # exact, and short


def _shorten(name: str, most: int = 18) -> str:
    """A file name that fits a header: its start and its end (the suffix) around an ellipsis."""
    if len(name) <= most:
        return name
    half = (most - 1) // 2
    return f"{name[:half]}…{name[-half:]}"


def _section_body() -> QFrame:
    body = QFrame()
    body.setFrameShape(QFrame.Shape.StyledPanel)
    return body


def _section_toggle(text: str) -> QToolButton:
    """The header of a section that folds away (InvokeAI's accordions): the form fits a small window closed."""
    button = QToolButton()
    button.setCheckable(True)
    button.setArrowType(Qt.ArrowType.RightArrow)
    button.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
    # what the header names (a picture's file) never widens the form: the two headers share its width
    button.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Fixed)
    button.setMinimumWidth(1)
    button.setText(text)
    button.setFixedHeight(QComboBox().sizeHint().height())  # as tall as the form's other rows
    button.toggled.connect(lambda on: button.setArrowType(Qt.ArrowType.DownArrow if on else Qt.ArrowType.RightArrow))
    return button


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
    initImageChanged = Signal(str)  # the init image's path; "" for text to image

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        d = gs.GenerationSettings()
        self._activation_dtype = d.activation_dtype
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        # 4 px around the folded sections' one row, 6 between groups (whose titles separate them): closed, the
        # form fits a 1024x700 window without scrolling
        outer.setSpacing(4)

        # prompt
        prompt_box = QGroupBox("Prompt")
        pl = QVBoxLayout(prompt_box)
        self.prompt_edit = _PromptEdit("Describe the image…", 3)
        self.prompt_edit.setAccessibleName("Prompt")
        self.negative_edit = _PromptEdit("Negative prompt (optional): what to avoid", 2)
        self.negative_edit.setAccessibleName("Negative prompt")
        self.prompt_edit.submitted.connect(self.generateRequested)
        self.negative_edit.submitted.connect(self.generateRequested)
        self.history_button = QToolButton()
        self.history_button.setText("▾")
        self.history_button.setToolTip("Recent prompts")
        self.history_button.setAccessibleName("Recent prompts")
        self.history_button.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)
        self.history_menu = QMenu(self.history_button)
        self.history_button.setMenu(self.history_menu)
        self.set_history([])
        prompt_row = QHBoxLayout()
        prompt_row.setSpacing(4)
        prompt_row.addWidget(self.prompt_edit, 1)
        prompt_row.addWidget(self.history_button, 0, Qt.AlignmentFlag.AlignTop)
        pl.addLayout(prompt_row)
        pl.addWidget(self.negative_edit)
        outer.addWidget(prompt_box)
        outer.addSpacing(2)

        # sampling
        sampling = QGroupBox("Sampling")
        sf = self._form(sampling)
        self.steps_spin = _spin("steps", QSpinBox())
        self.guidance_spin = QDoubleSpinBox()
        self.guidance_spin.setSingleStep(0.5)
        self.guidance_spin.setDecimals(1)
        _spin("guidance", self.guidance_spin)
        self.count_spin = _spin("count", QSpinBox())
        self.count_spin.setAccessibleName("Images")
        row = QHBoxLayout()
        row.addWidget(self.steps_spin, 1)
        row.addWidget(QLabel("Guidance"))
        row.addWidget(self.guidance_spin, 1)
        row.addWidget(QLabel("Images"))
        row.addWidget(self.count_spin, 1)
        sf.addRow("Steps", row)
        self.scheduler_combo = QComboBox()
        self.scheduler_combo.addItems(list(gs.choices("scheduler")))
        self._set_combo_text(self.scheduler_combo, d.scheduler)
        sf.addRow("Scheduler", self.scheduler_combo)
        self.seed_spin = _spin("seed", QSpinBox())
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
        self.width_spin = self._size_spin("width")
        self.height_spin = self._size_spin("height")
        row = QHBoxLayout()
        row.addWidget(self.width_spin, 1)
        row.addWidget(QLabel("×"))
        row.addWidget(self.height_spin, 1)
        row.addWidget(QLabel("px"))
        sf.addRow("Size", row)
        outer.addWidget(sampling)
        outer.addWidget(self._build_extras())

        # privacy
        privacy = QGroupBox("Encryption")
        ef = self._form(privacy)
        self.encryption_combo = QComboBox()
        for mode in gs.choices("encryption"):
            self.encryption_combo.addItem(ENCRYPTION_LABELS[mode], mode)
        self.encryption_combo.setToolTip(gs.help_text("encryption"))
        self.encryption_combo.currentIndexChanged.connect(self._encryption_changed)
        ef.addRow("Mode", self.encryption_combo)
        self.tau_spin = QDoubleSpinBox()
        self.tau_spin.setDecimals(3)
        self.tau_spin.setSingleStep(0.05)
        _spin("tau", self.tau_spin)
        self.preset_combo = QComboBox()
        for name, description in _preset_descriptions().items():
            self.preset_combo.addItem(name, name)
            self.preset_combo.setItemData(self.preset_combo.count() - 1, description, Qt.ItemDataRole.ToolTipRole)
        self._set_combo_data(self.preset_combo, d.he_preset)
        self.fraction_spin = QDoubleSpinBox()
        self.fraction_spin.setDecimals(3)
        self.fraction_spin.setSingleStep(0.05)
        _spin("mask_fraction", self.fraction_spin)
        row = QHBoxLayout()
        row.addWidget(QLabel("τ"))
        row.addWidget(self.tau_spin, 1)
        row.addWidget(QLabel("Share"))
        row.addWidget(self.fraction_spin, 1)
        row.addWidget(QLabel("Preset"))
        row.addWidget(self.preset_combo, 1)
        ef.addRow("", row)
        self.split_combo = QComboBox()
        for name in gs.choices("split"):
            self.split_combo.addItem(name)
            self.split_combo.setItemData(
                self.split_combo.count() - 1, SPLIT_TIPS.get(name, ""), Qt.ItemDataRole.ToolTipRole
            )
        self.split_combo.setToolTip("Which UNet layers run on this machine; U-shaped splits keep the latent here")
        self._set_combo_text(self.split_combo, d.split)
        self.split_combo.currentIndexChanged.connect(self._encryption_changed)
        ef.addRow("Split", self.split_combo)
        outer.addWidget(privacy)
        outer.addSpacing(2)

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
        # a model's recommendations (its hediff.json) fill the fields the user has not set by hand this session
        self._user_set: set[str] = set()
        self._filling = False
        for name, signal in (
            ("steps", self.steps_spin.valueChanged),
            ("guidance", self.guidance_spin.valueChanged),
            ("scheduler", self.scheduler_combo.currentIndexChanged),
            ("width", self.width_spin.valueChanged),
            ("height", self.height_spin.valueChanged),
        ):
            signal.connect(lambda *_args, name=name: self._filling or self._user_set.add(name))
        self.model_combo.activated.connect(lambda _i: self.set_model(self.model_combo.currentText()))
        self.model_combo.lineEdit().editingFinished.connect(lambda: self.set_model(self.model()))

    def _build_extras(self) -> QWidget:
        """Image to image and LoRAs: two sections that fold away, side by side while closed."""
        extras = QWidget()
        layout = QVBoxLayout(extras)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(4)
        self.init_toggle = _section_toggle("Image to image")
        self.lora_toggle = _section_toggle("LoRA")
        headers = QHBoxLayout()
        headers.setSpacing(4)
        headers.addWidget(self.init_toggle)
        headers.addWidget(self.lora_toggle)
        layout.addLayout(headers)

        # image to image: the picture is read and encoded here; the privacy line says what the split sends
        self.init_box = _section_body()
        il = QHBoxLayout(self.init_box)
        self.init_thumb = _InitImageThumb()
        self.init_thumb.setToolTip("Drop a PNG or JPEG here. " + gs.help_text("init_image").capitalize())
        self.init_thumb.dropped.connect(self.choose_init_image)
        il.addWidget(self.init_thumb, 0, Qt.AlignmentFlag.AlignTop)
        side = QVBoxLayout()
        self.init_name = QLabel("No picture: the image starts from noise")
        self.init_name.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        dim(self.init_name)
        self.init_choose = QPushButton("Choose…")
        self.init_choose.setToolTip("Pick a PNG or JPEG to start from")
        self.init_choose.clicked.connect(self._browse_init_image)
        self.init_clear = QPushButton("Clear")
        self.init_clear.setToolTip("Start from noise again (text to image)")
        self.init_clear.clicked.connect(lambda: self.set_init_image(""))
        self.strength_spin = QDoubleSpinBox()
        self.strength_spin.setDecimals(2)
        self.strength_spin.setSingleStep(0.05)
        _spin("strength", self.strength_spin)
        self.strength_spin.setAccessibleName("Strength")
        buttons = QHBoxLayout()
        buttons.addWidget(self.init_choose)
        buttons.addWidget(self.init_clear)
        strength = QHBoxLayout()
        strength.addWidget(QLabel("Strength"))
        strength.addWidget(self.strength_spin, 1)
        side.addWidget(self.init_name)
        side.addLayout(buttons)
        side.addLayout(strength)
        il.addLayout(side, 1)
        layout.addWidget(self.init_box)
        self.init_message = MessageLabel()
        layout.addWidget(self.init_message)

        # LoRAs: DIR:SCALE entries, checked when added (the weights are read where the model loads)
        self.lora_box = _section_body()
        self.lora_layout = QVBoxLayout(self.lora_box)
        self.lora_layout.setSpacing(2)
        self.lora_empty = QLabel("No LoRA: the model's own weights")
        dim(self.lora_empty)
        self.lora_layout.addWidget(self.lora_empty)
        self.lora_add = QPushButton("Add LoRA folder…")
        self.lora_add.setToolTip(gs.help_text("lora").capitalize())
        self.lora_add.clicked.connect(self._browse_lora)
        self.lora_layout.addWidget(self.lora_add)
        self.lora_message = MessageLabel()
        self.lora_layout.addWidget(self.lora_message)
        layout.addWidget(self.lora_box)
        self._lora_rows: list[_LoraRow] = []

        self.init_box.setVisible(False)
        self.lora_box.setVisible(False)
        self.init_toggle.toggled.connect(self.init_box.setVisible)
        self.lora_toggle.toggled.connect(self.lora_box.setVisible)
        self._init_image = ""
        self.set_init_image("")
        self._update_lora_header()
        return extras

    # --- construction helpers ---

    @staticmethod
    def _form(box: QGroupBox) -> QFormLayout:
        form = QFormLayout(box)
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        form.setLabelAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        return form

    @staticmethod
    def _size_spin(name: str) -> QSpinBox:
        spin = _spin(name, QSpinBox())
        spin.setSingleStep(gs.SIZE_MULTIPLE)
        spin.setSpecialValueText("native")  # 0: the model's own size
        spin.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        spin.setKeyboardTracking(False)  # snap once the number is typed, not at every digit
        spin.valueChanged.connect(lambda value: ParamsForm._snap(spin, value))
        return spin

    @staticmethod
    def _snap(spin: QSpinBox, value: int) -> None:
        # a size the model cannot use is never held: it moves to the nearest multiple the server accepts
        multiple = spin.singleStep()
        if value % multiple:
            spin.setValue((value + multiple // 2) // multiple * multiple)

    def native_side(self) -> int | None:
        """The chosen model's native image side, once its config or server has told; None before."""
        return getattr(self, "_native_side", None)

    def set_size_limits(self, limits: gs.SizeLimits) -> None:
        """Cap the size fields at what this model on this server accepts (e.g. from the server's capabilities)."""
        self._native_side = limits.native_side
        for spin in (self.width_spin, self.height_spin):
            spin.setMaximum(limits.max_side)
            spin.setSingleStep(limits.multiple)
            spin.setToolTip(
                f"Pixels, a multiple of {limits.multiple} up to {limits.max_side}; 'native': {limits.native_side}"
            )

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
        latent_sent = self.split_combo.currentText() not in gs.U_SPLITS
        combo = self.encryption_combo
        combo.blockSignals(True)
        if not latent_sent and combo.currentIndex() >= 0:
            # show what happens (nothing is encrypted) instead of a mode that does not apply; keep the choice
            self._encryption_index = combo.currentIndex()
            combo.setPlaceholderText(U_SPLIT_ENCRYPTION_TEXT)
            combo.setCurrentIndex(-1)
        elif latent_sent and combo.currentIndex() < 0:
            combo.setCurrentIndex(getattr(self, "_encryption_index", 0))
        combo.blockSignals(False)
        mode = combo.currentData()
        self.encryption_combo.setEnabled(latent_sent)
        self.tau_spin.setEnabled(latent_sent and mode == "min-distortion")
        self.fraction_spin.setEnabled(latent_sent and mode == "random-mask")
        self.preset_combo.setEnabled(latent_sent and mode != "none")

    def _browse_model(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Choose a diffusers model folder")
        if folder:
            self.set_model(folder)

    # --- image to image ---

    def init_image(self) -> str:
        return self._init_image

    def choose_init_image(self, path: str) -> bool:
        """Make the picture at ``path`` the init image if it can be read (a message says why not); True if so."""
        from hediff.common.img2img import InitImageError, load_init_image

        try:
            image = load_init_image(path)
        except InitImageError as e:
            self.init_message.show_message(f"Not used: {e}", "error")
            return False
        self.set_init_image(str(path), image)
        self.init_toggle.setChecked(True)
        return True

    def set_init_image(self, path: str, image=None) -> None:
        """Show ``path`` as the init image ("": none). Settings being loaded name a file that may be gone since:
        it stays chosen, marked missing, so the job says so instead of silently drawing from noise."""
        from hediff.desktop.ui.preview import pil_to_qimage

        self._init_image = str(path or "")
        self.init_message.clear_message()
        self.strength_spin.setEnabled(bool(self._init_image))
        self.init_clear.setEnabled(bool(self._init_image))
        if not self._init_image:
            self.init_thumb.show_empty()
            self.init_name.setText("No picture: the image starts from noise")
            self.init_name.setToolTip("")
            self.init_toggle.setText("Image to image")
            self.initImageChanged.emit("")
            return
        name = Path(self._init_image).name
        if image is None:
            from hediff.common.img2img import InitImageError, load_init_image

            try:
                image = load_init_image(self._init_image)
            except InitImageError:
                image = None
        if image is None:
            self.init_thumb.show_empty("missing")
            self.init_name.setText(f"{name} (missing)")
            self.init_message.show_message(f"The init image {self._init_image} cannot be read.", "warning")
        else:
            pixmap = QPixmap.fromImage(pil_to_qimage(image))
            self.init_thumb.setPixmap(
                pixmap.scaled(
                    QSize(INIT_THUMB - 4, INIT_THUMB - 4),
                    Qt.AspectRatioMode.KeepAspectRatio,
                    Qt.TransformationMode.SmoothTransformation,
                )
            )
            self.init_name.setText(f"{name}, {image.width}×{image.height}")
        self.init_name.setToolTip(self._init_image)
        self.init_toggle.setText(f"Image to image: {_shorten(name)}")
        self.initImageChanged.emit(self._init_image)

    def _browse_init_image(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Choose the picture to start from", "", "Pictures (*.png *.jpg *.jpeg)"
        )
        if path:
            self.choose_init_image(path)

    # --- LoRAs ---

    def add_lora(self, path: str, scale: float = 1.0) -> bool:
        """Add the LoRA folder (or .safetensors file) at ``path`` if it is one (a message says why not)."""
        from hediff.common.lora import LoraError, parse_loras

        path = str(path)
        if any(row.path == path for row in self._lora_rows):
            self.lora_message.show_message(f"{Path(path).name} is in the list already.", "error")
            return False
        try:
            parse_loras([path])
        except LoraError as e:
            self.lora_message.show_message(f"Not added: {e}", "error")
            return False
        self.lora_message.clear_message()
        self._add_lora_row(path, scale)
        self.lora_toggle.setChecked(True)
        return True

    def _add_lora_row(self, path: str, scale: float, problem: str = "") -> None:
        row = _LoraRow(path, scale, problem)
        row.removed.connect(self._remove_lora_row)
        self.lora_layout.insertWidget(self.lora_layout.indexOf(self.lora_add), row)
        self._lora_rows.append(row)
        self._update_lora_header()

    def _remove_lora_row(self, row: _LoraRow) -> None:
        self._lora_rows.remove(row)
        self.lora_layout.removeWidget(row)
        row.deleteLater()
        self.lora_message.clear_message()
        self._update_lora_header()

    def set_loras(self, entries) -> None:
        """The list from settings (``DIR[:SCALE]`` entries); one whose files are gone since stays, marked."""
        from hediff.common.lora import LoraError, parse_lora, parse_loras

        for row in list(self._lora_rows):
            self._remove_lora_row(row)
        for entry in entries:
            path, scale = parse_lora(entry)
            try:
                parse_loras([path])
                problem = ""
            except LoraError as e:
                problem = str(e)
            self._add_lora_row(path, scale, problem)

    def lora_entries(self) -> tuple[str, ...]:
        return tuple(row.entry() for row in self._lora_rows)

    def _update_lora_header(self) -> None:
        n = len(self._lora_rows)
        self.lora_empty.setVisible(n == 0)
        self.lora_toggle.setText("LoRA" if n == 0 else f"LoRA: {n}")

    def _browse_lora(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Choose a LoRA folder (pytorch_lora_weights.safetensors)")
        if folder:
            self.add_lora(folder)

    # --- prompt history ---

    def set_history(self, prompts: list[str]) -> None:
        """The recent prompts the ▾ button offers, newest first."""
        self.history_menu.clear()
        for prompt in prompts:
            shown = prompt if len(prompt) <= 70 else prompt[:69] + "…"
            action = self.history_menu.addAction(shown.replace("&", "&&"))
            action.setToolTip(prompt)
            action.triggered.connect(lambda _checked=False, p=prompt: self.prompt_edit.setPlainText(p))
        if not prompts:
            self.history_menu.addAction("No prompts yet this session").setEnabled(False)

    def history_prompts(self) -> list[str]:
        return [a.toolTip() for a in self.history_menu.actions() if a.isEnabled()]

    # --- seed ---

    @property
    def seed_locked(self) -> bool:
        return self.seed_lock_check.isChecked()

    def randomise_seed(self) -> int:
        seed = random.randrange(gs.SEED_MAX)
        self.seed_spin.setValue(seed)
        return seed

    def after_submit(self) -> None:
        """A job was queued with the current settings: move to a new seed unless the user keeps it."""
        if not self.seed_locked:
            self.randomise_seed()

    # --- params ---

    def params(self) -> gs.GenerationSettings:
        """The fields as GenerationSettings (``.validate()`` checks that there is a prompt)."""
        return gs.GenerationSettings(
            prompt=self.prompt_edit.toPlainText().strip(),
            negative_prompt=self.negative_edit.toPlainText().strip(),
            steps=self.steps_spin.value(),
            guidance=float(self.guidance_spin.value()),
            seed=self.seed_spin.value(),
            width=self.width_spin.value(),
            height=self.height_spin.value(),
            scheduler=self.scheduler_combo.currentText(),
            encryption="none" if self.split_combo.currentText() in gs.U_SPLITS else self.encryption_combo.currentData(),
            tau=float(self.tau_spin.value()),
            mask_fraction=float(self.fraction_spin.value()),
            he_preset=self.preset_combo.currentData(),
            split=self.split_combo.currentText(),
            activation_dtype=self._activation_dtype,
            init_image=self._init_image,
            strength=float(self.strength_spin.value()),
            lora=self.lora_entries(),
            count=self.count_spin.value(),
        )

    def set_params(self, params: gs.GenerationSettings) -> None:
        """Fill every field from settings (e.g. "load settings" from the gallery); keeps their seed."""
        self._fill(params)
        self.seed_lock_check.setChecked(True)

    def to_dict(self, include_prompt: bool = False) -> dict:
        """The settings' stored form (GenerationSettings.to_dict)."""
        return self.params().to_dict(include_prompt)

    @staticmethod
    def model_defaults(model: str) -> dict:
        """The settings a model folder recommends (its hediff.json), e.g. the embedded model's guidance 2."""
        from hediff.common.models import recommended_settings_for

        return recommended_settings_for(model)

    def load_dict(self, d: dict) -> None:
        """Fill the fields present in ``d`` (stored settings); unknown fields and values the settings model
        refuses are skipped, keeping what the form holds."""
        if not isinstance(d, dict):
            return
        current = self.params()
        for name, value in d.items():
            try:
                current = dataclasses.replace(current, **{name: value})
            except (TypeError, ValueError):
                continue
        self._fill(current)

    def _fill(self, p: gs.GenerationSettings) -> None:
        self._filling = True
        try:
            self._fill_fields(p)
        finally:
            self._filling = False

    def _fill_fields(self, p: gs.GenerationSettings) -> None:
        self.prompt_edit.setPlainText(p.prompt)
        self.negative_edit.setPlainText(p.negative_prompt)
        for spin, value in (
            (self.steps_spin, p.steps),
            (self.seed_spin, p.seed),
            (self.width_spin, p.width),
            (self.height_spin, p.height),
            (self.guidance_spin, p.guidance),
            (self.tau_spin, p.tau),
            (self.fraction_spin, p.mask_fraction),
            (self.strength_spin, p.strength),
            (self.count_spin, p.count),
        ):
            spin.setValue(value)
        self._set_combo_text(self.scheduler_combo, p.scheduler)
        self._set_combo_data(self.encryption_combo, p.encryption)
        self._set_combo_data(self.preset_combo, p.he_preset)
        self._set_combo_text(self.split_combo, p.split)
        self._activation_dtype = p.activation_dtype
        if p.init_image != self._init_image:
            self.set_init_image(p.init_image)
        if p.lora != self.lora_entries():
            self.set_loras(p.lora)
        self._encryption_changed()

    # --- model and server ---

    def model(self) -> str:
        return self.model_combo.currentText().strip() or "embedded"

    def set_model(self, model: str) -> None:
        """Choose ``model``; a folder's config (no weights) caps the size fields at what its server accepts, and
        on a change of model its recommended settings replace those the user has not set by hand."""
        model = str(model)
        changed = getattr(self, "_model", None) not in (None, model)
        self._model = model
        folder = Path(model).expanduser() if model != "embedded" else None
        if folder is None:
            from hediff.common.models import EMBEDDED_MODEL_DIR

            folder = EMBEDDED_MODEL_DIR
        try:
            self.set_size_limits(gs.SizeLimits.from_model_folder(folder))
        except gs.SettingsError:
            pass  # a hub id or a tiny model built later: the server's limits apply when it answers
        if self.model_combo.findText(model) < 0:
            self.model_combo.addItem(model)
        self._set_combo_text(self.model_combo, model)
        self.model_combo.setToolTip(model)
        if changed:
            recommended = self.model_defaults(model)
            self.load_dict({k: v for k, v in recommended.items() if k not in self._user_set})

    def add_models(self, specs) -> None:
        """Offer these models (the model manager's list) in the chooser, keeping the current choice."""
        for spec in specs:
            if self.model_combo.findText(spec) < 0:
                self.model_combo.addItem(spec)

    def set_servers(self, servers, selected: str | None = None) -> None:
        """Fill the chooser from settings.servers, keeping ``selected`` (or the current choice) when it exists."""
        keep = selected if selected is not None else self.server_id()
        self.server_combo.blockSignals(True)
        self.server_combo.clear()
        for server in servers:
            where = server.url if server.remote else "on this machine"
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
