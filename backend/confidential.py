"""Confidential mode (``hediff serve --confidential``): inside an SEV-SNP guest the backend answers a client's nonce
with attestation evidence bound to that nonce and to its own TLS key, and runs the whole diffusers pipeline on the
prompt (no split, no HE: the guest's memory is what protects it), streaming a latent per step and the final PNG.

Evidence comes from the kernel's configfs-tsm interface (Documentation/ABI/testing/configfs-tsm): make a directory
under /sys/kernel/config/tsm/report, write the 64 bytes of report_data to ``inblob``, read the signed report from
``outblob`` and the host-provided certificates (VCEK, ASK, ARK) from ``auxblob``.
"""

from __future__ import annotations

import base64
import errno
import io
import json
import logging
import queue
import shutil
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from hediff.backend.app import ApiError
from hediff.backend.auth import TokenStore
from hediff.common import models
from hediff.common.attest.binding import NONCE_LEN, check_nonce, report_data_for, tls_key_digest
from hediff.common.local_pipeline import LocalPipeline
from hediff.common.schedulers import SCHEDULER_NAMES

log = logging.getLogger("hediff.backend")

DEFAULT_TSM_DIR = Path("/sys/kernel/config/tsm/report")
EVIDENCE_PATH = "/v1/attestation/evidence"
GENERATE_PATH = "/v1/confidential/generate"
NDJSON = "application/x-ndjson"

# GUIDs of the SEV-SNP extended-report certificate table (GHCB spec, "SNP Extended Guest Request")
_CERT_GUIDS = {
    uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd"): "vcek",
    uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782"): "ask",
    uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae"): "ark",
}


class EvidenceError(RuntimeError):
    """The TEE would not produce evidence (not a confidential guest, configfs-tsm missing, no VCEK)."""


def parse_cert_table(auxblob: bytes) -> dict[str, bytes]:
    """The certificates of an SNP certificate table: 24-byte entries (GUID, offset, length) up to an all-zero one."""
    certs: dict[str, bytes] = {}
    for pos in range(0, len(auxblob) - 23, 24):
        entry = auxblob[pos : pos + 24]
        if not any(entry):
            break
        guid = uuid.UUID(bytes_le=entry[:16])
        offset, length = int.from_bytes(entry[16:20], "little"), int.from_bytes(entry[20:24], "little")
        if offset + length > len(auxblob):
            raise EvidenceError(f"the TSM's certificate table points past its end ({offset}+{length} > {len(auxblob)})")
        if guid in _CERT_GUIDS:
            certs[_CERT_GUIDS[guid]] = auxblob[offset : offset + length]
    return certs


@dataclass(frozen=True)
class Evidence:
    report: bytes
    vcek: bytes
    ask: bytes | None


class ConfigfsTsm:
    """SEV-SNP evidence from configfs-tsm. ``base_dir`` is injectable so that tests can point it at a fake.

    ``vcek`` is the operator's copy of this chip's VCEK (from AMD's KDS) for hosts that do not supply certificates
    in auxblob; the host's certificate table wins when present.
    """

    def __init__(self, base_dir: Path = DEFAULT_TSM_DIR, vcek: bytes | None = None, timeout_s: float = 10.0):
        self.base_dir, self.vcek, self.timeout_s = Path(base_dir), vcek, timeout_s
        self._lock = threading.Lock()  # one report at a time: the TSM is a shared, slow device

    def check(self) -> None:
        if not self.base_dir.is_dir():
            raise EvidenceError(
                f"{self.base_dir} does not exist: this is not a confidential guest with configfs-tsm (Linux 6.7+, "
                "configfs mounted, the sev-guest driver loaded); --confidential only runs inside an SEV-SNP VM"
            )

    def evidence(self, report_data: bytes) -> Evidence:
        if len(report_data) != 64:
            raise ValueError(f"report_data must be 64 bytes, got {len(report_data)}")
        self.check()
        with self._lock:
            entry = self.base_dir / f"hediff-{uuid.uuid4().hex}"
            entry.mkdir()
            try:
                (entry / "inblob").write_bytes(report_data)
                report = self._read_outblob(entry / "outblob")
                aux = entry / "auxblob"
                certs = parse_cert_table(aux.read_bytes()) if aux.exists() else {}
            finally:
                _remove_entry(entry)
        vcek = certs.get("vcek") or self.vcek
        if vcek is None:
            raise EvidenceError(
                "the host supplied no VCEK in auxblob and none was configured: fetch this chip's VCEK from AMD's KDS "
                "and pass it with --vcek"
            )
        return Evidence(report=report, vcek=vcek, ask=certs.get("ask"))

    def _read_outblob(self, path: Path) -> bytes:
        # the kernel makes the report when outblob is read; a TSM provider in user space (or the tests' fake) may
        # write it a moment after inblob, so wait for it within the timeout
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                data = b""
            if data:
                return data
            if time.monotonic() > deadline:
                raise EvidenceError(f"the TSM produced no report in {path} within {self.timeout_s:g} s")
            time.sleep(0.01)


def _remove_entry(entry: Path) -> None:
    try:
        entry.rmdir()  # configfs: removing the directory releases the report entry
    except OSError as e:
        if e.errno != errno.ENOTEMPTY:
            raise
        shutil.rmtree(entry)  # an ordinary directory standing in for configfs


class GenerateRequest(BaseModel):
    prompt: str = Field(min_length=1, max_length=2000)
    negative_prompt: str = Field(default="", max_length=2000)
    steps: int | None = Field(default=None, ge=1, le=500)
    guidance: float | None = Field(default=None, ge=0.0, le=50.0)
    seed: int = Field(default=0, ge=0, le=2**63 - 1)
    width: int | None = Field(default=None, ge=8, le=2048, multiple_of=8)
    height: int | None = Field(default=None, ge=8, le=2048, multiple_of=8)
    scheduler: str = "plms"


class ConfidentialPipeline:
    """The whole pipeline in this (attested) process, one generation at a time: the same in-process pipeline
    that runs "on this device" for a user without a server."""

    def __init__(self, model_path: Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
        self.model_path = Path(model_path)
        self.local = LocalPipeline(self.model_path, device=device, dtype=dtype)
        self.lock = threading.Lock()

    def check(self, req: GenerateRequest) -> dict:
        """The pipeline's arguments, defaults filled from the model folder; ValueError names a bad field."""
        if req.scheduler not in SCHEDULER_NAMES:
            raise ValueError(f"unknown scheduler {req.scheduler!r}; valid names are: {', '.join(SCHEDULER_NAMES)}")
        size = self.local.native_size
        return dict(
            prompt=req.prompt,
            negative_prompt=req.negative_prompt,
            steps=req.steps or int(models.recommended_settings(self.model_path).get("steps", 20)),
            guidance=models.guidance_for(self.model_path, req.guidance),
            seed=req.seed,
            width=req.width or size,
            height=req.height or size,
            scheduler=req.scheduler,
        )

    def run(self, req: GenerateRequest, on_step) -> bytes:
        """Generate; ``on_step(index, total, latent)`` per step; returns the final image as PNG bytes."""
        kwargs = self.check(req)
        with self.lock:
            out = self.local.generate(**kwargs, on_step=lambda s: on_step(s.index, s.total, s.latent))
        buf = io.BytesIO()
        out.image.save(buf, format="PNG")
        return buf.getvalue()


def _line(obj: dict) -> bytes:
    return (json.dumps(obj) + "\n").encode()


def _stream(pipeline: ConfidentialPipeline, req: GenerateRequest) -> Iterator[bytes]:
    """NDJSON: a {"type": "step"} line with the float16 latent per step, then {"type": "image"} with the PNG."""
    lines: queue.Queue = queue.Queue()

    def on_step(index: int, total: int, latent: np.ndarray) -> None:
        data = base64.b64encode(latent.astype(np.float16).tobytes()).decode()
        lines.put(_line({"type": "step", "index": index, "total": total, "shape": list(latent.shape), "latent": data}))

    def work() -> None:
        try:
            png = pipeline.run(req, on_step)
            lines.put(_line({"type": "image", "png": base64.b64encode(png).decode()}))
        except Exception as exc:  # noqa: BLE001 - the stream has started: the failure must travel in it
            log.error("confidential generation failed: %s", type(exc).__name__)
            lines.put(_line({"type": "error", "detail": f"the generation failed ({type(exc).__name__})"}))
        lines.put(None)

    threading.Thread(target=work, name="hediff-confidential", daemon=True).start()
    while (item := lines.get()) is not None:
        yield item


def tls_key_sha256_of(cert_pem_path: Path) -> bytes:
    """SHA-256 of the SubjectPublicKeyInfo of the first certificate in a PEM file (the served leaf)."""
    der = ssl.PEM_cert_to_DER_cert(Path(cert_pem_path).read_text())
    return tls_key_digest(der)


MAX_BODY_BYTES = 64 * 1024  # a prompt and a few numbers, or a nonce


async def _small_body(request: Request) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, "payload_too_large", f"request exceeds {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def add_confidential_routes(
    app: FastAPI, tokens: TokenStore, tsm: ConfigfsTsm, pipeline: ConfidentialPipeline, tls_key_sha256: bytes
) -> None:
    """Mount the evidence and generation routes on the backend's app.

    The evidence route needs no token: evidence is public, and the client must not hand its token to a server it
    has not verified yet. Generation needs the token like every other route.
    """

    @app.post(EVIDENCE_PATH)
    async def evidence(request: Request):
        try:
            body = json.loads(await _small_body(request))
            nonce = check_nonce(bytes.fromhex(body["nonce"]))
        except (ValueError, KeyError, TypeError):
            raise ApiError(
                400, "bad_nonce", f'send JSON {{"nonce": "<{2 * NONCE_LEN} hex digits>"}}, a fresh random nonce'
            ) from None
        try:
            ev = await run_in_threadpool(tsm.evidence, report_data_for(nonce, tls_key_sha256))
        except EvidenceError as e:
            log.error("no attestation evidence: %s", e)
            raise ApiError(503, "no_evidence", str(e)) from None
        return {
            "tee": "sev-snp",
            "binding": "report_data = SHA-512(tag || nonce || SHA-256(TLS SubjectPublicKeyInfo))",
            "report": base64.b64encode(ev.report).decode(),
            "vcek": base64.b64encode(ev.vcek).decode(),
            "ask": base64.b64encode(ev.ask).decode() if ev.ask else None,
            # NVIDIA GPU evidence is not collected yet (docs/attestation.md): clients must not assume a GPU TEE
            "gpu": None,
        }

    @app.post(GENERATE_PATH, responses={200: {"content": {NDJSON: {}}}})
    async def generate(request: Request):
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or tokens.verify(token.strip()) is None:
            raise ApiError(401, "unauthorized", "send a valid API token: 'Authorization: Bearer <token>'")
        try:
            req = GenerateRequest.model_validate_json(await _small_body(request))
            pipeline.check(req)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            raise ApiError(400, "bad_request", f"{where}: {first['msg']}") from None
        except ValueError as e:
            raise ApiError(400, "bad_request", str(e)) from None
        return StreamingResponse(_stream(pipeline, req), media_type=NDJSON)


def enable(
    app: FastAPI,
    tokens: TokenStore,
    model_path: Path,
    device: str,
    tls_cert: Path,
    tsm_dir: Path,
    vcek_path: Path | None,
) -> None:
    """``hediff serve --confidential``: check the TEE is there before loading anything, then mount the routes."""
    vcek = Path(vcek_path).read_bytes() if vcek_path else None
    tsm = ConfigfsTsm(Path(tsm_dir), vcek=vcek)
    tsm.check()
    device = "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"
    add_confidential_routes(app, tokens, tsm, ConfidentialPipeline(model_path, device), tls_key_sha256_of(tls_cert))
