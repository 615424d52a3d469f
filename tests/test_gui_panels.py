"""The Servers, Keys and Gallery panels of the desktop app, driven through their public methods (pytest-qt).

Nothing modal runs: the panels' confirm / ask_* / opener hooks are replaced. Set HEDIFF_PANEL_SHOTS=DIR to
also keep the panel screenshots of test_panel_screenshots there.
"""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import pytestqt  # noqa: F401  # the qtbot fixture; a missing GUI extra must fail these tests, not skip them
from keyring.backends import fail
from PIL import Image
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QDialogButtonBox, QLineEdit, QTabWidget

from hediff.common import protocol
from hediff.desktop.core.keystore import KeyringUnavailable, MemoryKeyring, SecretStore
from hediff.desktop.core.services import AppServices
from hediff.desktop.core.settings import Settings
from hediff.desktop.ui.dialogs import PassphraseDialog, ServerDialog, ServerValues, passphrase_problem
from hediff.desktop.ui.gallery_panel import GalleryPanel
from hediff.desktop.ui.keys_panel import KeysPanel
from hediff.desktop.ui.servers_panel import ServersPanel

TOKEN = "hdt_test-token-that-must-never-reach-a-file"
PASSPHRASE = "correct horse battery staple"
LEFT = Qt.MouseButton.LeftButton


@pytest.fixture
def services(tmp_path):
    return AppServices(data_dir=tmp_path / "data", secrets=SecretStore(MemoryKeyring()))


@pytest.fixture
def no_keyring(tmp_path):
    return AppServices(data_dir=tmp_path / "data", secrets=SecretStore(fail.Keyring()))


@pytest.fixture(scope="module")
def results(tiny_model_dir):
    """Three real finished generations (tiny model, loopback backend)."""
    from hediff.desktop.core.api import HEDiffusion

    with HEDiffusion(tiny_model_dir, local_backend=True) as hd:
        return [hd.generate("a red circle", steps=2, seed=seed) for seed in (11, 12, 13)]


def _files_text(root: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in root.rglob("*") if p.is_file() and p.suffix != ".png")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shown(widget) -> bool:
    return not widget.isHidden()


# --- servers ---------------------------------------------------------------------------------------


def test_servers_add_edit_remove_keeps_tokens_in_the_keyring(qtbot, services):
    panel = ServersPanel(services)
    qtbot.addWidget(panel)
    assert [panel.table.item(r, 1).text() for r in range(panel.table.rowCount())] == [
        "no server: everything runs in the app",
        "local backend (this computer)",
    ]

    with qtbot.waitSignal(panel.serversChanged, timeout=2000):
        entry = panel.add_server("Lab GPU", "https://gpu.example.org:8000", TOKEN)
    assert entry is not None and entry.name == "Lab GPU"
    assert [panel.table.item(r, 0).text() for r in range(panel.table.rowCount())] == [
        "This device (private)",
        "Local backend",
        "Lab GPU",
    ]
    assert panel.table.item(2, 1).text() == "https://gpu.example.org:8000"
    settings_file = services.data_dir / "settings.json"
    assert "gpu.example.org" in settings_file.read_text()
    assert TOKEN not in _files_text(services.data_dir)
    assert services.settings.token_for(entry.id, services.secrets) == TOKEN
    assert services.secrets.get(f"server-token:{entry.id}") == TOKEN

    # edit: an empty token keeps the stored one; a new one replaces it, still only in the keyring
    assert panel.edit_server(entry.id, name="Lab GPU 2", url="https://gpu2.example.org", token="")
    assert services.settings.token_for(entry.id, services.secrets) == TOKEN
    assert panel.edit_server(entry.id, token="hdt_replacement-token")
    assert services.settings.token_for(entry.id, services.secrets) == "hdt_replacement-token"
    reloaded = Settings.load(services.data_dir)
    assert [(s.name, s.url) for s in reloaded.servers if s.remote] == [("Lab GPU 2", "https://gpu2.example.org")]
    assert "hdt_replacement-token" not in _files_text(services.data_dir)

    # a bad URL is a message in the panel, nothing is added, the panel keeps working
    assert panel.add_server("Bad", "ftp://example.org", "") is None
    assert _shown(panel.result_label) and panel.result_label.kind == "error"
    assert "http" in panel.result_label.text().lower()
    assert len(services.settings.servers) == 3

    # the built-in entries cannot be removed
    for built_in in ("device", "local"):
        panel.select(built_in)
        assert not panel.remove_button.isEnabled()
        assert not panel.remove_selected()
        assert "is built in and cannot be removed" in panel.result_label.text()

    # removal asks first (through the hook) and deletes the token too
    panel.select(entry.id)
    panel.confirm = lambda title, text: False
    assert not panel.remove_selected(confirm=True)
    assert len(services.settings.servers) == 3
    asked = []
    panel.confirm = lambda title, text: asked.append(text) or True
    with qtbot.waitSignal(panel.serversChanged, timeout=2000):
        qtbot.mouseClick(panel.remove_button, LEFT)
    assert asked and "Lab GPU 2" in asked[0]
    assert [s.id for s in services.settings.servers] == ["device", "local"]
    assert services.secrets.get(f"server-token:{entry.id}") is None
    assert [s.id for s in Settings.load(services.data_dir).servers] == ["device", "local"]


def test_servers_dialog_flow_reasks_with_the_error(qtbot, services):
    panel = ServersPanel(services)
    qtbot.addWidget(panel)
    calls = []
    answers = [ServerValues("Lab", "gopher://nope", TOKEN), ServerValues("Lab", "http://10.0.0.5:8000", TOKEN)]

    def ask_server(**kw):
        calls.append(kw)
        return answers.pop(0) if answers else None

    panel.ask_server = ask_server
    qtbot.mouseClick(panel.add_button, LEFT)
    assert len(calls) == 2 and calls[0]["error"] is None and calls[1]["error"]  # re-asked, with the error
    assert calls[1]["values"].url == "gopher://nope"  # what the user typed is kept
    assert [s.url for s in services.settings.servers if s.remote] == ["http://10.0.0.5:8000"]

    # edit through the dialog: it gets the current values and is told it is an edit
    panel.ask_server = lambda **kw: calls.append(kw) or ServerValues("Renamed", kw["values"].url, "")
    qtbot.mouseClick(panel.edit_button, LEFT)
    assert calls[-1]["editing"] is True and calls[-1]["values"].name == "Lab"
    assert [s.name for s in services.settings.servers if s.remote] == ["Renamed"]
    server_id = panel.selected_id()
    assert services.settings.token_for(server_id, services.secrets) == TOKEN


def test_server_dialog_widgets(qtbot):
    dialog = ServerDialog(values=ServerValues("Lab", "https://x.org"), editing=True)
    qtbot.addWidget(dialog)
    assert dialog.token_edit.echoMode() == QLineEdit.EchoMode.Password
    assert "leave empty to keep the current token" in dialog.token_edit.placeholderText()
    dialog.token_edit.setText("  hdt_new ")
    assert dialog.values() == ServerValues("Lab", "https://x.org", "hdt_new")
    blocked = ServerDialog(token_blocked="no keyring here")
    qtbot.addWidget(blocked)
    assert not blocked.token_edit.isEnabled() and "no keyring here" in blocked.token_note.text()
    local = ServerDialog(values=ServerValues("Local backend"), editing=True, local=True)
    qtbot.addWidget(local)
    assert not local.url_edit.isEnabled() and local.values().url == ""


def test_connection_test_against_a_real_backend(qtbot, services, backend):
    panel = ServersPanel(services)
    qtbot.addWidget(panel)
    good = panel.add_server("Loopback", backend.url, backend.token)
    text = panel.test_selected(timeout_s=60)
    assert panel.last_test[0] is True, text
    assert text.startswith("Loopback: ") and panel.result_label.kind == "ok"

    wrong = panel.add_server("Wrong token", backend.url, "hdt_wrong")
    panel.select(wrong.id)
    text = panel.test_selected(timeout_s=60)
    assert panel.last_test[0] is False and "token" in text.lower()
    assert panel.result_label.kind == "error" and "hdt_wrong" not in text

    closed_url = f"http://127.0.0.1:{_closed_port()}"
    closed = panel.add_server("Closed", closed_url, "hdt_x")
    panel.select(closed.id)
    text = panel.test_selected(timeout_s=60)
    assert panel.last_test[0] is False and closed_url in text
    assert "Traceback" not in text

    panel.select(good.id)
    assert panel.test_selected(timeout_s=60).startswith("Loopback: ") and panel.last_test[0]


class _NewerBackend(BaseHTTPRequestHandler):
    """A backend from the future: healthy, but speaking the next protocol version."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        version = protocol.PROTOCOL_VERSION + 1
        answers = {
            "/v1/health": {"status": "ok", "protocol_version": version, "model": "embedded"},
            "/v1/capabilities": {"protocol_version": version, "model": {"id": "embedded"}, "schedulers": ["ddim"]},
        }
        body = json.dumps(answers.get(self.path, {})).encode()
        self.send_response(200 if self.path in answers else 404)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_connection_test_names_both_protocol_versions(qtbot, services):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NewerBackend)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        panel = ServersPanel(services)
        qtbot.addWidget(panel)
        url = f"http://127.0.0.1:{server.server_address[1]}"
        panel.add_server("Newer", url, "hdt_x")
        text = panel.test_selected(timeout_s=30)
    finally:
        server.shutdown()
        server.server_close()
    assert panel.last_test[0] is False and panel.result_label.kind == "error"
    assert (
        panel.result_label.text()
        == text
        == (
            f"Newer: {url} speaks protocol {protocol.PROTOCOL_VERSION + 1}, this app speaks "
            f"{protocol.PROTOCOL_VERSION}; update the older side"
        )
    )


def test_a_self_signed_server_is_trusted_after_the_user_checks_its_fingerprint(qtbot, services, server_model, tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    from hediff.backend.app import create_app
    from hediff.backend.auth import TokenStore
    from hediff.backend.serve import check_tls_files, start_in_thread
    from tests.test_tls import self_signed

    cert, key = self_signed(tmp_path, "lab")
    expected = x509.load_pem_x509_certificate(cert.read_bytes()).fingerprint(hashes.SHA256()).hex().upper()
    tokens, token = TokenStore.ephemeral()
    running = start_in_thread(create_app(server_model, tokens), tls=check_tls_files(cert, key))
    try:
        panel = ServersPanel(services)
        qtbot.addWidget(panel)
        entry = panel.add_server("Lab (self-signed)", running.url, token)
        asked = []
        panel.confirm = lambda title, text: asked.append(text) or False
        panel.select(entry.id)
        result = panel.test_selected(timeout_s=60)
        assert "certificate" in result.lower() and len(asked) == 1  # refused, then offered with the fingerprint
        shown = asked[0].split("SHA-256 fingerprint:\n")[1].split("\n")[0]
        assert shown.replace(":", "") == expected
        assert services.settings.server(entry.id).tls_ca is None  # declined: nothing changes

        panel.confirm = lambda title, text: asked.append(text) or True
        panel.test_selected(timeout_s=60)  # refused again, offered again, trusted, tested again
        qtbot.waitUntil(lambda: panel.last_test is not None and panel.last_test[0], timeout=60_000)
        assert panel.last_test[1].startswith("Lab (self-signed): OK: model tiny-test")
        stored = Settings.load(services.data_dir).server(entry.id)
        assert stored.tls_ca and Path(stored.tls_ca).read_bytes().strip() == cert.read_bytes().strip()
        assert oct(Path(stored.tls_ca).stat().st_mode & 0o777) == "0o600"
    finally:
        running.stop()


def test_the_server_dialog_takes_a_ca_file_and_refuses_a_bad_one(qtbot, services, tmp_path):
    from tests.test_tls import self_signed

    cert, _key = self_signed(tmp_path, "ca")
    panel = ServersPanel(services)
    qtbot.addWidget(panel)
    panel.ask_server = lambda **kw: ServerValues("Private CA box", "https://gpu.lab:8470", TOKEN, str(cert))
    with qtbot.waitSignal(panel.serversChanged, timeout=2000):
        qtbot.mouseClick(panel.add_button, LEFT)
    added = next(s for s in services.settings.servers if s.name == "Private CA box")
    assert added.tls_ca == str(cert)
    (tmp_path / "junk.pem").write_text("not a certificate")
    errors = []
    answers = [ServerValues("Bad CA", "https://x.lab", TOKEN, str(tmp_path / "junk.pem"))]
    panel.ask_server = lambda **kw: errors.append(kw.get("error")) or (answers.pop() if answers else None)
    qtbot.mouseClick(panel.add_button, LEFT)
    assert errors[1] and "cannot be used as PEM certificates" in errors[1]
    assert all(s.name != "Bad CA" for s in services.settings.servers)


def test_connection_test_runs_off_the_gui_thread(qtbot, services):
    panel = ServersPanel(services)
    qtbot.addWidget(panel)
    release = threading.Event()
    threads = []

    def slow(server):
        threads.append(threading.current_thread())
        release.wait(10)
        return "OK, slow but fine"

    services.test_connection = slow
    t0 = time.perf_counter()
    assert panel.start_test()
    assert time.perf_counter() - t0 < 0.5  # returned at once: the GUI thread is free
    assert panel.testing and not panel.test_button.isEnabled()
    assert "Testing" in panel.result_label.text()
    qtbot.wait(50)  # the event loop runs while the test is pending
    with qtbot.waitSignal(panel.testFinished, timeout=5000) as blocker:
        release.set()
    assert blocker.args == [True, "This device (private): OK, slow but fine"]
    assert threads and threads[0] is not threading.main_thread()
    assert panel.test_button.isEnabled()

    def broken(server):
        raise RuntimeError(f"internal detail {TOKEN}")

    services.test_connection = broken
    text = panel.test_selected(timeout_s=10)
    assert TOKEN not in text and "RuntimeError" in text and panel.result_label.kind == "error"


def test_servers_without_keyring_refuse_tokens(qtbot, no_keyring):
    panel = ServersPanel(no_keyring)
    qtbot.addWidget(panel)
    with pytest.raises(KeyringUnavailable) as excinfo:
        no_keyring.secrets.get("anything")
    assert _shown(panel.keyring_label)
    assert str(excinfo.value) in panel.keyring_label.text()  # the KeyringUnavailable text, word for word
    assert panel.add_server("Lab", "https://gpu.example.org", TOKEN) is None
    assert panel.result_label.kind == "error" and "keyring" in panel.result_label.text().lower()
    assert [s.id for s in no_keyring.settings.servers] == ["device", "local"]
    assert TOKEN not in _files_text(no_keyring.data_dir)
    # the dialog is told why the token field is unusable
    seen = []
    panel.ask_server = lambda **kw: seen.append(kw) or None
    qtbot.mouseClick(panel.add_button, LEFT)
    assert seen and seen[0]["token_blocked"]


# --- keys ------------------------------------------------------------------------------------------


def test_keys_create_rotate_delete(qtbot, services):
    panel = KeysPanel(services)
    qtbot.addWidget(panel)
    box = panel.preset_boxes["fast"]
    assert box.fingerprint.text() == "no device key" and box.create_button.isEnabled()
    assert not box.rotate_button.isEnabled() and not box.delete_button.isEnabled()
    assert panel.passphrase_button.isHidden()

    with qtbot.waitSignal(panel.keysChanged, timeout=10000):
        info = panel.create("fast")
    assert info is not None and info.protection == "keyring"
    assert box.fingerprint.text() == info.fingerprint and "keyring" in box.protection.text()
    assert not box.create_button.isEnabled() and box.rotate_button.isEnabled()

    panel.confirm = lambda title, text: False
    assert panel.rotate("fast", confirm=True) is None
    assert services.keys.info("fast").fingerprint == info.fingerprint
    panel.confirm = lambda title, text: True
    rotated = panel.rotate("fast", confirm=True)
    assert rotated is not None and rotated.fingerprint != info.fingerprint
    assert box.fingerprint.text() == rotated.fingerprint

    panel.confirm = lambda title, text: False
    assert not panel.delete("fast", confirm=True)
    assert services.keys.info("fast") is not None
    asked = []
    panel.confirm = lambda title, text: asked.append(text) or True
    qtbot.mouseClick(box.delete_button, LEFT)  # the click returns at once; the deletion runs off the GUI thread
    assert panel.wait()
    assert asked and rotated.fingerprint in asked[0]
    assert services.keys.info("fast") is None and box.fingerprint.text() == "no device key"
    assert not panel.delete("fast")  # nothing to delete: a message, no exception
    assert panel.result_label.kind == "error"


def test_key_policy_is_bound_to_settings(qtbot, services):
    panel = KeysPanel(services)
    qtbot.addWidget(panel)
    assert services.settings.key_policy == "fresh" and panel.policy_buttons["fresh"].isChecked()
    assert "default" in panel.policy_buttons["fresh"].text()
    assert panel.set_policy("device")
    assert panel.policy_buttons["device"].isChecked()
    assert Settings.load(services.data_dir).key_policy == "device"
    panel.policy_buttons["fresh"].click()
    assert services.settings.key_policy == "fresh"
    assert Settings.load(services.data_dir).key_policy == "fresh"
    assert not panel.set_policy("sometimes")


def test_keys_without_keyring_need_a_passphrase(qtbot, no_keyring):
    panel = KeysPanel(no_keyring)
    qtbot.addWidget(panel)
    assert _shown(panel.keyring_label) and _shown(panel.passphrase_button)
    assert "passphrase" in panel.passphrase_button.text().lower()
    box = panel.preset_boxes["fast"]
    assert not box.create_button.isEnabled()  # never stored unprotected
    assert panel.create("fast") is None
    assert panel.result_label.kind == "error"
    assert no_keyring.keys.info("fast") is None
    assert not list(no_keyring.data_dir.rglob("*.hdkey"))

    assert not panel.enable_passphrase("short")
    assert "8" in panel.result_label.text()

    asked = []
    panel.ask_passphrase = lambda **kw: asked.append(kw) or PASSPHRASE
    qtbot.mouseClick(panel.passphrase_button, LEFT)
    assert panel.wait()
    assert asked and asked[0]["confirm"] is True
    assert panel.passphrase_button.isHidden() and panel.keyring_label.kind == "info"
    assert box.create_button.isEnabled()
    info = panel.create("fast")
    assert info is not None and info.protection == "passphrase"
    assert "passphrase" in box.protection.text()
    assert PASSPHRASE not in _files_text(no_keyring.data_dir)


def test_keys_protected_by_a_passphrase_are_unlocked_and_checked(qtbot, tmp_path):
    data = tmp_path / "data"
    first = KeysPanel(AppServices(data_dir=data, secrets=SecretStore(fail.Keyring())))
    qtbot.addWidget(first)
    assert first.enable_passphrase(PASSPHRASE)
    created = first.create("fast")
    assert created.protection == "passphrase"

    # next session: the key is listed (its header is readable) but must be unlocked before use
    later = AppServices(data_dir=data, secrets=SecretStore(fail.Keyring()))
    panel = KeysPanel(later)
    qtbot.addWidget(panel)
    assert panel.needs_unlock() and _shown(panel.passphrase_button)
    assert panel.passphrase_button.text().startswith("Unlock")
    assert panel.preset_boxes["fast"].fingerprint.text() == created.fingerprint
    asked = []
    panel.ask_passphrase = lambda **kw: asked.append(kw) or "not the passphrase"
    qtbot.mouseClick(panel.passphrase_button, LEFT)
    assert not panel.wait()
    assert asked[0]["confirm"] is False  # unlocking: entered once
    assert panel.result_label.kind == "error" and "wrong passphrase" in panel.result_label.text().lower()
    assert not later.keys.uses_passphrase and panel.needs_unlock()
    panel.ask_passphrase = lambda **kw: PASSPHRASE
    qtbot.mouseClick(panel.passphrase_button, LEFT)
    assert panel.wait()
    assert later.keys.uses_passphrase and not panel.needs_unlock() and panel.passphrase_button.isHidden()
    assert later.keys.load("fast").fingerprint == created.fingerprint

    # with a working keyring, passphrase-protected keys still offer the unlock button
    with_keyring = KeysPanel(AppServices(data_dir=data, secrets=SecretStore(MemoryKeyring())))
    qtbot.addWidget(with_keyring)
    assert with_keyring.needs_unlock() and _shown(with_keyring.passphrase_button)
    assert with_keyring.keyring_label.kind == "info"


def test_passphrase_dialog(qtbot):
    assert passphrase_problem("short", "short")
    assert passphrase_problem(PASSPHRASE, PASSPHRASE + "x") == "The two passphrases do not match."
    assert passphrase_problem(PASSPHRASE, PASSPHRASE) is None
    assert passphrase_problem(PASSPHRASE, None) is None

    dialog = PassphraseDialog()
    qtbot.addWidget(dialog)
    ok = dialog.buttons.button(QDialogButtonBox.StandardButton.Ok)
    assert dialog.first.echoMode() == QLineEdit.EchoMode.Password == dialog.second.echoMode()
    assert not ok.isEnabled()
    dialog.first.setText(PASSPHRASE)
    dialog.second.setText("something else")
    assert not ok.isEnabled() and "match" in dialog.problem_label.text()
    dialog.second.setText(PASSPHRASE)
    assert ok.isEnabled() and dialog.passphrase() == PASSPHRASE

    unlock = PassphraseDialog(confirm=False)
    qtbot.addWidget(unlock)
    unlock.first.setText(PASSPHRASE)
    assert unlock.buttons.button(QDialogButtonBox.StandardButton.Ok).isEnabled()


# --- gallery ---------------------------------------------------------------------------------------


def _filled_gallery(services, results, n=2):
    return [services.gallery.add(r, include_prompt_in_png=False, remember_prompt=True) for r in results[:n]]


def test_gallery_lists_loads_exports_opens_deletes(qtbot, services, results, tmp_path):
    panel = GalleryPanel(services)
    qtbot.addWidget(panel)
    assert panel.list.count() == 0 and _shown(panel.empty_label)
    assert not panel.load_button.isEnabled()

    entries = _filled_gallery(services, results)
    panel.refresh()
    assert panel.list.count() == 2 and panel.empty_label.isHidden()
    assert set(panel.entry_ids()) == {e.id for e in entries}
    assert panel.problems_label.isHidden()
    for i in range(2):
        item = panel.list.item(i)
        assert not item.icon().isNull()
        assert "steps" in item.toolTip() and "seed" in item.toolTip() and "encryption" in item.toolTip()

    target = next(e for e in entries if e.params.seed == 12)
    assert panel.select(target.id) and panel.load_button.isEnabled()
    assert "seed 12" in panel.details.text() and "a red circle" in panel.details.text()
    with qtbot.waitSignal(panel.loadSettingsRequested, timeout=1000) as blocker:
        params = panel.load_selected()
    assert blocker.args == [target.params] and params == results[1].params
    assert params.prompt == "a red circle" and params.seed == 12 and params.steps == 2

    plain = panel.export_selected(tmp_path / "out" / "plain.png", include_prompt=False)
    with_prompt = panel.export_selected(tmp_path / "out" / "with-prompt.png", include_prompt=True)
    assert plain is not None and with_prompt is not None
    plain_text, prompt_text = Image.open(plain).text, Image.open(with_prompt).text
    assert plain_text["hediff:seed"] == "12" and "hediff:prompt" not in plain_text
    assert prompt_text["hediff:prompt"] == "a red circle"

    opened = []
    panel.opener = lambda url: opened.append(url) or True
    assert panel.open_selected()
    assert Path(opened[0].toLocalFile()) == Path(target.image_path)
    panel.opener = lambda url: False
    assert not panel.open_selected() and panel.result_label.kind == "error"

    # export through the button: the path hook and the "include prompt" checkbox (default off)
    assert not panel.include_prompt.isChecked()
    panel.ask_export_path = lambda suggested: str(tmp_path / "out" / "button")
    qtbot.mouseClick(panel.export_button, LEFT)
    assert "hediff:prompt" not in Image.open(tmp_path / "out" / "button.png").text

    panel.confirm = lambda title, text: False
    assert not panel.delete_selected(confirm=True)
    assert panel.list.count() == 2
    panel.confirm = lambda title, text: True
    assert panel.delete_selected(confirm=True)
    assert panel.list.count() == 1 and target.id not in panel.entry_ids()
    assert services.gallery.get(target.id) is None
    assert not Path(target.image_path).exists()
    assert not panel.load_button.isEnabled()  # nothing selected any more
    assert panel.load_selected() is None and panel.result_label.kind == "error"


def test_gallery_shows_corrupt_entries_as_a_problem(qtbot, services, results):
    entries = _filled_gallery(services, results, n=3)
    bad = entries[0]
    sidecars = [p for p in services.gallery.root.rglob("*.json") if bad.id in p.name]
    assert sidecars, "expected a JSON sidecar named after the entry id"
    sidecars[0].write_text("{not json")
    panel = GalleryPanel(services)
    qtbot.addWidget(panel)
    assert panel.list.count() == 2 and bad.id not in panel.entry_ids()
    assert _shown(panel.problems_label) and panel.problems_label.kind == "warning"
    assert "could not be read" in panel.problems_label.text()
    assert panel.select(entries[1].id) and panel.load_selected() == entries[1].params


def test_gallery_errors_are_messages(qtbot, services, results, tmp_path):
    _filled_gallery(services, results, n=1)
    panel = GalleryPanel(services)
    qtbot.addWidget(panel)
    panel.select(panel.entry_ids()[0])
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert panel.export_selected(blocker / "sub" / "x.png") is None  # parent is a file
    assert panel.result_label.kind == "error" and "Export failed" in panel.result_label.text()
    assert panel.list.count() == 1


# --- screenshots -----------------------------------------------------------------------------------


def _assert_screenshot_shows(png: Path, widget) -> None:
    """The saved file is the whole widget, drawn: its size in pixels, and far more than a flat background."""
    ratio = widget.devicePixelRatioF()
    with Image.open(png) as image:
        assert image.size == (round(widget.width() * ratio), round(widget.height() * ratio)), png.name
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert len(colours) >= 16, f"{png.name}: only {len(colours)} colours, nothing drawn"
    # no single colour covers the whole picture: widgets, text and frames are on it
    assert max(count for count, _ in colours) < 0.95 * sum(count for count, _ in colours), png.name


def test_panel_screenshots(qtbot, tmp_path, results, backend):
    services = AppServices(data_dir=tmp_path / "data", secrets=SecretStore(MemoryKeyring()))
    bare = AppServices(data_dir=tmp_path / "bare", secrets=SecretStore(fail.Keyring()))
    out = Path(os.environ.get("HEDIFF_PANEL_SHOTS") or tmp_path / "shots")
    out.mkdir(parents=True, exist_ok=True)

    servers = ServersPanel(services)
    lab = servers.add_server("Lab GPU server", backend.url, backend.token)
    servers.add_server("Cloud (example)", "https://hediff.example.org:8443", "hdt_x")
    servers.select(lab.id)
    servers.test_selected(timeout_s=60)
    assert servers.last_test == (True, servers.result_label.text())  # the screenshot shows a passed test
    assert servers.result_label.text().startswith("Lab GPU server: OK: model ")
    keys = KeysPanel(services)
    keys.create("fast")
    _filled_gallery(services, results, n=3)
    gallery = GalleryPanel(services)
    gallery.select(gallery.entry_ids()[0])
    no_keyring_servers = ServersPanel(bare)
    no_keyring_keys = KeysPanel(bare)
    broken = _filled_gallery(bare, results, n=2)
    (bare.gallery.root / f"{broken[0].id}.json").write_text("{not json")
    problem_gallery = GalleryPanel(bare)

    shots = {
        "servers": servers,
        "keys": keys,
        "gallery": gallery,
        "servers-no-keyring": no_keyring_servers,
        "keys-no-keyring": no_keyring_keys,
        "gallery-with-problem": problem_gallery,
    }
    server_dialog = ServerDialog(values=ServerValues("Lab GPU server", backend.url), editing=True)
    passphrase_dialog = PassphraseDialog()
    passphrase_dialog.first.setText(PASSPHRASE)
    passphrase_dialog.second.setText("typo")
    for name, dialog in (("server-dialog", server_dialog), ("passphrase-dialog", passphrase_dialog)):
        qtbot.addWidget(dialog)
        dialog.show()
        qtbot.waitExposed(dialog)
        assert dialog.grab().save(str(out / f"{name}.png"))
        _assert_screenshot_shows(out / f"{name}.png", dialog)
    for name, panel in shots.items():
        tabs = QTabWidget()  # as the main window shows them
        qtbot.addWidget(tabs)
        tabs.addTab(panel, name.split("-")[0].capitalize())
        tabs.resize(560, 640)
        tabs.show()
        qtbot.waitExposed(tabs)
        qtbot.wait(20)
        assert tabs.grab().save(str(out / f"{name}.png"))
        _assert_screenshot_shows(out / f"{name}.png", tabs)
    assert json.loads((services.data_dir / "settings.json").read_text())  # still a valid file


# --- privacy ---------------------------------------------------------------------------------------


def test_privacy_panel_shows_the_measured_leakage(qtbot, tmp_path):
    """Each job shows what bench/leakage.py measured for its (split, encryption), from the shipped file."""
    from hediff.desktop.core import leakage
    from hediff.desktop.core.engine import GenerationParams
    from hediff.desktop.ui.privacy_panel import PrivacyPanel

    panel = PrivacyPanel()
    qtbot.addWidget(panel)
    assert panel.leakage_label.text() == "–"
    panel.begin_job(GenerationParams(prompt="a red circle", split="conv_in", encryption="full"))
    measured = leakage.lookup("conv_in", "full")
    text = panel.leakage_label.text()
    assert text == measured.summary()
    assert measured.verdict in text and "PSNR" in text
    panel.begin_job(GenerationParams(prompt="a red circle", split="u1", encryption="full"))
    u1 = leakage.lookup("u1", "full")
    assert u1 is not None and panel.leakage_label.text() == u1.summary() != text
    # a loopback backend: the tab agrees with the green line above Generate, and quotes the remote risk as such
    panel.begin_job(GenerationParams(prompt="a red circle", split="conv_in", encryption="full"), remote=False)
    local = panel.leakage_label.text()
    assert local.startswith("Nothing leaves this machine") and measured.summary() in local
    assert "b3261e" not in panel.leakage_label.styleSheet()
    panel.reset()
    assert panel.leakage_label.text() == "–"

    broken = tmp_path / "leakage.json"
    broken.write_text("[]")
    other = PrivacyPanel(describe_leakage=lambda s, e: leakage.describe(s, e, path=broken))
    qtbot.addWidget(other)
    other.begin_job(GenerationParams(prompt="a red circle"))
    assert other.leakage_label.text().startswith(leakage.NOT_MEASURED) and "format" in other.leakage_label.text()
