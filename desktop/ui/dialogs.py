"""Small dialogs and widgets the panels share: the server edit dialog, the passphrase dialog, message labels.

No protocol or crypto logic here: the dialogs only collect what the user typed; the panels hand it to
desktop.core (Settings, DeviceKeys), which validates and stores it.
"""

from __future__ import annotations

from dataclasses import dataclass

from PySide6.QtCore import Qt
from PySide6.QtGui import QFont, QFontDatabase, QPalette
from PySide6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QLabel,
    QLineEdit,
    QMessageBox,
    QVBoxLayout,
    QWidget,
)

from hediff.desktop.core.backend_client import BackendError
from hediff.desktop.core.keystore import KeyringUnavailable, KeyStoreError, no_keyring_message

PASSPHRASE_MIN_LENGTH = 8

# errors whose str() is written for the user (desktop.core's rule); anything else is shown by type name only
_USER_ERRORS: tuple[type[BaseException], ...] = (BackendError, KeyStoreError, KeyringUnavailable, ValueError, OSError)

_STYLES = {
    "warning": "color: #7a4b00; background: #fff6e0; border: 1px solid #e8c267; border-radius: 4px; padding: 6px;",
    "error": "color: #8a1c1c; background: #fdecea; border: 1px solid #e6a6a1; border-radius: 4px; padding: 6px;",
    "info": "color: #1d4a73; background: #eaf3fb; border: 1px solid #a9c8e6; border-radius: 4px; padding: 6px;",
    "ok": "color: #1e5e2a; background: #eaf6ec; border: 1px solid #9fd0a8; border-radius: 4px; padding: 6px;",
}


class MessageLabel(QLabel):
    """A word-wrapped, coloured message line; hidden while empty. ``kind``: warning, error, info or ok."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setWordWrap(True)
        self.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.setTextFormat(Qt.TextFormat.PlainText)
        self.kind = ""
        self.hide()

    def show_message(self, text: str, kind: str = "warning") -> None:
        self.kind = kind
        self.setStyleSheet(_STYLES.get(kind, _STYLES["warning"]))
        self.setText(text)
        self.setVisible(bool(text))

    def clear_message(self) -> None:
        self.kind = ""
        self.setText("")
        self.hide()


class StatusLabel(QLabel):
    """The quiet one-line status text at the bottom of a panel."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setWordWrap(True)
        dim(self)
        self.setTextFormat(Qt.TextFormat.PlainText)


def dim(widget: QWidget) -> QWidget:
    """Secondary text: the palette's placeholder colour (readable on light and dark themes)."""
    palette = widget.palette()
    palette.setColor(QPalette.ColorRole.WindowText, palette.color(QPalette.ColorRole.PlaceholderText))
    widget.setPalette(palette)
    return widget


def fit_to_width(dialog: QDialog) -> None:
    """Size a dialog with word-wrapped labels for its minimum width (Qt's size hint guesses a narrower one)."""
    width = max(dialog.minimumWidth(), dialog.sizeHint().width())
    dialog.resize(width, dialog.layout().totalHeightForWidth(width))


def error_text(exc: BaseException) -> str:
    """A message for the user: the error's own text for desktop.core's errors, else only its type name."""
    if isinstance(exc, _USER_ERRORS) and str(exc):
        return str(exc)
    return f"Unexpected error ({type(exc).__name__}); the app keeps working, please try again."


def keyring_problem(secrets) -> str | None:
    """Why the OS keyring cannot be used right now (the KeyringUnavailable text), or None when it works."""
    try:
        if secrets.available:
            return None
    except Exception as e:  # noqa: BLE001 - a keyring that cannot even say whether it works is unavailable
        return error_text(e)
    return secrets.unavailable_reason or no_keyring_message("no reason given")


def monospace_font() -> QFont:
    font = QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont)
    font.setStyleHint(QFont.StyleHint.Monospace)
    return font


def ask_yes_no(parent: QWidget | None, title: str, text: str) -> bool:
    """The default ``confirm`` hook of the panels (tests replace it)."""
    answer = QMessageBox.question(
        parent,
        title,
        text,
        QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
        QMessageBox.StandardButton.No,
    )
    return answer == QMessageBox.StandardButton.Yes


# --- server dialog ---------------------------------------------------------------------------------


@dataclass
class ServerValues:
    """What the server dialog collects. ``token`` empty on edit means: keep the stored token."""

    name: str = ""
    url: str = ""
    token: str = ""
    tls_ca: str = ""  # PEM file (a private CA, or the server's own certificate); empty: the system CAs


class ServerDialog(QDialog):
    """Name, URL and API token of a backend. The token is typed with password echo and never shown back.

    ``editing``: the server already exists (an empty token keeps the stored one). ``local``: the built-in
    local backend (only its name can change). ``token_blocked``: why no token can be stored right now (the
    keyring is unavailable); the token field is then disabled and the reason shown. ``error``: a message from
    the previous attempt (e.g. an invalid URL), shown at the top.
    """

    def __init__(
        self,
        parent: QWidget | None = None,
        *,
        values: ServerValues | None = None,
        editing: bool = False,
        local: bool = False,
        token_blocked: str | None = None,
        error: str | None = None,
    ):
        super().__init__(parent)
        values = values or ServerValues()
        self.setWindowTitle("Edit server" if editing else "Add server")
        self.setMinimumWidth(460)

        self.error_label = MessageLabel(self)
        if error:
            self.error_label.show_message(error, "error")

        self.name_edit = QLineEdit(values.name)
        self.name_edit.setPlaceholderText("e.g. Lab GPU server")
        self.url_edit = QLineEdit("local backend (started on this computer)" if local else values.url)
        self.url_edit.setPlaceholderText("https://example.org:8000")
        self.url_edit.setEnabled(not local)
        self.token_edit = QLineEdit(values.token)
        self.token_edit.setEchoMode(QLineEdit.EchoMode.Password)
        self.token_edit.setPlaceholderText(
            "leave empty to keep the current token" if editing else "the API token the server's admin gave you"
        )
        self.token_edit.setEnabled(not local and token_blocked is None)
        self.ca_edit = QLineEdit(values.tls_ca)
        self.ca_edit.setPlaceholderText("system CAs (or a PEM file: your private CA or the server's certificate)")
        self.ca_edit.setToolTip(
            "For a server with a self-signed or private-CA certificate. Test the connection to be shown the "
            "certificate's fingerprint and trust it from there."
        )
        self.ca_edit.setEnabled(not local)

        form = QFormLayout()
        form.addRow("Name", self.name_edit)
        form.addRow("URL", self.url_edit)
        form.addRow("API token", self.token_edit)
        form.addRow("TLS certificate", self.ca_edit)

        self.token_note = MessageLabel(self)
        if local:
            self.token_note.show_message("The local backend runs on this computer and needs no token.", "info")
        elif token_blocked is not None:
            self.token_note.show_message(token_blocked, "warning")
        else:
            self.token_note.show_message("The token is stored in your system keyring, never in a file.", "info")

        self.buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        self.buttons.accepted.connect(self.accept)
        self.buttons.rejected.connect(self.reject)
        self.name_edit.textChanged.connect(self._update_ok)
        self.url_edit.textChanged.connect(self._update_ok)

        layout = QVBoxLayout(self)
        layout.addWidget(self.error_label)
        layout.addLayout(form)
        layout.addWidget(self.token_note)
        layout.addWidget(self.buttons)
        self._local = local
        self._update_ok()
        fit_to_width(self)

    def _update_ok(self) -> None:
        ok = bool(self.name_edit.text().strip()) and (self._local or bool(self.url_edit.text().strip()))
        self.buttons.button(QDialogButtonBox.StandardButton.Ok).setEnabled(ok)

    def values(self) -> ServerValues:
        return ServerValues(
            name=self.name_edit.text().strip(),
            url="" if self._local else self.url_edit.text().strip(),
            token=self.token_edit.text().strip() if self.token_edit.isEnabled() else "",
            tls_ca="" if self._local else self.ca_edit.text().strip(),
        )

    @classmethod
    def ask(cls, parent: QWidget | None = None, **kw) -> ServerValues | None:
        """Run the dialog modally; the values, or None when cancelled."""
        dialog = cls(parent, **kw)
        try:
            return dialog.values() if dialog.exec() == QDialog.DialogCode.Accepted else None
        finally:
            dialog.deleteLater()


# --- passphrase dialog -----------------------------------------------------------------------------


def passphrase_problem(passphrase: str, repeated: str | None) -> str | None:
    """Why a passphrase cannot be accepted, or None. ``repeated`` None: no confirmation field (unlocking)."""
    if len(passphrase) < PASSPHRASE_MIN_LENGTH:
        return f"Use at least {PASSPHRASE_MIN_LENGTH} characters."
    if repeated is not None and passphrase != repeated:
        return "The two passphrases do not match."
    return None


class PassphraseDialog(QDialog):
    """Asks for the passphrase that protects the device keys when no OS keyring is available.

    ``confirm=True`` (opting in): entered twice, must match, at least PASSPHRASE_MIN_LENGTH characters.
    ``confirm=False`` (unlocking keys protected earlier): entered once.
    """

    def __init__(self, parent: QWidget | None = None, *, confirm: bool = True, reason: str | None = None):
        super().__init__(parent)
        self.setWindowTitle("Protect keys with a passphrase" if confirm else "Unlock keys")
        self.setMinimumWidth(460)
        self._confirm = confirm

        intro = QLabel(
            "Your device keys will be encrypted with a key derived from this passphrase. The passphrase is not "
            "stored anywhere: you will be asked for it again after a restart, and if you forget it the keys "
            "cannot be recovered (you can always create new ones)."
            if confirm
            else "Enter the passphrase that protects your device keys."
        )
        intro.setWordWrap(True)
        self.reason_label = MessageLabel(self)
        if reason:
            self.reason_label.show_message(reason, "warning")

        self.first = QLineEdit()
        self.first.setEchoMode(QLineEdit.EchoMode.Password)
        self.second = QLineEdit()
        self.second.setEchoMode(QLineEdit.EchoMode.Password)
        form = QFormLayout()
        form.addRow("Passphrase", self.first)
        if confirm:
            form.addRow("Repeat it", self.second)
        else:
            self.second.hide()

        self.problem_label = QLabel()
        self.problem_label.setStyleSheet("color: #8a1c1c;")
        self.buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        self.buttons.accepted.connect(self.accept)
        self.buttons.rejected.connect(self.reject)
        self.first.textChanged.connect(self._update)
        self.second.textChanged.connect(self._update)

        layout = QVBoxLayout(self)
        layout.addWidget(intro)
        layout.addWidget(self.reason_label)
        layout.addLayout(form)
        layout.addWidget(self.problem_label)
        layout.addWidget(self.buttons)
        self._update()
        fit_to_width(self)

    def problem(self) -> str | None:
        return passphrase_problem(self.first.text(), self.second.text() if self._confirm else None)

    def _update(self) -> None:
        problem = self.problem()
        typed = bool(self.first.text() or self.second.text())
        self.problem_label.setText(problem if (problem and typed) else "")
        self.buttons.button(QDialogButtonBox.StandardButton.Ok).setEnabled(problem is None)

    def accept(self) -> None:
        if self.problem() is None:
            super().accept()

    def passphrase(self) -> str:
        return self.first.text()

    @classmethod
    def ask(cls, parent: QWidget | None = None, **kw) -> str | None:
        dialog = cls(parent, **kw)
        try:
            return dialog.passphrase() if dialog.exec() == QDialog.DialogCode.Accepted else None
        finally:
            dialog.first.clear()
            dialog.second.clear()
            dialog.deleteLater()


class PanelMessages:
    """The panels' two message places: a status line (also sent on ``statusMessage``) and an error line.

    Mixed into a QWidget that has ``status_label``, ``result_label`` (a MessageLabel) and a ``statusMessage``
    signal.
    """

    def _status(self, text: str) -> None:
        self.status_label.setText(text)
        self.statusMessage.emit(text)

    def _ok(self, text: str) -> None:
        self.result_label.clear_message()
        self._status(text)

    def _fail(self, text: str) -> None:
        """An error: shown in the panel's message line (and sent to the status bar), never a traceback."""
        self.result_label.show_message(text, "error")
        self.status_label.clear()
        self.statusMessage.emit(text)
