"""The Servers tab: the backends this app can use, their API tokens (kept in the keyring) and a connection test.

Everything goes through desktop.core (Settings for the list, SecretStore for tokens, AppServices for the
test); this module only shows it and reports errors as messages, never tracebacks.
"""

from __future__ import annotations

from collections.abc import Callable

from PySide6.QtCore import QEventLoop, QObject, QRunnable, Qt, QThreadPool, QTimer, Signal
from PySide6.QtWidgets import (
    QAbstractItemView,
    QGridLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from hediff.desktop.core.backend_client import BackendTLSError
from hediff.desktop.ui.dialogs import (
    MessageLabel,
    PanelMessages,
    ServerDialog,
    ServerValues,
    StatusLabel,
    ask_yes_no,
    error_text,
    keyring_problem,
)

LOCAL_ADDRESS = "local backend (this computer)"
DEVICE_ADDRESS = "no server: everything runs in the app"


class _Relay(QObject):
    """Carries a worker thread's result back to the GUI thread (queued, since it is emitted off-thread)."""

    finished = Signal(int, bool, str)


class _Job(QRunnable):
    def __init__(self, fn: Callable[[], str], ticket: int, relay: _Relay):
        super().__init__()
        self.setAutoDelete(True)
        self._fn, self._ticket, self._relay = fn, ticket, relay

    def run(self) -> None:
        try:
            ok, text = True, str(self._fn())
        except Exception as e:  # noqa: BLE001 - any failure becomes a message in the panel
            ok, text = False, error_text(e)
        try:
            self._relay.finished.emit(self._ticket, ok, text)
        except RuntimeError:  # the panel went away while the test ran
            pass


class ServersPanel(PanelMessages, QWidget):
    serversChanged = Signal()
    testFinished = Signal(bool, str)  # ok, the one-line result or the error text
    statusMessage = Signal(str)  # for the main window's status bar

    def __init__(self, services, parent: QWidget | None = None):
        super().__init__(parent)
        self.services = services
        # hooks the tests replace, so nothing modal ever blocks them. ask_server(values=ServerValues,
        # editing=bool, local=bool (edit only), token_blocked=str|None, error=str|None) -> ServerValues | None
        self.confirm: Callable[[str, str], bool] = lambda title, text: ask_yes_no(self, title, text)
        self.ask_server: Callable[..., ServerValues | None] = lambda **kw: ServerDialog.ask(self, **kw)
        self.thread_pool = QThreadPool.globalInstance()
        self._relay = _Relay(self)
        self._relay.finished.connect(self._on_test_finished)
        self._untrusted: tuple[str, str, str] | None = None  # set by a test that met an untrusted certificate
        self._ticket = 0
        self._testing: int | None = None
        self.last_test: tuple[bool, str] | None = None

        intro = QLabel(
            "Backends this app can send encrypted work to. API tokens are kept in your system keyring, "
            "never in the settings file."
        )
        intro.setWordWrap(True)
        self.keyring_label = MessageLabel(self)
        self.table = QTableWidget(0, 2, self)
        self.table.setHorizontalHeaderLabels(["Name", "Address"])
        self.table.verticalHeader().hide()
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.setAlternatingRowColors(True)
        self.table.itemSelectionChanged.connect(self._update_buttons)
        self.table.itemDoubleClicked.connect(lambda _item: self._on_edit())

        self.add_button = QPushButton("Add…")
        self.edit_button = QPushButton("Edit…")
        self.remove_button = QPushButton("Remove")
        self.test_button = QPushButton("Test connection")
        self.add_button.clicked.connect(self._on_add)
        self.edit_button.clicked.connect(self._on_edit)
        self.remove_button.clicked.connect(lambda: self.remove_selected(confirm=True))
        self.test_button.clicked.connect(self.start_test)
        buttons = QGridLayout()  # two by two: the tabs panel stays narrow enough for the image in a 1024 px window
        for i, b in enumerate((self.add_button, self.edit_button, self.remove_button, self.test_button)):
            buttons.addWidget(b, i // 2, i % 2)

        self.result_label = MessageLabel(self)
        self.status_label = StatusLabel(self)

        layout = QVBoxLayout(self)
        layout.addWidget(intro)
        layout.addWidget(self.keyring_label)
        layout.addWidget(self.table, 1)
        layout.addLayout(buttons)
        layout.addWidget(self.result_label)
        layout.addWidget(self.status_label)
        self.refresh()

    # --- state -------------------------------------------------------------------------------------

    @property
    def settings(self):
        return self.services.settings

    def keyring_message(self) -> str | None:
        """Why tokens cannot be stored right now, or None when the keyring works."""
        return keyring_problem(self.services.secrets)

    def refresh(self) -> None:
        """Rebuild the list from the settings, keeping the selection."""
        keep = self.selected_id()
        problem = self.keyring_message()
        if problem:
            self.keyring_label.show_message(problem, "warning")  # the one no-keyring message, as is
        else:
            self.keyring_label.clear_message()
        servers = list(self.settings.servers)
        self.table.setRowCount(len(servers))
        for row, server in enumerate(servers):
            name = QTableWidgetItem(server.name)
            name.setData(Qt.ItemDataRole.UserRole, server.id)
            address = QTableWidgetItem(
                DEVICE_ADDRESS if server.on_device else LOCAL_ADDRESS if server.local else server.url
            )
            if not server.remote:
                address.setForeground(self.palette().placeholderText())
            self.table.setItem(row, 0, name)
            self.table.setItem(row, 1, address)
        if keep is None or not self.select(keep):
            if servers:
                self.select(getattr(self.settings, "selected_server", None) or servers[0].id) or self.table.selectRow(0)
        self._update_buttons()

    def server_ids(self) -> list[str]:
        return [self.table.item(r, 0).data(Qt.ItemDataRole.UserRole) for r in range(self.table.rowCount())]

    def selected_id(self) -> str | None:
        rows = self.table.selectionModel().selectedRows() if self.table.selectionModel() else []
        if not rows:
            return None
        item = self.table.item(rows[0].row(), 0)
        return item.data(Qt.ItemDataRole.UserRole) if item else None

    def selected_server(self):
        sid = self.selected_id()
        return next((s for s in self.settings.servers if s.id == sid), None)

    def select(self, server_id: str) -> bool:
        for row, sid in enumerate(self.server_ids()):
            if sid == server_id:
                self.table.selectRow(row)
                return True
        return False

    def _update_buttons(self) -> None:
        server = self.selected_server()
        self.edit_button.setEnabled(server is not None)
        self.remove_button.setEnabled(server is not None and server.remote)
        self.remove_button.setToolTip(f"{server.name} is built in." if server and not server.remote else "")
        self.test_button.setEnabled(server is not None and self._testing is None)

    # --- messages ----------------------------------------------------------------------------------

    def _changed(self, status: str, select: str | None = None) -> None:
        # Settings.add_server / update_server / remove_server save the file themselves
        self.refresh()
        if select is not None:
            self.select(select)
        self.result_label.clear_message()
        self._status(status)
        self.serversChanged.emit()

    # --- add / edit / remove -----------------------------------------------------------------------

    def _token_refusal(self, token: str) -> str | None:
        problem = self.keyring_message() if token else None
        return f"The API token was not saved: {problem}" if problem else None

    def _add(self, values: ServerValues) -> str | None:
        """Add a server; the error text, or None on success."""
        refusal = self._token_refusal(values.token)
        if refusal:
            return refusal
        try:
            entry = self.settings.add_server(
                values.name, values.url, values.token or None, self.services.secrets, tls_ca=values.tls_ca or None
            )
            self._changed(f"Added server {entry.name!r}.", select=entry.id)
        except Exception as e:  # noqa: BLE001 - shown to the user, the app keeps working
            return error_text(e)
        return None

    def _update(self, server_id: str, values: ServerValues) -> str | None:
        refusal = self._token_refusal(values.token)
        if refusal:
            return refusal
        server = next((s for s in self.settings.servers if s.id == server_id), None)
        if server is None:
            return "That server is no longer in the list."
        try:
            self.settings.update_server(
                server_id,
                name=values.name or None,
                url=None if not server.remote else (values.url or None),
                token=values.token or None,
                secrets=self.services.secrets,
                tls_ca=values.tls_ca if server.remote else None,
            )
            self._changed(f"Saved server {values.name or server.name!r}.", select=server_id)
        except Exception as e:  # noqa: BLE001
            return error_text(e)
        return None

    def add_server(self, name: str, url: str, token: str = ""):
        """Add a remote server (token kept only in the keyring). The new ServerEntry, or None (message shown)."""
        before = {s.id for s in self.settings.servers}
        error = self._add(ServerValues(name=name, url=url, token=token or ""))
        if error:
            self._fail(error)
            return None
        return next((s for s in self.settings.servers if s.id not in before), None)

    def edit_server(self, server_id: str, name: str | None = None, url: str | None = None, token: str | None = None):
        """Change a server; an empty/None token keeps the stored one. True on success (else a message shows)."""
        error = self._update(server_id, ServerValues(name=name or "", url=url or "", token=token or ""))
        if error:
            self._fail(error)
            return False
        return True

    def remove_selected(self, confirm: bool = False) -> bool:
        server = self.selected_server()
        if server is None:
            return False
        if not server.remote:
            self._fail(f"{server.name} is built in and cannot be removed (you can rename it).")
            return False
        if confirm and not self.confirm(
            "Remove server", f"Remove {server.name!r} ({server.url}) and its stored API token?"
        ):
            return False
        try:
            self.settings.remove_server(server.id, self.services.secrets)
            self._changed(f"Removed server {server.name!r}.")
        except Exception as e:  # noqa: BLE001
            self._fail(error_text(e))
            return False
        return True

    def _on_add(self) -> None:
        values, error = ServerValues(), None
        while True:
            values = self.ask_server(values=values, editing=False, token_blocked=self.keyring_message(), error=error)
            if values is None:
                return
            error = self._add(values)
            if error is None:
                return

    def _on_edit(self) -> None:
        server = self.selected_server()
        if server is None:
            return
        values, error = ServerValues(name=server.name, url=server.url, tls_ca=server.tls_ca or ""), None
        while True:
            values = self.ask_server(
                values=values, editing=True, local=not server.remote, token_blocked=self.keyring_message(), error=error
            )
            if values is None:
                return
            error = self._update(server.id, values)
            if error is None:
                return

    # --- connection test ---------------------------------------------------------------------------

    @property
    def testing(self) -> bool:
        return self._testing is not None

    def start_test(self) -> bool:
        """Test the selected server in a worker thread; the result arrives via ``testFinished``."""
        server = self.selected_server()
        if server is None or self._testing is not None:
            return False
        self._ticket += 1
        self._testing = self._ticket
        self._tested_name = server.name
        self.result_label.show_message(f"Testing the connection to {server.name}…", "info")
        self.status_label.clear()
        self.statusMessage.emit(f"Testing the connection to {server.name}…")
        self._update_buttons()
        services = self.services
        self._untrusted = None

        def test() -> str:
            try:
                return services.test_connection(server)
            except BackendTLSError:
                # what the server presents, for the user to compare with the operator's fingerprint
                self._untrusted = (server.id, *services.server_certificate(server))
                raise

        self.thread_pool.start(_Job(test, self._ticket, self._relay))
        return True

    def _on_test_finished(self, ticket: int, ok: bool, text: str) -> None:
        if ticket != self._testing:
            return
        self._testing = None
        text = f"{self._tested_name}: {text}"
        self.last_test = (ok, text)
        self.result_label.show_message(text, "ok" if ok else "error")
        self.status_label.clear()
        self.statusMessage.emit(text)
        self._update_buttons()
        self.testFinished.emit(ok, text)
        untrusted, self._untrusted = self._untrusted, None
        if not ok and untrusted is not None:
            self.offer_trust(*untrusted)

    def offer_trust(self, server_id: str, pem: str, fingerprint: str) -> bool:
        """Show the certificate's fingerprint; if the user trusts it, verify this server with it from now on and
        test again. True when it was trusted."""
        server = next((s for s in self.settings.servers if s.id == server_id), None)
        if server is None or not self.confirm(
            "Trust this certificate?",
            f"{server.name} ({server.url}) presents a certificate that your system does not trust.\n\n"
            f"SHA-256 fingerprint:\n{fingerprint}\n\n"
            "Trust it only if this is exactly the fingerprint the server's operator gave you "
            "(`openssl x509 -noout -fingerprint -sha256 -in cert.pem` on the server).",
        ):
            return False
        try:
            self.settings.trust_certificate(server_id, pem)
        except Exception as e:  # noqa: BLE001 - shown to the user, the app keeps working
            self._fail(error_text(e))
            return False
        self._changed(f"Trusted the certificate of {server.name!r} ({fingerprint[:23]}…).", select=server_id)
        self.start_test()
        return True

    def test_selected(self, timeout_s: float | None = None) -> str:
        """Test the selected server and wait for the result (the event loop keeps running meanwhile)."""
        if not self.start_test():
            if self._testing is None:
                return "No server selected."
        loop = QEventLoop()
        self.testFinished.connect(loop.quit)
        if timeout_s is not None:
            QTimer.singleShot(int(timeout_s * 1000), loop.quit)
        try:
            if self._testing is not None:
                loop.exec()
        finally:
            self.testFinished.disconnect(loop.quit)
        if self._testing is not None:
            return "The connection test is still running."
        return self.last_test[1] if self.last_test else ""
