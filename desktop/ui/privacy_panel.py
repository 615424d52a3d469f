"""What the server gets to see for the current generation: mode, split, key, and exactly what the last step sent."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QAbstractItemView,
    QFormLayout,
    QHeaderView,
    QLabel,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from hediff.common.split import is_u_shaped
from hediff.desktop.core import leakage
from hediff.desktop.core.privacy import init_image_note
from hediff.desktop.ui.timing_chart import format_bytes

NOT_MEASURED = leakage.NOT_MEASURED


def describe_mode(params) -> str:
    if is_u_shaped(params.split):
        return (
            "U-shaped split: the latent and the noise prediction stay on this machine, but what is sent still lets "
            "the server rebuild the image (see the measured leakage)"
        )
    if params.encryption == "none":
        return "none: plaintext split (comparison baseline, the server sees the latent)"
    if params.encryption == "full":
        return f"full: the whole latent is CKKS-encrypted (preset {params.he_preset})"
    if params.encryption == "random-mask":
        return f"random-mask: a secret random ~89 % of the latent encrypted (preset {params.he_preset})"
    return f"min-distortion: selected latent values encrypted, τ = {params.tau:g} (preset {params.he_preset})"


def short_fingerprint(fp: str | None) -> str:
    if not fp:
        return ""
    return fp if len(fp) <= 23 else f"{fp[:20]}…"


class PrivacyPanel(QWidget):
    def __init__(self, parent: QWidget | None = None, describe_leakage: Callable[[str, str], str] | None = None):
        super().__init__(parent)
        # measured numbers shipped with the app (bench/leakage.py); injectable so tests can use their own file
        self._describe_leakage = describe_leakage or leakage.describe
        self._params = None
        self._key_policy = "fresh"
        layout = QVBoxLayout(self)
        form = QFormLayout()
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        form.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)
        self.mode_label = self._value_label()
        self.split_label = self._value_label()
        self.fraction_label = self._value_label()
        self.key_label = self._value_label()
        self.server_label = self._value_label()
        self.leakage_label = self._value_label()
        self.init_image_label = self._value_label()
        form.addRow("Encryption:", self.mode_label)
        form.addRow("Split:", self.split_label)
        form.addRow("Encrypted:", self.fraction_label)
        form.addRow("Key:", self.key_label)
        form.addRow("Server:", self.server_label)
        form.addRow("Measured leakage:", self.leakage_label)
        form.addRow("Input image:", self.init_image_label)
        layout.addLayout(form)

        self.sent_caption = QLabel("What the last step sent to the server")
        self.sent_caption.setStyleSheet("font-weight: 600; margin-top: 6px;")
        self.sent_caption.setWordWrap(True)
        layout.addWidget(self.sent_caption)
        self.sent_table = QTableWidget(0, 4)
        self.sent_table.setHorizontalHeaderLabels(["Item", "Kind", "Shape / type", "Bytes"])
        self.sent_table.verticalHeader().setVisible(False)
        self.sent_table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.sent_table.setSelectionMode(QAbstractItemView.SelectionMode.NoSelection)
        self.sent_table.setAlternatingRowColors(True)
        self.sent_table.verticalHeader().setDefaultSectionSize(self.fontMetrics().height() + 8)
        header = self.sent_table.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(1, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(2, QHeaderView.ResizeMode.Stretch)
        header.setSectionResizeMode(3, QHeaderView.ResizeMode.ResizeToContents)
        layout.addWidget(self.sent_table)
        self.note = QLabel(
            "Ciphertext rows are the encrypted latent; only this machine holds the secret key. Tensor rows travel "
            "in plaintext: the UNet head's activations every step (and the prompt embeddings once, when the "
            "session opens)."
        )
        self.note.setWordWrap(True)
        self.note.setStyleSheet("color: palette(placeholder-text);")
        layout.addWidget(self.note)
        layout.addStretch(1)
        self.reset()

    @staticmethod
    def _value_label(text: str = "–") -> QLabel:
        label = QLabel(text)
        label.setWordWrap(True)
        label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        return label

    # --- API ---

    def reset(self) -> None:
        for label in (
            self.mode_label,
            self.split_label,
            self.fraction_label,
            self.key_label,
            self.server_label,
            self.leakage_label,
            self.init_image_label,
        ):
            label.setText("–")
        self.leakage_label.setStyleSheet("")
        self.sent_table.setRowCount(0)
        self.sent_caption.setText("What the last step sent to the server")
        self._fit_table()

    def begin_job(self, params, server_name: str = "", key_policy: str = "fresh", remote: bool = True) -> None:
        """A job started: show its settings; step details follow with ``update_step``."""
        self._params, self._key_policy = params, key_policy
        self.mode_label.setText(describe_mode(params))
        if is_u_shaped(params.split):
            where = "U-shaped: the first and last UNet blocks run on this machine; the latent stays here"
        else:
            where = "the layers up to it run on this machine"
        self.split_label.setText(f"{params.split} ({where})")
        self.fraction_label.setText("0 %" if params.encryption == "none" else "–")
        if params.encryption == "none":
            self.key_label.setText("no key (plaintext)")
        elif key_policy == "device":
            self.key_label.setText("stored device key")
        else:
            self.key_label.setText("ephemeral: a fresh key for this generation")
        self.server_label.setText(server_name or "–")
        measured = self._describe_leakage(params.split, params.encryption)
        if remote:
            self._show_leakage(measured)
        else:  # the same label as the line above Generate: what a remote server could do is not this job's risk
            self.leakage_label.setText(
                f"Nothing leaves this machine (the backend runs on it). A remote server: {measured}"
            )
            self.leakage_label.setStyleSheet("")
        if params.init_image:
            name = Path(params.init_image).name
            self.init_image_label.setText(f"{name}: {init_image_note(not remote, params.split)}")
        else:
            self.init_image_label.setText("none (text to image)")
        self.sent_table.setRowCount(0)

    def update_step(self, update) -> None:
        if self._params is None or self._params.encryption != "none":
            self.fraction_label.setText(f"{update.encrypted_fraction * 100:.1f} % of the latent (this step)")
        self._show_key(update.key_fingerprint)
        self._show_sent(update.sent)

    def finish(self, result) -> None:
        fractions = list(result.encrypted_fractions)
        if fractions:
            mean = sum(fractions) / len(fractions)
            self.fraction_label.setText(f"{mean * 100:.1f} % of the latent (mean over {len(fractions)} steps)")
        self._show_key(result.key_fingerprint)
        if result.server_url:
            name = self.server_label.text()
            self.server_label.setText(f"{name} ({result.server_url})" if name not in ("", "–") else result.server_url)

    def sent_rows(self) -> list[tuple[str, str, str, str]]:
        rows = []
        for r in range(self.sent_table.rowCount()):
            rows.append(tuple(self.sent_table.item(r, c).text() for c in range(4)))
        return rows

    # --- helpers ---

    def _show_leakage(self, text: str) -> None:
        """The measured line (desktop/core/leakage.py); a mode measured not private is shown as a warning."""
        self.leakage_label.setText(text)
        warn = text.startswith(("Not private", NOT_MEASURED))
        self.leakage_label.setStyleSheet("color: #b3261e; font-weight: 600;" if warn else "")

    def _show_key(self, fingerprint: str | None) -> None:
        if not fingerprint:
            return
        kind = "stored device key" if self._key_policy == "device" else "ephemeral (fresh for this generation)"
        self.key_label.setText(f"{kind}\nfingerprint {short_fingerprint(fingerprint)}")
        self.key_label.setToolTip(fingerprint)

    def _show_sent(self, items: list[dict]) -> None:
        rows = [_row(item) for item in group_ciphertexts(items)]
        total = sum(int(item.get("bytes", 0)) for item in items)
        encrypted = sum(int(item.get("bytes", 0)) for item in items if item.get("kind") == "ciphertext")
        rows.append(("total", "", "", format_bytes(total)))
        share = f"{encrypted / total * 100:.0f} %" if total else "0 %"
        self.sent_caption.setText(
            f"What the last step sent to the server: {format_bytes(total)}, {share} of it ciphertext"
        )
        self.sent_table.setRowCount(len(rows))
        for r, cells in enumerate(rows):
            for c, text in enumerate(cells):
                cell = QTableWidgetItem(text)
                if c == 3:
                    cell.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                if r == len(rows) - 1:
                    font = cell.font()
                    font.setBold(True)
                    cell.setFont(font)
                self.sent_table.setItem(r, c, cell)
        self._fit_table()

    def _fit_table(self) -> None:
        """As tall as its rows: the note follows right under the table."""
        rows = max(1, self.sent_table.rowCount())
        header = self.sent_table.horizontalHeader().sizeHint().height()
        body = rows * self.sent_table.verticalHeader().defaultSectionSize()
        self.sent_table.setFixedHeight(header + body + 2 * self.sent_table.frameWidth() + 2)


def group_ciphertexts(items: list[dict]) -> list[dict]:
    """Runs of ciphertext items become one row ("ct0 … ct15", 16 ciphertexts); tensors stay one row each."""
    out: list[dict] = []
    run: list[dict] = []

    def flush():
        if len(run) <= 2:
            out.extend(run)
        else:
            out.append(
                {
                    "name": f"{run[0].get('name', '')} … {run[-1].get('name', '')}",
                    "kind": "ciphertext",
                    "count": len(run),
                    "each": int(run[0].get("bytes", 0)),
                    "bytes": sum(int(i.get("bytes", 0)) for i in run),
                }
            )
        run.clear()

    for item in items:
        if item.get("kind") == "ciphertext":
            run.append(item)
        else:
            flush()
            out.append(item)
    flush()
    return out


def _row(item: dict) -> tuple[str, str, str, str]:
    kind = str(item.get("kind", ""))
    if kind == "tensor":
        shape = "×".join(str(d) for d in item.get("shape", [])) or "scalar"
        detail = f"{shape} {item.get('dtype', '')}".strip()
    elif kind == "ciphertext":
        count = item.get("count", 1)
        detail = f"{count} CKKS ciphertexts" if count > 1 else "CKKS ciphertext"
    else:
        detail = ""
    return str(item.get("name", "")), kind, detail, format_bytes(int(item.get("bytes", 0)))
