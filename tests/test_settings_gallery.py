"""Desktop core without Qt: data folder, settings (tokens only in the keyring), gallery, AppServices."""

from __future__ import annotations

import json
import os
import socket
import stat
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from keyring.backends import fail
from PIL import Image

from hediff.desktop.core import services as services_module
from hediff.desktop.core.api import NotPrivateError
from hediff.desktop.core.appdata import default_data_dir
from hediff.desktop.core.backend_client import BackendRejected, BackendUnreachable
from hediff.desktop.core.engine import GenerationParams
from hediff.desktop.core.gallery import Gallery, GalleryError
from hediff.desktop.core.keystore import KeyringUnavailable, MemoryKeyring, SecretStore
from hediff.desktop.core.services import AppServices, NoServerToken
from hediff.desktop.core.settings import ServerEntry, Settings, params_from_dict

PROMPT = "a red circle"
TOKEN = "hdt_TOPSECRET_token_value"


@pytest.fixture(scope="module")
def results(tiny_model_dir):
    """Two real results (encrypted and plaintext baseline) from a tiny local generation."""
    from hediff.desktop.core.api import HEDiffusion

    hd = HEDiffusion(tiny_model_dir, local_backend=True)
    try:
        encrypted = hd.generate(PROMPT, steps=2, negative_prompt="blurry")
        plain = hd.generate(PROMPT, steps=2, encryption="none", seed=5)
    finally:
        hd.close()
    return encrypted, plain


@pytest.fixture
def store() -> SecretStore:
    return SecretStore(MemoryKeyring())


def _png_text(path: Path) -> dict:
    with Image.open(path) as im:
        return dict(im.text)


# --- data folder ---------------------------------------------------------------------------------------------


def test_default_data_dir_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("HEDIFF_DATA_DIR", str(tmp_path / "x"))
    assert default_data_dir() == tmp_path / "x"


@pytest.mark.skipif(sys.platform != "linux", reason="the XDG layout is Linux's; platformdirs owns the others")
def test_default_data_dir_follows_xdg(tmp_path, monkeypatch):
    monkeypatch.delenv("HEDIFF_DATA_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    assert default_data_dir() == tmp_path / "home" / ".local" / "share" / "hediff"
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_data_dir() == tmp_path / "xdg" / "hediff"


# --- settings ------------------------------------------------------------------------------------------------


def test_settings_from_before_the_on_device_mode_gain_it_and_keep_their_choice(tmp_path):
    (tmp_path / "settings.json").write_text(
        '{"servers": [{"id": "local", "name": "Local backend", "url": "", "local": true}], "selected_server": "local"}'
    )
    s = Settings.load(tmp_path)
    assert s.problem is None
    assert [e.id for e in s.servers] == ["device", "local"] and s.selected_server == "local"


def test_settings_defaults_and_roundtrip(tmp_path):
    s = Settings.load(tmp_path)
    assert s.problem is None
    assert [(e.id, e.name, e.on_device, e.local) for e in s.servers] == [
        ("device", "This device (private)", True, False),
        ("local", "Local backend", False, True),
    ]
    assert (s.selected_server, s.model, s.key_policy) == ("device", "embedded", "fresh")  # private by default
    assert not s.remember_prompt and not s.embed_prompt_in_png and s.window_geometry is None
    s.model, s.key_policy, s.window_geometry, s.embed_prompt_in_png = "/models/sd", "device", "AAEC", True
    s.save()
    if os.name == "posix":
        assert stat.S_IMODE((tmp_path / "settings.json").stat().st_mode) == 0o600
    t = Settings.load(tmp_path)
    assert (t.model, t.key_policy, t.window_geometry, t.embed_prompt_in_png) == ("/models/sd", "device", "AAEC", True)
    assert t.servers == s.servers and t.problem is None


def test_corrupt_settings_fall_back_and_keep_the_file(tmp_path):
    (tmp_path / "settings.json").write_text("{not json")
    s = Settings.load(tmp_path)
    assert s.problem and "unreadable" in s.problem and "settings.json.bad" in s.problem
    assert (tmp_path / "settings.json.bad").read_text() == "{not json"
    assert [e.id for e in s.servers] == ["device", "local"]
    # a partly bad file keeps what is usable and says what was ignored
    (tmp_path / "settings.json").write_text(
        json.dumps({"servers": [{"id": "a", "name": "A", "url": "ftp://x"}], "key_policy": "bogus", "model": "m"})
    )
    s = Settings.load(tmp_path)
    assert (
        s.model == "m"
        and s.key_policy == "fresh"
        and [e.id for e in s.servers] == ["device"]
        and "ignored" in s.problem
    )


def test_tokens_live_only_in_the_keyring(tmp_path, store):
    s = Settings.load(tmp_path)
    entry = s.add_server(" GPU box ", "https://gpu.example:8470/", TOKEN, store)
    assert (entry.name, entry.url, entry.local) == ("GPU box", "https://gpu.example:8470", False)
    assert s.token_for(entry.id, store) == TOKEN
    assert store.get(f"server-token:{entry.id}") == TOKEN
    text = (tmp_path / "settings.json").read_text()
    assert TOKEN not in text and "TOPSECRET" not in text and "token" not in json.loads(text)["servers"][1]
    assert Settings.load(tmp_path).server(entry.id) == entry  # add_server saved

    s.update_server(entry.id, name="GPU", token="hdt_new", secrets=store)
    assert s.token_for(entry.id, store) == "hdt_new" and s.server(entry.id).name == "GPU"
    s.update_server(entry.id, url="http://10.0.0.2:8470")
    assert s.token_for(entry.id, store) == "hdt_new"  # token=None keeps it
    s.update_server(entry.id, token="", secrets=store)
    assert s.token_for(entry.id, store) is None
    s.update_server(entry.id, token=TOKEN, secrets=store)
    s.selected_server = entry.id
    s.remove_server(entry.id, store)
    assert store.get(f"server-token:{entry.id}") is None
    assert [e.id for e in s.servers] == ["device", "local"] and s.selected_server == "device"
    for path in tmp_path.rglob("*"):
        assert not path.is_file() or TOKEN.encode() not in path.read_bytes()


def test_no_keyring_refuses_tokens_but_not_servers(tmp_path):
    nokeyring = SecretStore(fail.Keyring())
    s = Settings.load(tmp_path)
    with pytest.raises(KeyringUnavailable, match="GNOME Keyring|Keychain|Credential Manager"):
        s.add_server("GPU", "https://gpu.example", TOKEN, nokeyring)
    assert [e.id for e in s.servers] == ["device", "local"]
    assert not (tmp_path / "settings.json").exists() or TOKEN not in (tmp_path / "settings.json").read_text()
    entry = s.add_server("Open", "http://127.0.0.1:8470", None, nokeyring)
    with pytest.raises(KeyringUnavailable):
        s.token_for(entry.id, nokeyring)
    s.remove_server(entry.id, nokeyring)  # removing still works
    assert [e.id for e in s.servers] == ["device", "local"]


@pytest.mark.parametrize(
    "url",
    ["", "gpu.example:8470", "ftp://gpu.example", "http://", "http://user:pw@gpu.example", "http://h/?token=x", "x"],
)
def test_url_validation(tmp_path, store, url):
    with pytest.raises(ValueError, match="URL"):
        Settings.load(tmp_path).add_server("GPU", url, TOKEN, store)
    assert store.get("server-token:anything") is None


def test_last_used_settings_without_and_with_prompt(tmp_path):
    s = Settings.load(tmp_path)
    params = GenerationParams(prompt=PROMPT, negative_prompt="blurry", steps=7, seed=3, guidance=5.0, tau=0.25)
    s.params = params.to_dict(include_prompt=True)
    s.save()
    assert "red circle" not in (tmp_path / "settings.json").read_text()
    assert "blurry" not in (tmp_path / "settings.json").read_text()
    back = params_from_dict(Settings.load(tmp_path).params)
    assert back == replace(params, prompt="", negative_prompt="")
    s.params["prompt"] = "sneaked in"  # save() drops prompts whatever is in params
    s.save()
    assert "sneaked" not in (tmp_path / "settings.json").read_text()

    s.remember_prompt = True
    s.params = params.to_dict(include_prompt=True)
    s.save()
    assert params_from_dict(Settings.load(tmp_path).params) == params


# --- gallery -------------------------------------------------------------------------------------------------


def test_gallery_add_list_and_prompt_privacy(tmp_path, results):
    encrypted, plain = results
    times = iter([1000.5, 1000.25, 2000.0])
    g = Gallery(tmp_path / "gallery", clock=lambda: next(times))
    a = g.add(encrypted, include_prompt_in_png=False, remember_prompt=True)
    b = g.add(plain, include_prompt_in_png=True, remember_prompt=True)
    c = g.add(encrypted, include_prompt_in_png=False, remember_prompt=True)
    assert len({a.id, b.id, c.id}) == 3
    assert sorted([a.id, b.id, c.id]) == [b.id, a.id, c.id]  # ids sort by time

    text = _png_text(a.image_path)
    assert "hediff:prompt" not in text and "hediff:negative_prompt" not in text and text["hediff:seed"] == "0"
    assert PROMPT.encode() not in a.image_path.read_bytes()
    assert _png_text(b.image_path)["hediff:prompt"] == PROMPT
    sidecar = json.loads((tmp_path / "gallery" / f"{a.id}.json").read_text())
    assert sidecar["params"]["prompt"] == PROMPT and sidecar["params"]["negative_prompt"] == "blurry"
    if os.name == "posix":
        assert stat.S_IMODE((tmp_path / "gallery" / f"{a.id}.json").stat().st_mode) == 0o600

    entries = g.entries()
    assert [e.id for e in entries] == [c.id, a.id, b.id] and g.problems == []
    e = g.get(a.id)
    assert e.params == encrypted.params and e.created == 1000.5 and e.steps == 2
    assert e.key_fingerprint == encrypted.key_fingerprint and e.server_url == encrypted.server_url
    assert e.encrypted_fraction == pytest.approx(1.0) and e.total_s == pytest.approx(encrypted.total_s)
    assert g.get(b.id).encrypted_fraction is None and g.get(b.id).key_fingerprint is None
    assert "2 steps" in e.summary()
    with Image.open(e.image_path) as im:
        assert im.size == encrypted.image.size


def test_gallery_skips_and_reports_bad_entries(tmp_path, results):
    g = Gallery(tmp_path / "gallery")
    good, corrupt, no_png = (g.add(results[0], False) for _ in range(3))
    (tmp_path / "gallery" / f"{corrupt.id}.json").write_text("{truncated")
    no_png.image_path.unlink()
    orphan = g.add(results[1], False)
    (tmp_path / "gallery" / f"{orphan.id}.json").unlink()
    (tmp_path / "gallery" / "notes.json").write_text("not an entry")  # not gallery-shaped: ignored

    assert [e.id for e in g.entries()] == [good.id]
    assert len(g.problems) == 3
    joined = "\n".join(g.problems)
    assert corrupt.id in joined and no_png.id in joined and orphan.id in joined
    with pytest.raises(GalleryError, match="corrupt"):
        g.get(corrupt.id)
    assert g.get(orphan.id) is None and g.get("../settings") is None

    g.delete(corrupt.id)
    g.delete(no_png.id)
    g.delete(orphan.id)
    g.delete(orphan.id)
    assert [e.id for e in g.entries()] == [good.id] and g.problems == []
    with pytest.raises(GalleryError):
        g.delete("../settings")
    assert Gallery(tmp_path / "nowhere").entries() == []


def test_gallery_export(tmp_path, results):
    g = Gallery(tmp_path / "gallery")
    entry = g.add(results[0], include_prompt_in_png=True, remember_prompt=True)  # stored with the prompt ...
    out = g.export(entry.id, tmp_path / "out" / "plain.png", include_prompt=False)  # ... exported without
    text = _png_text(out)
    assert "hediff:prompt" not in text and "hediff:negative_prompt" not in text
    assert PROMPT.encode() not in out.read_bytes() and b"blurry" not in out.read_bytes()
    assert text["hediff:steps"] == "2" and text["hediff:mean_encrypted_fraction"] == "1.0000"

    out2 = g.export(entry.id, tmp_path / "out" / "with", include_prompt=True)
    assert out2.name == "with.png"
    assert _png_text(out2)["hediff:prompt"] == PROMPT and _png_text(out2)["hediff:negative_prompt"] == "blurry"
    out3 = g.export(entry.id, tmp_path / "out", include_prompt=False)
    assert out3.parent == tmp_path / "out" and entry.id in out3.name
    with Image.open(out) as a, Image.open(entry.image_path) as b:
        assert a.tobytes() == b.tobytes()
    with pytest.raises(GalleryError):
        g.export("20000101-000000-000000-abcdef", tmp_path / "x.png", include_prompt=False)


# --- services ------------------------------------------------------------------------------------------------


def test_services_wiring_and_key_policy(tmp_path, store):
    if os.name == "posix":
        tmp_path.chmod(0o755)
    svc = AppServices(tmp_path, store)
    assert svc.data_dir == tmp_path and svc.secrets is store and svc.gallery.root == tmp_path / "gallery"
    params = GenerationParams(prompt=PROMPT, he_preset="fast")
    assert svc.key_for_generation(params) is None  # default: a fresh key per generation
    svc.settings.key_policy = "device"
    key = svc.key_for_generation(params)
    assert key.fingerprint == svc.keys.info("fast").fingerprint
    assert svc.key_for_generation(params).fingerprint == key.fingerprint
    assert svc.key_for_generation(replace(params, encryption="none")) is None
    if os.name == "posix":  # the app's own folders are private; a data folder the user chose is left as it was
        assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700
        assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o755

    nokeyring = AppServices(tmp_path / "other", SecretStore(fail.Keyring()))
    nokeyring.settings.key_policy = "device"
    with pytest.raises(KeyringUnavailable):
        nokeyring.key_for_generation(params)
    nokeyring.set_passphrase("pw")
    assert nokeyring.keys.info("fast") is None
    nokeyring.keys.scrypt_n = 2**12
    assert nokeyring.key_for_generation(params).fingerprint == nokeyring.keys.info("fast").fingerprint


def test_connect_builds_the_right_client(tmp_path, store, monkeypatch):
    calls = []
    monkeypatch.setattr(services_module, "HEDiffusion", lambda *a, **kw: calls.append((a, kw)) or "client")
    svc = AppServices(tmp_path, store)
    assert svc.connect(svc.settings.server("local"), "embedded", "conv_in") == "client"
    assert calls[-1] == (("embedded",), {"local_backend": True, "split": "conv_in"})

    assert svc.connect(svc.settings.server("device"), "embedded", "u1") == "client"
    assert calls[-1] == (("embedded",), {"split": "u1"})  # no server, no backend: on this device

    remote = svc.settings.add_server("GPU", "https://gpu.example", TOKEN, store)
    with pytest.raises(NotPrivateError, match=r"GPU \(https://gpu.example\) proves nothing .* Not private"):
        svc.connect(remote, "/models/sd", "down0.resnet0")
    assert len(calls) == 2
    svc.settings.acknowledge_not_private(remote.id)
    svc.connect(remote, "/models/sd", "down0.resnet0")
    assert calls[-1] == (
        ("/models/sd",),
        {
            "server": "https://gpu.example",
            "token": TOKEN,
            "split": "down0.resnet0",
            "accept_not_private": True,
            "tls_ca": None,
        },
    )

    bare = svc.settings.add_server("Bare", "https://bare.example", None, store)
    svc.settings.acknowledge_not_private(bare.id)
    with pytest.raises(NoServerToken, match="no API token stored for server 'Bare'"):
        svc.connect(bare, "embedded", "conv_in")
    with pytest.raises(KeyringUnavailable):
        AppServices(tmp_path, SecretStore(fail.Keyring())).connect(remote, "embedded", "conv_in")
    assert len(calls) == 3


def test_test_connection_and_remote_generation(tmp_path, store, backend, tiny_model_dir):
    svc = AppServices(tmp_path, store)
    remote = svc.settings.add_server("Loopback", backend.url, backend.token, store)
    line = svc.test_connection(remote)
    assert line.startswith("OK: model tiny-test on cpu") and "protocol 1" in line and "plms" in line
    assert backend.token not in line
    assert svc.test_connection(svc.settings.server("local")).startswith("OK: the local backend")
    assert svc.test_connection(svc.settings.server("device")).startswith("OK: nothing to connect to")

    svc.settings.acknowledge_not_private(remote.id)
    with svc.connect(remote, str(tiny_model_dir), "conv_in") as hd:
        result = hd.generate(PROMPT, steps=1)
    assert result.server_url == backend.url.rstrip("/")

    svc.settings.update_server(remote.id, token="hdt_wrong", secrets=store)
    with pytest.raises(BackendRejected, match="refused the API token"):
        svc.test_connection(remote)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    closed = ServerEntry(id="closed", name="Closed", url=f"http://127.0.0.1:{port}")
    store.set("server-token:closed", "hdt_x")
    with pytest.raises(BackendUnreachable, match="cannot reach"):
        svc.test_connection(closed)
