"""The client of a confidential backend: attest first, over the very TLS connection the prompt will travel on, and
send nothing of the generation unless every check held (fail closed).

One ``http.client.HTTPSConnection`` carries both requests. Its peer certificate's public key is read from the live
socket before the nonce goes out; the evidence must bind that key (report_data = SHA-512(tag || nonce ||
SHA-256(SPKI))); the prompt is written to the same socket object, so a relay that terminates TLS elsewhere, or a
reconnection to another endpoint between the two requests, cannot receive it.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

from hediff.common.attest.binding import NONCE_LEN, report_data_for, tls_key_digest
from hediff.common.attest.snp import Tcb
from hediff.common.attest.verify import AttestationError, Policy, TrustedRoot, VerifiedReport, verify_snp_report
from hediff.common.errors import EXIT_UNREACHABLE, HEDiffusionError
from hediff.desktop.core.preview import SD1_PREVIEW_MAP, PreviewMap, latent_preview

EVIDENCE_PATH = "/v1/attestation/evidence"
GENERATE_PATH = "/v1/confidential/generate"
GPU_NOT_VERIFIED = "GPU evidence: not verified"


class ConfidentialError(HEDiffusionError, RuntimeError):
    """The confidential server could not be reached or answered something unusable (not an attestation failure)."""

    exit_code = EXIT_UNREACHABLE


@dataclass(frozen=True)
class ConfidentialPolicy:
    """What the user accepts from a confidential server. Launch measurements are required: without them any
    image the operator likes would pass."""

    measurements: frozenset[bytes]
    allow_debug: bool = False
    min_tcb: Tcb | None = None
    # this client cannot verify NVIDIA GPU evidence yet: a CPU-only TEE (the GPU outside the trust boundary) must
    # be accepted explicitly
    allow_cpu_only_tee: bool = False

    @classmethod
    def from_options(
        cls, measurements: list[str], allow_debug: bool = False, min_tcb: str | None = None, allow_cpu_only_tee=False
    ) -> ConfidentialPolicy:
        allowed = Policy.parse_measurements(measurements)
        if not allowed:
            raise ValueError(
                "a confidential server needs at least one allowed launch measurement (--measurement HEX, 96 hex "
                "digits, from the operator's published image); without one any guest image would be accepted"
            )
        return cls(allowed, allow_debug, Tcb.parse(min_tcb) if min_tcb else None, allow_cpu_only_tee)


@dataclass(frozen=True)
class Attestation:
    """What was verified, for the user to see."""

    report: VerifiedReport
    tls_key_sha256: bytes
    gpu: str

    def label(self) -> str:
        """The privacy label of this server, naming what was verified (desktop/core/privacy.py)."""
        from hediff.desktop.core.privacy import Where, label_for

        f = self.report.fields()
        verified = (
            f"AMD SEV-SNP {f['product']} evidence chained to AMD's pinned root, launch measurement "
            f"{f['measurement'][:16]}... allowed, bound to this TLS connection; {self.gpu}"
        )
        return label_for(Where.CONFIDENTIAL, verified=verified).text

    def summary(self) -> list[str]:
        f = self.report.fields()
        return [
            f"attested: AMD SEV-SNP ({f['product']}), chain to AMD's pinned root, report signature, chip and TCB",
            f"launch measurement {f['measurement']} (allowed)",
            f"bound to this TLS key (SHA-256 {self.tls_key_sha256.hex()}) and a fresh nonce",
            f"guest policy {f['policy']}: debug {'ALLOWED (your policy permits it)' if f['debug_allowed'] else 'off'}"
            f", VMPL {f['vmpl']}, reported TCB {f['reported_tcb']}",
            self.gpu,
        ]


@dataclass
class ConfidentialStep:
    index: int
    total: int
    latent: np.ndarray  # (C, H, W), the server's latent after this step (float16 on the wire)

    def preview(self, preview_map: PreviewMap = SD1_PREVIEW_MAP, upscale: int = 1) -> Image.Image:
        """The latent as a small RGB image, with the same linear map as the split modes' previews."""
        return latent_preview(self.latent, preview_map, upscale)


@dataclass
class ConfidentialResult:
    image: Image.Image
    attestation: Attestation
    steps: list[ConfidentialStep] = field(default_factory=list)


def _connection(url: str, tls_ca: Path | None, timeout_s: float) -> http.client.HTTPSConnection:
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError(f"{url} is not an https:// URL: a confidential server's evidence is bound to its TLS key")
    context = ssl.create_default_context(cafile=str(tls_ca) if tls_ca else None)
    return http.client.HTTPSConnection(parts.hostname, parts.port or 443, context=context, timeout=timeout_s)


class ConfidentialClient:
    """``roots`` replaces AMD's pinned roots; only tests pass it (their evidence is signed by a test root)."""

    def __init__(
        self,
        url: str,
        token: str,
        policy: ConfidentialPolicy,
        tls_ca: Path | None = None,
        timeout_s: float = 600.0,
        roots: tuple[TrustedRoot, ...] | None = None,
    ):
        self.url, self.token, self.policy = url.rstrip("/"), token, policy
        self.tls_ca, self.timeout_s, self.roots = tls_ca, timeout_s, roots
        _connection(self.url, tls_ca, timeout_s)  # checks the URL now, before anything is loaded or sent

    def _request(self, conn, method: str, path: str, body: bytes, headers: dict[str, str]):
        try:
            conn.request(method, path, body=body, headers={"Content-Type": "application/json", **headers})
            return conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            raise self._unreachable(e) from None

    def _unreachable(self, e: Exception) -> ConfidentialError:
        if isinstance(e, ssl.SSLCertVerificationError):
            return ConfidentialError(
                f"the TLS certificate of {self.url} does not verify ({e.verify_message}); pass the server's CA or "
                "self-signed certificate with --tls-ca"
            )
        return ConfidentialError(f"{self.url} could not be reached ({type(e).__name__}: {e})")

    def _connect(self, conn: http.client.HTTPSConnection) -> ssl.SSLSocket:
        try:
            conn.connect()
        except OSError as e:
            raise self._unreachable(e) from None
        # http.client reconnects silently when the server has closed the connection; a new connection could reach
        # an endpoint nobody attested, so a closed connection must be an error instead
        conn.auto_open = 0
        return conn.sock

    def attest(self, conn: http.client.HTTPSConnection) -> Attestation:
        """Read the live peer key (connecting first if needed), ask for evidence on a fresh nonce, verify.
        AttestationError if any check fails."""
        if conn.sock is None:
            self._connect(conn)
        peer = conn.sock.getpeercert(binary_form=True)
        key_sha256 = tls_key_digest(peer)
        nonce = os.urandom(NONCE_LEN)
        resp = self._request(conn, "POST", EVIDENCE_PATH, json.dumps({"nonce": nonce.hex()}).encode(), {})
        payload = resp.read()
        if resp.status != 200:
            raise ConfidentialError(f"{self.url} gave no evidence (HTTP {resp.status}: {payload[:300]!r})")
        try:
            evidence = json.loads(payload)
            report, vcek = base64.b64decode(evidence["report"]), base64.b64decode(evidence["vcek"])
            ask = base64.b64decode(evidence["ask"]) if evidence.get("ask") else None
        except (ValueError, KeyError, TypeError) as e:
            raise AttestationError("format", f"the server's evidence is malformed ({type(e).__name__}: {e})") from None
        verified = verify_snp_report(
            report,
            vcek,
            ask_der=ask,  # the ARK is never taken from the server: it is always a pinned root
            policy=Policy(
                measurements=self.policy.measurements,
                report_data=report_data_for(nonce, key_sha256),
                allow_debug=self.policy.allow_debug,
                min_tcb=self.policy.min_tcb,
            ),
            roots=self.roots,
        )
        gpu = f"{GPU_NOT_VERIFIED} (this client cannot verify NVIDIA GPU evidence yet)"
        if not self.policy.allow_cpu_only_tee:
            raise AttestationError(
                "gpu",
                f"{GPU_NOT_VERIFIED}: the server's CPU TEE verified, but this client cannot verify the GPU's evidence, "
                "so the GPU is outside what was proven; accept a CPU-only TEE explicitly with --allow-cpu-only-tee",
            )
        return Attestation(verified, key_sha256, gpu + ": accepted, your policy allows a CPU-only TEE")

    def generate(
        self,
        prompt: str,
        *,
        negative_prompt: str = "",
        steps: int | None = None,
        guidance: float | None = None,
        seed: int = 0,
        width: int | None = None,
        height: int | None = None,
        scheduler: str = "plms",
        on_attested: Callable[[Attestation], None] | None = None,
        on_step: Callable[[ConfidentialStep], None] | None = None,
    ) -> ConfidentialResult:
        conn = _connection(self.url, self.tls_ca, self.timeout_s)
        try:
            attested_socket = self._connect(conn)
            attestation = self.attest(conn)
            if on_attested:
                on_attested(attestation)
            if conn.sock is not attested_socket:
                raise AttestationError(
                    "tls_binding",
                    "the server closed the attested TLS connection before the prompt was sent; nothing was sent",
                )
            body = json.dumps(
                {
                    "prompt": prompt,
                    "negative_prompt": negative_prompt,
                    "steps": steps,
                    "guidance": guidance,
                    "seed": seed,
                    "width": width,
                    "height": height,
                    "scheduler": scheduler,
                }
            ).encode()
            resp = self._request(conn, "POST", GENERATE_PATH, body, {"Authorization": f"Bearer {self.token}"})
            if resp.status != 200:
                raise ConfidentialError(
                    f"{self.url} refused the generation (HTTP {resp.status}: {resp.read()[:300]!r})"
                )
            return self._read_stream(resp, attestation, on_step)
        finally:
            conn.close()

    def _read_stream(self, resp, attestation: Attestation, on_step) -> ConfidentialResult:
        steps: list[ConfidentialStep] = []
        try:
            for raw in resp:
                msg = json.loads(raw)
                if msg["type"] == "step":
                    latent = np.frombuffer(base64.b64decode(msg["latent"]), dtype=np.float16).reshape(msg["shape"])
                    step = ConfidentialStep(msg["index"], msg["total"], latent.astype(np.float32))
                    steps.append(step)
                    if on_step:
                        on_step(step)
                elif msg["type"] == "image":
                    image = Image.open(io.BytesIO(base64.b64decode(msg["png"])))
                    image.load()
                    return ConfidentialResult(image.convert("RGB"), attestation, steps)
                else:
                    raise ConfidentialError(f"{self.url}: {msg.get('detail', 'the generation failed')}")
        except (OSError, http.client.HTTPException) as e:
            raise ConfidentialError(f"{self.url} stopped answering during the generation ({e})") from None
        raise ConfidentialError(f"{self.url} closed the stream before sending the image")
