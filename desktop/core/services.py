"""Everything the desktop UI needs from the core, in one object: settings, secrets, device keys, gallery and
connections. Qt-free; paths and the keyring are injectable."""

from __future__ import annotations

import hashlib
import ssl
from pathlib import Path
from urllib.parse import urlsplit

from hediff.common import he, protocol
from hediff.common.errors import UsageError
from hediff.desktop.core.api import HEDiffusion, NotPrivateError
from hediff.desktop.core.appdata import default_data_dir, ensure_private_dir
from hediff.desktop.core.backend_client import BackendClient, BackendProtocolError, BackendUnreachable
from hediff.desktop.core.engine import GenerationParams
from hediff.desktop.core.gallery import Gallery
from hediff.desktop.core.keystore import DeviceKeys, SecretStore
from hediff.desktop.core.privacy import PrivacyLabel, Where, label_for
from hediff.desktop.core.settings import ServerEntry, Settings

TEST_TIMEOUT_S = 15.0
TEST_CONNECT_TIMEOUT_S = 5.0


def certificate_fingerprint(pem: str) -> str:
    """SHA-256 of the certificate's DER, as browsers and ``openssl x509 -fingerprint -sha256`` show it."""
    digest = hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


class NoServerToken(UsageError):
    """A remote server without a stored API token."""


class AppServices:
    def __init__(self, data_dir: Path | None = None, secrets: SecretStore | None = None):
        self.data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
        ensure_private_dir(self.data_dir)
        self.secrets = secrets if secrets is not None else SecretStore()
        self.settings = Settings.load(self.data_dir)
        self.keys = DeviceKeys(self.data_dir, self.secrets)
        self.gallery = Gallery(self.data_dir / "gallery")

    def set_passphrase(self, passphrase: str | None) -> None:
        """The opt-in passphrase protection for device keys (same as ``keys.set_passphrase``)."""
        self.keys.set_passphrase(passphrase)

    # --- connections ---

    def token(self, server: ServerEntry) -> str:
        """The remote server's API token from the keyring: KeyringUnavailable or NoServerToken if there is none."""
        token = self.settings.token_for(server.id, self.secrets)
        if not token:
            raise NoServerToken(
                f"no API token stored for server {server.name!r} ({server.url}); edit the server on the Servers "
                "tab and enter its token"
            )
        return token

    def connect(self, server: ServerEntry, model: str, split: str) -> HEDiffusion:
        """A client for ``server`` with ``model`` loaded for ``split``: in process for the device entry, a loopback
        backend for the local entry; a remote server only once the user acknowledged it is not private
        (NotPrivateError before that)."""
        if server.on_device:
            return HEDiffusion(model, split=split)
        if server.local:
            return HEDiffusion(model, local_backend=True, split=split)
        if not server.not_private_ok:
            raise NotPrivateError(
                f"{server.name} ({server.url}) proves nothing about what it runs: "
                f"{self.privacy(server, split, 'full').text}. Acknowledge it once to send to this server"
            )
        return HEDiffusion(
            model,
            server=server.url,
            token=self.token(server),
            split=split,
            accept_not_private=True,
            tls_ca=server.tls_ca,
        )

    def privacy(self, server: ServerEntry, split: str, encryption: str) -> PrivacyLabel:
        """The privacy label of generating with ``server`` in this mode (shown before Generate)."""
        where = Where.DEVICE if server.on_device else Where.LOOPBACK if server.local else Where.SERVER
        return label_for(where, split, encryption)

    def test_connection(self, server: ServerEntry) -> str:
        """Ask the server's /v1/health and /v1/capabilities (with the stored token); a one-line result.

        Raises BackendError subclasses (unreachable, token refused, not an HE-Diffusion backend, ...), or
        KeyringUnavailable / NoServerToken when there is no token to send.
        """
        if server.on_device:
            return "OK: nothing to connect to; generations run in the app on this device"
        if server.local:
            return (
                f"OK: the local backend starts on loopback (127.0.0.1) with model {self.settings.model} "
                "when you generate; nothing to connect to yet"
            )
        token = self.token(server)
        with BackendClient(
            server.url,
            token,
            timeout_s=TEST_TIMEOUT_S,
            connect_timeout_s=TEST_CONNECT_TIMEOUT_S,
            tls_ca=server.tls_ca,
        ) as client:
            health = client.health()
            caps = client.capabilities()
        url = server.url
        if health.get("status") != "ok":
            raise BackendProtocolError(f"{url} reports status {health.get('status')!r}, not 'ok'")
        version = health.get("protocol_version", caps.get("protocol_version"))
        if version != protocol.PROTOCOL_VERSION:
            raise BackendProtocolError(
                f"{url} speaks protocol {version!r}, this app speaks {protocol.PROTOCOL_VERSION}; update the older side"
            )
        model = caps.get("model")
        schedulers = caps.get("schedulers")
        if not isinstance(model, dict) or not isinstance(schedulers, list):
            raise BackendProtocolError(f"{url} answered /v1/capabilities without a model or schedulers")
        device = model.get("device", "?")
        dtype = model.get("dtype")
        presets = caps.get("he_presets")
        text = (
            f"OK: model {model.get('id', health.get('model', '?'))} on {device}"
            + (f" ({dtype})" if dtype else "")
            + f", protocol {version}, schedulers {', '.join(map(str, schedulers))}"
        )
        if isinstance(presets, dict) and presets:
            text += f", HE presets {', '.join(map(str, presets))}"
        return text

    def server_certificate(self, server: ServerEntry) -> tuple[str, str]:
        """The certificate an https:// server presents right now, unverified, as (PEM, SHA-256 fingerprint in
        colon-separated hex): what the user compares with the operator's before trusting it."""
        parts = urlsplit(server.url)
        if parts.scheme.lower() != "https" or not parts.hostname:
            raise UsageError(f"{server.name} ({server.url}) is not an https:// server: it has no certificate")
        try:
            pem = ssl.get_server_certificate((parts.hostname, parts.port or 443), timeout=TEST_CONNECT_TIMEOUT_S)
        except OSError as e:
            raise BackendUnreachable(f"cannot read the certificate of {server.url}: {e}") from None
        return pem, certificate_fingerprint(pem)

    # --- keys ---

    def key_for_generation(self, params: GenerationParams) -> he.RotatingKey | None:
        """None: a fresh key per generation (key_policy "fresh", the default, or no encryption at all);
        otherwise the stored device key for the generation's HE preset (created on first use), replaced by a new
        stored key when it reaches its decryption bound so that a generation never stops there."""
        if params.encryption == "none" or self.settings.key_policy == "fresh":
            return None
        return self.keys.rotating(params.he_preset)
