"""The Keys tab: the stored CKKS device keys per HE preset and the key policy (fresh key per generation or not).

Creating, wrapping and storing keys is desktop.core's job (DeviceKeys); this panel only shows their state and
calls it. Keys are never stored unprotected: without a keyring the user must opt in to a passphrase first.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from PySide6.QtCore import QEventLoop, QObject, QRunnable, Qt, QThreadPool, QTimer, Signal
from PySide6.QtWidgets import (
    QButtonGroup,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QRadioButton,
    QScrollArea,
    QVBoxLayout,
    QWidget,
)

from hediff.common.he import PRESETS
from hediff.desktop.ui.dialogs import (
    MessageLabel,
    PanelMessages,
    PassphraseDialog,
    StatusLabel,
    ask_yes_no,
    dim,
    error_text,
    keyring_problem,
    monospace_font,
    passphrase_problem,
)

POLICY_LABELS = {
    "fresh": "A fresh key per generation (default)",
    "device": "Use the stored device key",
}
PROTECTION_LABELS = {
    "keyring": "wrapped with a key in the system keyring",
    "passphrase": "protected by your passphrase",
}


def _format_time(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


class _Relay(QObject):
    """Carries a key operation's outcome from the pool thread to the GUI thread (a queued signal)."""

    finished = Signal(int, bool, object)  # ticket, ok, the result or the exception


class _KeyOperation(QRunnable):
    def __init__(self, fn: Callable[[], object], ticket: int, relay: _Relay):
        super().__init__()
        self.setAutoDelete(True)
        self._fn, self._ticket, self._relay = fn, ticket, relay

    def run(self) -> None:
        try:
            ok, value = True, self._fn()
        except Exception as e:  # noqa: BLE001 - any failure becomes a message in the panel
            ok, value = False, e
        try:
            self._relay.finished.emit(self._ticket, ok, value)
        except RuntimeError:  # the panel went away while the operation ran
            pass


class _PresetBox(QGroupBox):
    """One HE preset: its key's fingerprint, creation time, protection and the Create/Rotate/Delete buttons."""

    def __init__(self, preset, parent: QWidget | None = None):
        super().__init__(f"Preset “{preset.name}”", parent)
        self.preset = preset.name
        description = QLabel(preset.description)
        description.setWordWrap(True)
        dim(description)
        self.fingerprint = QLabel()
        self.fingerprint.setFont(monospace_font())
        self.fingerprint.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.created = QLabel()
        self.protection = QLabel()
        self.create_button = QPushButton("Create")
        self.rotate_button = QPushButton("Rotate…")
        self.delete_button = QPushButton("Delete…")

        grid = QGridLayout()
        grid.setColumnStretch(1, 1)
        for row, (label, widget) in enumerate(
            (("Fingerprint", self.fingerprint), ("Created", self.created), ("Protection", self.protection))
        ):
            name = QLabel(label)
            dim(name)
            grid.addWidget(name, row, 0)
            grid.addWidget(widget, row, 1)
        buttons = QHBoxLayout()
        buttons.addStretch(1)
        for b in (self.create_button, self.rotate_button, self.delete_button):
            buttons.addWidget(b)
        layout = QVBoxLayout(self)
        layout.addWidget(description)
        layout.addLayout(grid)
        layout.addLayout(buttons)

    def show_info(self, info, problem: str | None, can_create: bool, why_not: str) -> None:
        if problem is not None:
            self.fingerprint.setText("unreadable")
            self.created.setText("—")
            self.protection.setText(problem)
            self.protection.setWordWrap(True)
        elif info is None:
            self.fingerprint.setText("no device key")
            self.created.setText("—")
            self.protection.setText("—")
        else:
            self.fingerprint.setText(info.fingerprint)
            self.created.setText(_format_time(info.created))
            self.protection.setText(PROTECTION_LABELS.get(info.protection, info.protection))
        exists = info is not None or problem is not None
        self.create_button.setEnabled(not exists and can_create)
        self.create_button.setToolTip("" if can_create else why_not)
        self.rotate_button.setEnabled(exists and can_create)
        self.rotate_button.setToolTip("" if can_create else why_not)
        self.delete_button.setEnabled(exists)


class KeysPanel(PanelMessages, QWidget):
    keysChanged = Signal()
    statusMessage = Signal(str)
    operationFinished = Signal(bool)  # a key operation started by this panel ended; True when it succeeded

    def __init__(self, services, parent: QWidget | None = None):
        super().__init__(parent)
        self.services = services
        self.thread_pool = QThreadPool.globalInstance()
        self._relay = _Relay(self)
        self._relay.finished.connect(self._on_finished)
        self._ticket = 0
        self._op: int | None = None
        self._handlers: tuple = (None, None)
        self._last_ok = False
        self.confirm: Callable[[str, str], bool] = lambda title, text: ask_yes_no(self, title, text)
        self.ask_passphrase: Callable[..., str | None] = lambda **kw: PassphraseDialog.ask(self, **kw)

        intro = QLabel(
            "Your CKKS secret keys never leave this computer. By default every generation uses a fresh key that "
            "is thrown away afterwards; you can instead keep one device key per HE preset, stored encrypted."
        )
        intro.setWordWrap(True)

        policy_box = QGroupBox("Key for each generation")
        self.policy_buttons: dict[str, QRadioButton] = {}
        self._policy_group = QButtonGroup(self)
        policy_layout = QVBoxLayout(policy_box)
        for policy, label in POLICY_LABELS.items():
            radio = QRadioButton(label)
            self.policy_buttons[policy] = radio
            self._policy_group.addButton(radio)
            policy_layout.addWidget(radio)
            radio.toggled.connect(lambda checked, p=policy: checked and self.set_policy(p))
        self.policy_note = MessageLabel(self)
        policy_layout.addWidget(self.policy_note)

        self.keyring_label = MessageLabel(self)
        self.passphrase_button = QPushButton("Protect keys with a passphrase instead…")
        self.passphrase_button.clicked.connect(self._on_passphrase)
        passphrase_row = QHBoxLayout()
        passphrase_row.addWidget(self.passphrase_button)
        passphrase_row.addStretch(1)

        self.preset_boxes: dict[str, _PresetBox] = {}
        boxes = QWidget()
        boxes_layout = QVBoxLayout(boxes)
        boxes_layout.setContentsMargins(0, 0, 0, 0)
        for name, preset in PRESETS.items():
            box = _PresetBox(preset)
            box.create_button.clicked.connect(lambda _=False, p=name: self.start_create(p))
            box.rotate_button.clicked.connect(lambda _=False, p=name: self.start_rotate(p, confirm=True))
            box.delete_button.clicked.connect(lambda _=False, p=name: self.start_delete(p, confirm=True))
            self.preset_boxes[name] = box
            boxes_layout.addWidget(box)
        boxes_layout.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QScrollArea.Shape.NoFrame)
        scroll.setWidget(boxes)

        self.result_label = MessageLabel(self)
        self.status_label = StatusLabel(self)

        layout = QVBoxLayout(self)
        layout.addWidget(intro)
        layout.addWidget(policy_box)
        layout.addWidget(self.keyring_label)
        layout.addLayout(passphrase_row)
        layout.addWidget(scroll, 1)
        layout.addWidget(self.result_label)
        layout.addWidget(self.status_label)
        self.refresh()

    # --- state -------------------------------------------------------------------------------------

    @property
    def keys(self):
        return self.services.keys

    def keyring_message(self) -> str | None:
        return keyring_problem(self.services.secrets)

    def has_passphrase(self) -> bool:
        return bool(self.keys.uses_passphrase)

    def key_info(self, preset: str):
        """(KeyInfo | None, problem text | None) for a preset; never raises."""
        try:
            return self.keys.info(preset), None
        except Exception as e:  # noqa: BLE001 - shown in the preset's row
            return None, error_text(e)

    def passphrase_keys(self) -> list[str]:
        """Presets whose stored key is protected by a passphrase."""
        return [name for name in PRESETS if (info := self.key_info(name)[0]) and info.protection == "passphrase"]

    def needs_unlock(self) -> bool:
        return not self.has_passphrase() and bool(self.passphrase_keys())

    def refresh(self) -> None:
        keyring = self.keyring_message()
        has_passphrase = self.has_passphrase()
        protected = keyring is None or has_passphrase
        infos = {name: self.key_info(name) for name in PRESETS}
        locked = [n for n, (info, _) in infos.items() if info and info.protection == "passphrase"]
        unlock = not has_passphrase and bool(locked)
        self.passphrase_button.setText(
            "Unlock keys with your passphrase…" if unlock else "Protect keys with a passphrase instead…"
        )
        if keyring is None and not unlock:
            self.keyring_label.clear_message()
            self.passphrase_button.hide()
        elif keyring is None:
            self.keyring_label.show_message(
                f"The device key(s) for {', '.join(locked)} are protected by a passphrase; enter it to use them.",
                "info",
            )
            self.passphrase_button.show()
        elif has_passphrase:
            self.keyring_label.show_message(
                "No system keyring is available; your device keys are protected by the passphrase you gave for "
                "this session.",
                "info",
            )
            self.passphrase_button.hide()
        else:
            self.keyring_label.show_message(keyring, "warning")  # the one no-keyring message, as is
            self.passphrase_button.show()
        why_not = "No system keyring: protect keys with a passphrase first."
        for name, box in self.preset_boxes.items():
            info, problem = infos[name]
            box.show_info(info, problem, protected, why_not)

        policy = getattr(self.services.settings, "key_policy", "fresh")
        radio = self.policy_buttons.get(policy, self.policy_buttons["fresh"])
        if not radio.isChecked():
            radio.blockSignals(True)
            radio.setChecked(True)
            radio.blockSignals(False)
        if policy == "device" and not protected:
            self.policy_note.show_message(
                "Generations cannot use a stored device key until keys can be protected (keyring or passphrase).",
                "warning",
            )
        elif policy == "device":
            self.policy_note.show_message(
                "Generations use the stored key of their HE preset; it is created on first use.", "info"
            )
        else:
            self.policy_note.clear_message()
        self.passphrase_button.setEnabled(True)
        for radio in self.policy_buttons.values():
            radio.setEnabled(True)
        self._update_busy()

    # --- key operations, off the GUI thread ----------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self._op is not None

    def _start(self, action, done: Callable[[object], str], on_error: Callable[[], None] | None = None) -> bool:
        """Run ``action`` on a pool thread: unwrapping, scrypt and key generation take 0.3 s and more, which would
        freeze the window. ``done(result)`` gives the success message, on the GUI thread; ``on_error`` undoes
        what a failure leaves behind. False (message shown) while another key operation runs."""
        if self._op is not None:
            self._fail("Another key operation is still running; wait for it to finish.")
            return False
        self._ticket += 1
        self._op = self._ticket
        self._handlers = (done, on_error)
        self.result_label.clear_message()
        self._status("Working on the device keys…")
        self._update_busy()
        self.thread_pool.start(_KeyOperation(action, self._ticket, self._relay))
        return True

    def _on_finished(self, ticket: int, ok: bool, value) -> None:
        if ticket != self._op:
            return
        self._op = None
        done, on_error = self._handlers
        self._last_ok = ok
        if not ok and on_error is not None:
            try:
                on_error()
            except Exception:  # noqa: BLE001 - undoing is best effort; the error below is what the user needs
                pass
        self.refresh()
        if ok:
            self._ok(done(value))
            self.keysChanged.emit()
        else:
            self._fail(error_text(value))
        self.operationFinished.emit(ok)

    def _update_busy(self) -> None:
        if self._op is None:
            return
        for box in self.preset_boxes.values():
            for b in (box.create_button, box.rotate_button, box.delete_button):
                b.setEnabled(False)
        self.passphrase_button.setEnabled(False)
        for radio in self.policy_buttons.values():
            radio.setEnabled(False)

    def wait(self, timeout_ms: int | None = None) -> bool:
        """Wait for the running key operation (the event loop keeps running); True when it succeeded."""
        if self._op is not None:
            loop = QEventLoop()
            self.operationFinished.connect(loop.quit)
            try:
                if timeout_ms is not None:
                    QTimer.singleShot(timeout_ms, loop.quit)
                if self._op is not None:
                    loop.exec()
            finally:
                self.operationFinished.disconnect(loop.quit)
        return self._op is None and self._last_ok

    # --- actions -----------------------------------------------------------------------------------
    # Each start_* returns at once (False with a message if it could not start); the plain methods wait for the
    # outcome with the event loop running, for scripts and tests.

    def _ready_text(self, preset: str, verb: str) -> Callable[[object], str]:
        def text(_result) -> str:
            info, _ = self.key_info(preset)
            return f"{verb} {preset!r}: {info.fingerprint}." if info is not None else f"{verb} {preset!r}."

        return text

    def start_create(self, preset: str) -> bool:
        return self._start(lambda: self.keys.get_or_create(preset), self._ready_text(preset, "Device key ready for"))

    def create(self, preset: str):
        """Create the device key for a preset (no-op when one exists). Its KeyInfo, or None (message shown)."""
        if not (self.start_create(preset) and self.wait()):
            return None
        return self.key_info(preset)[0]

    def start_rotate(self, preset: str, confirm: bool = False) -> bool:
        old, _ = self.key_info(preset)
        if (
            confirm
            and old is not None
            and not self.confirm(
                "Rotate device key",
                f"Replace the {preset!r} device key {old.fingerprint} with a new one? The old key is deleted.",
            )
        ):
            return False
        return self._start(lambda: self.keys.rotate(preset), self._ready_text(preset, "Rotated the device key of"))

    def rotate(self, preset: str, confirm: bool = False):
        """Replace a preset's device key with a new one. The new KeyInfo, or None."""
        if not (self.start_rotate(preset, confirm) and self.wait()):
            return None
        return self.key_info(preset)[0]

    def start_delete(self, preset: str, confirm: bool = False) -> bool:
        info, problem = self.key_info(preset)
        if info is None and problem is None:
            self._fail(f"There is no {preset!r} device key to delete.")
            return False
        what = f"the {preset!r} device key" + (f" {info.fingerprint}" if info else "")
        if confirm and not self.confirm("Delete device key", f"Delete {what}? This cannot be undone."):
            return False
        return self._start(lambda: self.keys.delete(preset), lambda _r: f"Deleted {what}.")

    def delete(self, preset: str, confirm: bool = False) -> bool:
        return self.start_delete(preset, confirm) and self.wait()

    def set_policy(self, policy: str) -> bool:
        """Bind the key policy ("fresh" | "device") to the settings and save them."""
        if policy not in POLICY_LABELS:
            self._fail(f"Unknown key policy {policy!r}.")
            return False
        settings = self.services.settings
        if settings.key_policy == policy and self.policy_buttons[policy].isChecked():
            return True
        previous = settings.key_policy
        try:
            settings.key_policy = policy
            settings.save()
        except Exception as e:  # noqa: BLE001
            settings.key_policy = previous
            self.refresh()
            self._fail(f"The key policy could not be saved: {error_text(e)}")
            return False
        self.refresh()
        self._ok(
            "Every generation will use a fresh key." if policy == "fresh" else "Generations will use the stored key."
        )
        return True

    def start_passphrase(self, passphrase: str) -> bool:
        """Opt in to passphrase protection of the device keys for this session, or unlock keys protected earlier
        (then the passphrase is checked against them at once, so a typo is reported here, not at generation)."""
        locked = [] if self.has_passphrase() else self.passphrase_keys()
        problem = passphrase_problem(passphrase, None) if not locked else (None if passphrase else "Enter it.")
        if problem:
            self._fail(problem)
            return False
        keys = self.keys

        def unlock() -> None:
            keys.set_passphrase(passphrase)
            for preset in locked:
                keys.load(preset)  # scrypt: the slow part

        return self._start(
            unlock,
            lambda _r: (
                "Unlocked the device keys for this session."
                if locked
                else "Device keys are protected by your passphrase for this session."
            ),
            on_error=lambda: keys.set_passphrase(None),  # e.g. WrongPassphrase: back to no passphrase
        )

    def enable_passphrase(self, passphrase: str) -> bool:
        return self.start_passphrase(passphrase) and self.wait()

    def _on_passphrase(self) -> None:
        passphrase = self.ask_passphrase(confirm=not self.needs_unlock())
        if passphrase:
            self.start_passphrase(passphrase)
