"""The desktop app's settings (servers, last-used parameters, privacy choices) as one JSON file. Qt-free.

API tokens are never part of it: they live only in the OS keyring (``SecretStore``) under
``server-token:<server id>``; the settings only name the server.
"""

from __future__ import annotations

import json
import secrets as _random
import ssl
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from hediff.common.errors import UsageError
from hediff.common.settings import GenerationSettings
from hediff.desktop.core.appdata import atomic_write, ensure_private_dir
from hediff.desktop.core.backend_client import tls_verification
from hediff.desktop.core.keystore import KeyringUnavailable, SecretStore

SETTINGS_FILE = "settings.json"
SETTINGS_VERSION = 1
TOKEN_NAME = "server-token:{id}"
LOCAL_SERVER_ID = "local"
DEVICE_SERVER_ID = "device"
TRUSTED_CERTS_DIR = "trusted-certs"
KEY_POLICIES = ("fresh", "device")
# what the image shows while a job runs: the predicted final image (x0, cheap), or nothing but the progress (a
# screen others can see, or a slow machine)
PREVIEW_KINDS = ("predicted", "none")
_PROMPT_FIELDS = ("prompt", "negative_prompt")


@dataclass
class ServerEntry:
    id: str
    name: str
    url: str
    local: bool = False  # start a backend on loopback with the chosen model (url is ignored)
    on_device: bool = False  # no server at all: the whole pipeline in this process (url is ignored)
    # a remote server proves nothing about what it runs: the user acknowledged once that it is not private
    not_private_ok: bool = False
    # PEM file to verify an https:// server with instead of the system CAs: a private CA's bundle, or the server's
    # own certificate that the user chose to trust (shown by its SHA-256 fingerprint first)
    tls_ca: str | None = None

    @property
    def remote(self) -> bool:
        return not (self.local or self.on_device)


def validate_url(url: str) -> str:
    """A backend URL: http(s), with a host, no credentials, query or fragment. Returns it normalised."""
    if not isinstance(url, str) or not url.strip():
        raise UsageError("the server URL is empty")
    url = url.strip()
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise UsageError(f"the server URL {url!r} is malformed: {e}") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise UsageError(f"the server URL must start with http:// or https://, got {url!r}")
    if not parts.hostname:
        raise UsageError(f"the server URL {url!r} has no host name")
    if parts.username is not None or parts.password is not None:
        # credentials in the URL would end up in the settings file; the token has its own field
        raise UsageError("the server URL must not contain a user name or password; put the API token in its field")
    if parts.query or parts.fragment:
        raise UsageError("the server URL must not have a query (?...) or fragment (#...); put the token in its field")
    if port is not None and port == 0:
        raise UsageError(f"the server URL {url!r} has port 0")
    return url.rstrip("/")


def _device_entry() -> ServerEntry:
    return ServerEntry(id=DEVICE_SERVER_ID, name="This device (private)", url="", on_device=True)


def _default_servers() -> list[ServerEntry]:
    return [_device_entry(), ServerEntry(id=LOCAL_SERVER_ID, name="Local backend", url="", local=True)]


def params_from_dict(data: dict, prompt: str = "") -> GenerationSettings:
    """Stored settings (``GenerationSettings.to_dict``) with ``prompt`` unless they hold one. SettingsError for a
    bad value, TypeError for an unknown field: stored settings are validated like any other."""
    return GenerationSettings.from_dict({"prompt": prompt, **data})


@dataclass
class Settings:
    path: Path
    servers: list[ServerEntry] = field(default_factory=_default_servers)
    selected_server: str = DEVICE_SERVER_ID  # private by default
    params: dict = field(default_factory=dict)  # GenerationSettings.to_dict() of the last use; prompts only if asked
    model: str = "embedded"  # the default model
    models: list[str] = field(default_factory=list)  # model folders added in the model manager
    remember_prompt: bool = False
    prompt_history: list[str] = field(default_factory=list)  # recent prompts, stored only if remember_prompt
    embed_prompt_in_png: bool = False
    key_policy: str = "fresh"  # "fresh": a new key per generation; "device": the stored device key
    preview_kind: str = "predicted"  # one of PREVIEW_KINDS
    window_geometry: str | None = None
    splitter_state: str | None = None  # the main window's panel widths (QSplitter.saveState, base64)
    problem: str | None = None  # why the file on disk could not be used (then these are defaults)

    # --- file ---

    @classmethod
    def load(cls, data_dir: Path) -> Settings:
        """The settings in ``data_dir``; defaults if there are none; defaults plus ``.problem`` if unreadable
        (the bad file is kept as settings.json.bad)."""
        path = Path(data_dir) / SETTINGS_FILE
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return cls(path=path)
        except OSError as e:
            return cls(
                path=path, problem=f"the settings file {path} cannot be read ({e.strerror or e}); using defaults"
            )
        try:
            data = json.loads(raw.decode("utf-8"))
            return cls._from_dict(path, data)
        except (UnicodeDecodeError, ValueError, TypeError, KeyError) as e:
            bad = path.with_name(SETTINGS_FILE + ".bad")
            try:
                path.replace(bad)
                kept = f"; the file was kept as {bad}"
            except OSError:
                kept = ""
            return cls(path=path, problem=f"the settings file {path} is unreadable ({e}); using defaults{kept}")

    @classmethod
    def _from_dict(cls, path: Path, data) -> Settings:
        if not isinstance(data, dict):
            raise UsageError("not a JSON object")
        s = cls(path=path)
        notes = []
        if "servers" in data:
            if not isinstance(data["servers"], list):
                raise UsageError("'servers' is not a list")
            servers, seen = [], set()
            for item in data["servers"]:
                try:
                    entry = _server_from_dict(item)
                except (ValueError, TypeError, KeyError) as e:
                    notes.append(f"a server entry was skipped ({e})")
                    continue
                if entry.id in seen:
                    notes.append(f"a duplicate server id {entry.id!r} was skipped")
                    continue
                seen.add(entry.id)
                servers.append(entry)
            if DEVICE_SERVER_ID not in seen:  # settings from before the on-device mode: it is always offered
                servers.insert(0, _device_entry())
            s.servers = servers
        for name, kind in (("selected_server", str), ("model", str), ("remember_prompt", bool)):
            if name in data:
                if isinstance(data[name], kind):
                    setattr(s, name, data[name])
                else:
                    notes.append(f"{name!r} was ignored")
        if isinstance(data.get("models"), list):
            s.models = [m for m in data["models"] if isinstance(m, str) and m]
        history = data.get("prompt_history")
        if s.remember_prompt and isinstance(history, list):
            s.prompt_history = [p for p in history if isinstance(p, str)]
        if isinstance(data.get("embed_prompt_in_png"), bool):
            s.embed_prompt_in_png = data["embed_prompt_in_png"]
        if data.get("preview_kind") in PREVIEW_KINDS:
            s.preview_kind = data["preview_kind"]
        elif "preview_kind" in data:
            notes.append(f"unknown preview kind {data['preview_kind']!r} was ignored")
        if data.get("key_policy") in KEY_POLICIES:
            s.key_policy = data["key_policy"]
        elif "key_policy" in data:
            notes.append(f"unknown key policy {data['key_policy']!r} was ignored")
        for name in ("window_geometry", "splitter_state"):
            if isinstance(data.get(name), str):
                setattr(s, name, data[name])
        if "params" in data:
            try:
                stored = {k: v for k, v in data["params"].items() if s.remember_prompt or k not in _PROMPT_FIELDS}
                params_from_dict(stored)  # validated; only what was stored is kept (the model's defaults fill the rest)
                s.params = stored
            except (AttributeError, TypeError, ValueError) as e:  # not a dict, unknown or bad fields
                notes.append(f"the last-used generation settings were ignored ({e})")
        if s.servers and s.selected_server not in {e.id for e in s.servers}:
            s.selected_server = s.servers[0].id
        if notes:
            s.problem = f"some settings in {path} were ignored: " + "; ".join(notes)
        return s

    def to_dict(self) -> dict:
        params = dict(self.params)
        if not self.remember_prompt:
            for k in _PROMPT_FIELDS:
                params.pop(k, None)
        return {
            "version": SETTINGS_VERSION,
            "servers": [asdict(e) for e in self.servers],
            "selected_server": self.selected_server,
            "params": params,
            "model": self.model,
            "models": list(self.models),
            "remember_prompt": self.remember_prompt,
            "prompt_history": list(self.prompt_history) if self.remember_prompt else [],
            "embed_prompt_in_png": self.embed_prompt_in_png,
            "key_policy": self.key_policy,
            "preview_kind": self.preview_kind,
            "window_geometry": self.window_geometry,
            "splitter_state": self.splitter_state,
        }

    def save(self) -> None:
        """Write atomically (0600). Prompts are dropped from ``params`` unless ``remember_prompt``."""
        if self.key_policy not in KEY_POLICIES:
            raise UsageError(f"key_policy must be one of {', '.join(KEY_POLICIES)}, got {self.key_policy!r}")
        if self.preview_kind not in PREVIEW_KINDS:
            raise UsageError(f"preview_kind must be one of {', '.join(PREVIEW_KINDS)}, got {self.preview_kind!r}")
        ensure_private_dir(self.path.parent)
        atomic_write(self.path, (json.dumps(self.to_dict(), indent=2) + "\n").encode("utf-8"), mode=0o600)

    # --- servers ---

    def server(self, server_id: str) -> ServerEntry:
        for entry in self.servers:
            if entry.id == server_id:
                return entry
        raise KeyError(f"no server with id {server_id!r}")

    @property
    def selected(self) -> ServerEntry | None:
        for entry in self.servers:
            if entry.id == self.selected_server:
                return entry
        return self.servers[0] if self.servers else None

    def add_server(
        self, name: str, url: str, token: str | None, secrets: SecretStore, tls_ca: str | None = None
    ) -> ServerEntry:
        """Add a remote server; its token goes to the keyring only (KeyringUnavailable if it cannot). Saves."""
        name = _clean_name(name)
        url = validate_url(url)
        tls_ca = _clean_tls_ca(url, tls_ca)
        entry = ServerEntry(id=_new_server_id({e.id for e in self.servers}), name=name, url=url, tls_ca=tls_ca)
        if token:
            secrets.set(TOKEN_NAME.format(id=entry.id), _clean_token(token))  # before anything is added
        self.servers.append(entry)
        self.save()
        return entry

    def update_server(
        self,
        id: str,
        name: str | None = None,
        url: str | None = None,
        token: str | None = None,
        secrets: SecretStore | None = None,
        tls_ca: str | None = None,
    ) -> ServerEntry:
        """Change a server. ``token``: None keeps the stored one, "" removes it, anything else replaces it;
        ``tls_ca`` likewise ("" back to the system CAs). Saves."""
        entry = self.server(id)
        new_name = _clean_name(name) if name is not None else entry.name
        new_url = entry.url
        if url is not None and entry.remote:
            new_url = validate_url(url)
        if token is not None:
            if not entry.remote:
                raise UsageError(f"{entry.name} needs no API token: it runs on this machine")
            if secrets is None:
                raise UsageError("changing a token needs the secret store")
            if token == "":
                secrets.delete(TOKEN_NAME.format(id=id))
            else:
                secrets.set(TOKEN_NAME.format(id=id), _clean_token(token))
        if tls_ca is not None:
            entry.tls_ca = _clean_tls_ca(new_url, tls_ca or None)
        entry.name, entry.url = new_name, new_url
        self.save()
        return entry

    def trust_certificate(self, id: str, pem: str) -> Path:
        """Verify this server with ``pem`` (its own certificate, which the user checked by its fingerprint) from
        now on: written next to the settings and named in the server entry. Saves; returns the file."""
        entry = self.server(id)
        if not entry.remote or not entry.url.lower().startswith("https://"):
            raise UsageError(f"{entry.name} is not an https:// server: there is no certificate to trust")
        ssl.PEM_cert_to_DER_cert(pem)  # ValueError unless it is one PEM certificate
        folder = self.path.parent / TRUSTED_CERTS_DIR
        ensure_private_dir(folder)
        target = folder / f"{entry.id}.pem"
        atomic_write(target, pem.encode("ascii"), mode=0o600)
        entry.tls_ca = str(target)
        self.save()
        return target

    def remove_server(self, id: str, secrets: SecretStore) -> None:
        """Remove a server and its stored token. Saves.

        With the keyring unavailable the entry is still removed (nothing could have been read from the keyring
        anyway); a token it may hold stays protected there.
        """
        entry = self.server(id)
        if entry.remote:
            try:
                secrets.delete(TOKEN_NAME.format(id=id))
            except KeyringUnavailable:
                if secrets.available:
                    raise
        self.servers = [e for e in self.servers if e.id != id]
        if self.selected_server == id:
            self.selected_server = self.servers[0].id if self.servers else ""
        self.save()

    def acknowledge_not_private(self, id: str) -> None:
        """The user accepted once that this remote server can see their images and prompts. Saves."""
        entry = self.server(id)
        if not entry.remote:
            raise UsageError(f"{entry.name} runs on this machine: there is nothing to acknowledge")
        entry.not_private_ok = True
        self.save()

    def token_for(self, id: str, secrets: SecretStore) -> str | None:
        """The server's API token from the keyring (None if none stored); KeyringUnavailable if unreadable."""
        return secrets.get(TOKEN_NAME.format(id=id))


def _server_from_dict(item) -> ServerEntry:
    if not isinstance(item, dict):
        raise UsageError("not an object")
    sid, name, url = item["id"], item["name"], item.get("url", "")
    flags = {k: item.get(k, False) for k in ("local", "on_device", "not_private_ok")}
    tls_ca = item.get("tls_ca")
    if tls_ca is not None and not isinstance(tls_ca, str):
        raise ValueError("bad tls_ca")
    if not isinstance(sid, str) or not sid or not isinstance(name, str):
        raise UsageError("bad id or name")
    if not all(isinstance(v, bool) for v in flags.values()) or (flags["local"] and flags["on_device"]):
        raise UsageError("bad local, on_device or not_private_ok flag")
    if not isinstance(url, str):
        raise UsageError("bad url")
    if not (flags["local"] or flags["on_device"]):
        url = validate_url(url)
    return ServerEntry(id=sid, name=name, url=url, tls_ca=tls_ca, **flags)


def _clean_tls_ca(url: str, tls_ca: str | None) -> str | None:
    """A usable PEM file for an https:// URL, or None (system CAs); UsageError naming what is wrong."""
    if not tls_ca:
        return None
    tls_verification(url, tls_ca)  # ValueError: not https, no such file, not PEM
    return str(Path(tls_ca).expanduser())


def _clean_name(name: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise UsageError("the server name is empty")
    return name.strip()


def _clean_token(token: str) -> str:
    token = token.strip()
    if not token:
        raise UsageError("the API token is empty")
    if any(c.isspace() for c in token):
        raise UsageError("the API token must not contain spaces or line breaks")
    return token


def _new_server_id(taken: set[str]) -> str:
    while True:
        sid = f"srv-{int(time.time()):x}-{_random.token_hex(3)}"
        if sid not in taken:
            return sid
