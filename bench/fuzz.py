"""Hostile input against a real backend: schemathesis cases from its OpenAPI document, then valid frames mutated
(truncated, bit flips, wrong length fields, huge counts, NaN/inf, wrong dtypes and shapes, garbage ciphertexts)
and sent to real sessions. A 5xx, a dropped connection or a dead server is a failure; so is a session whose next
valid step no longer works after the garbage it was sent (a failed request must change nothing).

    python -m bench.fuzz [--requests 10000] [--seed 0] [--model tiny] [--out bench/results]

The backend runs as its own process (`hediff serve`), so a crash shows up as a dead process.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import struct
import sys
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from bench.served import serve_subprocess
from hediff.common import he, protocol
from hediff.common.latent import encrypt_latent, pack_mask
from hediff.common.schedulers import build_plan

REPO = Path(__file__).resolve().parents[1]
FRAME = {"content-type": protocol.FRAME_CONTENT_TYPE}
# every answer a hostile request may get; anything else (5xx above all) is a finding
EXPECTED = {200, 201, 204, 400, 401, 404, 405, 409, 410, 413, 415, 422, 429}

HOSTILE_INTS = [-1, 0, 1, 2**31, 2**63, -(2**63), 10**30, 1.5, float("nan"), "1", None, True, [], {}]
HOSTILE_SHAPES = [[-1], [2**31 - 1] * 6, [2**20, 2**20, 2**20], [1] * 7, "abc", [1.5], [True], [], [0], None, [[1]]]
HOSTILE_DTYPES = ["int64", "complex128", "float8", "<f4", "object", "", None, 3, "float64", "float16", "uint8"]
HOSTILE_VALUES = HOSTILE_INTS + ["", "x" * 10_000, "ddim\x00", "../../etc/passwd", {"$ne": 1}, float("inf")]


@dataclass
class Tally:
    by_status: Counter = field(default_factory=Counter)
    by_source: dict[str, Counter] = field(default_factory=dict)
    failures: list[dict] = field(default_factory=list)
    state_checks: int = 0

    @property
    def requests(self) -> int:
        return sum(self.by_status.values())

    def record(self, source: str, label: str, status: int | str, detail: str = "") -> None:
        self.by_status[str(status)] += 1
        self.by_source.setdefault(source, Counter())[str(status)] += 1
        if status not in EXPECTED:
            self.failures.append({"source": source, "case": label, "status": status, "detail": detail[:300]})

    def to_json(self) -> dict:
        return {
            "requests": self.requests,
            "by_status": dict(sorted(self.by_status.items())),
            "by_source": {k: dict(sorted(v.items())) for k, v in self.by_source.items()},
            "failures": self.failures,
            "state_checks": self.state_checks,
        }


# --- frames: rebuilding one from parts so that any part can be wrong ---------------------------------------


def split_frame(data: bytes) -> tuple[dict, list[bytes]]:
    """A valid frame's header (as a dict) and its blob payloads, in order."""
    header_len = struct.unpack_from("<I", data, 6)[0]
    header = json.loads(data[10 : 10 + header_len])
    payloads, offset = [], 10 + header_len
    for entry in header["blobs"]:
        payloads.append(data[offset : offset + entry["nbytes"]])
        offset += entry["nbytes"]
    return header, payloads


def join_frame(header, payloads: list[bytes], version: int = protocol.PROTOCOL_VERSION) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    return protocol.MAGIC + struct.pack("<BBI", version, 0, len(raw)) + raw + b"".join(payloads)


def _flip_bits(data: bytes, rng: np.random.Generator, lo: int, hi: int, n: int) -> bytes:
    buf = bytearray(data)
    if hi <= lo:
        return bytes(buf)
    for pos in rng.integers(lo, hi, size=n):
        buf[int(pos)] ^= 1 << int(rng.integers(0, 8))
    return bytes(buf)


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(0, len(items)))]


def byte_mutations(data: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    """Mutations that know only the frame layout."""
    header_len = struct.unpack_from("<I", data, 6)[0]
    body_start = 10 + header_len
    kind = _pick(
        rng,
        [
            "truncate",
            "trailing",
            "flip_prefix",
            "flip_header",
            "flip_payload",
            "header_len",
            "version",
            "magic",
            "random",
            "empty",
            "deep_json",
            "big_int_json",
            "bad_utf8",
        ],
    )
    if kind == "truncate":
        return kind, data[: int(rng.integers(0, len(data)))]
    if kind == "trailing":
        return kind, data + rng.bytes(int(rng.integers(1, 64)))
    if kind == "flip_prefix":
        return kind, _flip_bits(data, rng, 0, 10, int(rng.integers(1, 4)))
    if kind == "flip_header":
        return kind, _flip_bits(data, rng, 10, body_start, int(rng.integers(1, 8)))
    if kind == "flip_payload":
        return kind, _flip_bits(data, rng, body_start, len(data), int(rng.integers(1, 64)))
    if kind == "header_len":
        value = _pick(rng, [0, 1, header_len - 1, header_len + 1, len(data), 2**20, 2**20 + 1, 2**32 - 1])
        return kind, data[:6] + struct.pack("<I", max(0, value)) + data[10:]
    if kind == "version":
        return kind, data[:4] + bytes([int(rng.integers(0, 256)) or 2]) + data[5:]
    if kind == "magic":
        return kind, rng.bytes(4) + data[4:]
    if kind == "random":
        return kind, protocol.MAGIC + rng.bytes(int(rng.integers(0, 4096)))
    if kind == "empty":
        return kind, b""
    if kind == "deep_json":
        depth = int(rng.integers(1_000, 200_000))
        return kind, join_frame(b"[" * depth + b"]" * depth, [])
    if kind == "big_int_json":
        return kind, join_frame(b'{"meta":{"step":' + b"9" * 5000 + b'},"blobs":[]}', [])
    return kind, join_frame(b'{"meta":{"step":"\xff\xfe"},"blobs":[]}', [])


def header_mutations(data: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    """Mutations of the JSON header of a valid frame: its entries and its meta."""
    header, payloads = split_frame(data)
    entries = header["blobs"]
    kind = _pick(
        rng,
        [
            "entry_field",
            "drop_entry",
            "dup_entry",
            "many_entries",
            "meta_value",
            "meta_drop",
            "meta_type",
            "header_type",
            "nbytes_shift",
        ],
    )
    i = int(rng.integers(0, len(entries))) if entries else 0
    if kind == "entry_field" and entries:
        key = _pick(rng, ["nbytes", "shape", "dtype", "kind", "name"])
        pool = {
            "nbytes": HOSTILE_INTS,
            "shape": HOSTILE_SHAPES,
            "dtype": HOSTILE_DTYPES,
            "kind": ["blob", "TENSOR", None, 1, "bytes", "tensor"],
            "name": ["", "x" * 65, None, 1, "ct0", "h", "../ct0"],
        }[key]
        entries[i][key] = _pick(rng, pool)
        return f"{kind}:{key}", join_frame(header, payloads)
    if kind == "drop_entry" and entries:
        del entries[i]
        if rng.random() < 0.5:
            del payloads[i]
        return kind, join_frame(header, payloads)
    if kind == "dup_entry" and entries:
        entries.append(dict(entries[i]))
        payloads.append(payloads[i])
        return kind, join_frame(header, payloads)
    if kind == "many_entries":
        n = _pick(rng, [255, 256, 257, 10_000])
        header["blobs"] = entries + [{"name": f"z{k}", "kind": "bytes", "nbytes": 0} for k in range(n)]
        return kind, join_frame(header, payloads)
    if kind == "nbytes_shift" and entries:
        entries[i]["nbytes"] += int(_pick(rng, [-8, -1, 1, 8, 1 << 20]))
        return kind, join_frame(header, payloads)
    if kind == "meta_value" and header["meta"]:
        key = _pick(rng, sorted(header["meta"]))
        header["meta"][key] = _pick(rng, HOSTILE_VALUES)
        return f"{kind}:{key}", join_frame(header, payloads)
    if kind == "meta_drop" and header["meta"]:
        del header["meta"][_pick(rng, sorted(header["meta"]))]
        return kind, join_frame(header, payloads)
    if kind == "meta_type":
        header["meta"] = _pick(rng, [None, [], "meta", 1, {"unknown": 1}])
        return kind, join_frame(header, payloads)
    header_value = _pick(rng, [None, [], "x", {"meta": {}}, {"blobs": []}, {"meta": {}, "blobs": {}}])
    return "header_type", join_frame(header_value, payloads)


# --- a real backend and valid requests for it ----------------------------------------------------------------


@dataclass
class Target:
    url: str
    token: str
    scheduler_config: dict
    cross_attention_dim: int
    weights_digest: str  # the served UNet's, from /v1/capabilities

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120)

    def auth(self, token: str | None = None) -> dict:
        return {"Authorization": f"Bearer {token or self.token}"}


SESSION_KINDS = (("full", "fast"), ("min-distortion", "fast"), ("none", None), ("full", "paper"))


def open_frame(target: Target, encryption: str, preset: str | None, steps: int = 3) -> protocol.Frame:
    plan = build_plan("ddim", target.scheduler_config, steps)
    meta = dict(
        scheduler="ddim",
        steps=steps,
        guidance=7.5,
        height=32,
        width=32,
        split="conv_in",
        encryption=encryption,
        he_preset=preset,
        activation_dtype="float32",
        plan_digest=plan.digest(),
        weights_digest=target.weights_digest,
    )
    rng = np.random.default_rng(0)
    shape = (1, 77, target.cross_attention_dim)
    f = protocol.Frame(
        meta=meta,
        tensors={"cond": rng.standard_normal(shape).astype(np.float32), "uncond": rng.standard_normal(shape)},
    )
    f.tensors["uncond"] = f.tensors["uncond"].astype(np.float32)
    if preset is not None:
        f.blobs["context"] = he.preset_parameter_bytes(he.get_preset(preset))
    return f


@dataclass
class LiveSession:
    id: str
    encryption: str
    preset: str | None
    opened: dict
    key: he.ClientKey | None
    next_step: int = 0

    def step_frame(self, step: int | None = None) -> protocol.Frame:
        step = self.next_step if step is None else step
        rng = np.random.default_rng(step)
        shape = tuple(self.opened["latent_shape"])
        f = protocol.Frame(meta={"step": step})
        for name, act_shape in self.opened["activation_shapes"].items():
            f.tensors[name] = rng.standard_normal(act_shape).astype(np.float32)
        x = rng.standard_normal(shape)
        if self.key is None:
            f.tensors["latent"] = x
            return f
        mask = None
        if self.encryption == "min-distortion":
            mask = rng.random(shape) < 0.7
            f.tensors["mask"] = pack_mask(mask)
        package = encrypt_latent(x, mask, self.key)
        for i, ct in enumerate(package.ciphertexts):
            f.blobs[f"ct{i}"] = ct.serialize()
        if mask is not None:
            f.tensors["remainder"] = package.remainder
        return f


def open_session(http: httpx.Client, target: Target, encryption: str, preset: str | None) -> LiveSession:
    body = open_frame(target, encryption, preset).encode()
    r = http.post("/v1/sessions", content=body, headers=target.auth() | FRAME)
    if r.status_code != 201:
        raise RuntimeError(f"a valid session request failed: HTTP {r.status_code} {r.text[:300]}")
    opened = r.json()
    key = he.ClientKey(preset) if preset else None
    return LiveSession(opened["session_id"], encryption, preset, opened, key)


def semantic_step_mutations(session: LiveSession, rng: np.random.Generator) -> tuple[str, bytes]:
    """Well-formed frames whose contents are wrong for the session: values, dtypes, shapes, ciphertexts."""
    f = session.step_frame()
    h = f.tensors["h"]
    cts = sorted(k for k in f.blobs if k.startswith("ct"))
    choices = ["nan_h", "inf_h", "h_dtype", "h_shape", "h_missing", "step_meta", "extra_blob"]
    if cts:
        choices += ["ct_random", "ct_truncated", "ct_flipped", "ct_empty", "ct_garbage_tenseal", "ct_other_preset"]
        choices += ["ct_missing", "ct_extra", "ct_context"]
    if "mask" in f.tensors:
        choices += ["mask_size", "mask_flip", "remainder_size", "remainder_nan"]
    if "latent" in f.tensors:
        choices += ["latent_nan", "latent_dtype"]
    kind = _pick(rng, choices)
    if kind in ("nan_h", "inf_h"):
        h = h.copy()
        h.flat[int(rng.integers(0, h.size))] = np.nan if kind == "nan_h" else -np.inf
        f.tensors["h"] = h
    elif kind == "h_dtype":
        f.tensors["h"] = h.astype(_pick(rng, [np.float64, np.float16, np.uint8]))
    elif kind == "h_shape":
        f.tensors["h"] = _pick(rng, [h.reshape(h.shape[1:]), h[..., :-1], np.zeros((0,), np.float32), h.swapaxes(2, 3)])
    elif kind == "h_missing":
        del f.tensors["h"]
    elif kind == "step_meta":
        f.meta["step"] = _pick(rng, HOSTILE_VALUES + [session.next_step + 1, 999, -1])
    elif kind == "extra_blob":
        f.blobs["zzz"] = rng.bytes(int(rng.integers(0, 1024)))
    elif kind == "ct_random":
        name = _pick(rng, cts)
        f.blobs[name] = rng.bytes(len(f.blobs[name]))
    elif kind == "ct_truncated":
        name = _pick(rng, cts)
        f.blobs[name] = f.blobs[name][: int(rng.integers(0, len(f.blobs[name])))]
    elif kind == "ct_flipped":
        name = _pick(rng, cts)
        f.blobs[name] = _flip_bits(f.blobs[name], rng, 0, len(f.blobs[name]), int(rng.integers(1, 16)))
    elif kind == "ct_empty":
        f.blobs[_pick(rng, cts)] = b""
    elif kind == "ct_garbage_tenseal":
        f.blobs[_pick(rng, cts)] = _pick(rng, _garbage_tenseal())
    elif kind == "ct_other_preset":
        other = "paper" if session.preset == "fast" else "fast"
        f.blobs[_pick(rng, cts)] = _foreign_ciphertext(other)
    elif kind == "ct_missing":
        del f.blobs[cts[-1]]
    elif kind == "ct_extra":
        f.blobs[f"ct{len(cts)}"] = f.blobs[cts[0]]
    elif kind == "ct_context":
        f.blobs[_pick(rng, cts)] = he.preset_parameter_bytes(he.get_preset(session.preset))
    elif kind == "mask_size":
        f.tensors["mask"] = f.tensors["mask"][: -int(rng.integers(1, 4))]
    elif kind == "mask_flip":
        mask = f.tensors["mask"].copy()
        mask[int(rng.integers(0, mask.size))] ^= 0xFF
        f.tensors["mask"] = mask
    elif kind == "remainder_size":
        f.tensors["remainder"] = np.append(f.tensors["remainder"], 1.0)
    elif kind == "remainder_nan":
        r = f.tensors["remainder"].copy()
        r[0] = np.nan
        f.tensors["remainder"] = r
    elif kind == "latent_nan":
        x = f.tensors["latent"].copy()
        x.flat[0] = np.inf
        f.tensors["latent"] = x
    else:
        f.tensors["latent"] = f.tensors["latent"].astype(np.float32)
    return kind, f.encode()


def semantic_open_mutations(target: Target, rng: np.random.Generator) -> tuple[str, bytes]:
    encryption, preset = _pick(rng, [("full", "fast"), ("full", "paper"), ("min-distortion", "fast")])
    f = open_frame(target, encryption, preset)
    kind = _pick(
        rng,
        ["cond_nan", "cond_shape", "cond_dtype", "uncond_missing", "ctx_random", "ctx_flip", "ctx_secret",
         "ctx_other", "ctx_missing", "size", "steps", "guidance"],
    )  # fmt: skip
    if kind == "cond_nan":
        c = f.tensors["cond"].copy()
        c[0, 0, 0] = np.nan
        f.tensors["cond"] = c
    elif kind == "cond_shape":
        f.tensors["cond"] = np.zeros((1, 76, target.cross_attention_dim), np.float32)
    elif kind == "cond_dtype":
        f.tensors["cond"] = f.tensors["cond"].astype(np.float64)
    elif kind == "uncond_missing":
        del f.tensors["uncond"]
    elif kind == "ctx_random":
        f.blobs["context"] = rng.bytes(int(rng.integers(0, 4096)))
    elif kind == "ctx_flip":
        f.blobs["context"] = _flip_bits(f.blobs["context"], rng, 0, len(f.blobs["context"]), int(rng.integers(1, 8)))
    elif kind == "ctx_secret":
        f.blobs["context"] = _secret_context(preset)
    elif kind == "ctx_other":
        f.blobs["context"] = he.preset_parameter_bytes(he.get_preset("paper" if preset == "fast" else "fast"))
    elif kind == "ctx_missing":
        del f.blobs["context"]
    elif kind == "size":
        f.meta["height"], f.meta["width"] = _pick(rng, [(0, 0), (30, 32), (4096, 4096), (8, 2048), (-8, 8)])
    elif kind == "steps":
        f.meta["steps"] = _pick(rng, [0, 501, -1, 2**40, 2.0])
    else:
        f.meta["guidance"] = _pick(rng, [float("nan"), -1, 1e300, 100.5, "7.5"])
    return kind, f.encode()


# key generation is slow, so the hostile blobs that need keys are made once


@functools.cache
def _garbage_tenseal() -> tuple[bytes, bytes]:
    """A TenSEAL CKKS vector and a full TenSEAL context (with keys): well-formed TenSEAL, not a SEAL ciphertext."""
    import tenseal as ts

    ctx = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 60])
    ctx.global_scale = 2**40
    return ts.ckks_vector(ctx, [1.0, 2.0]).serialize(), ctx.serialize()


@functools.cache
def _foreign_ciphertext(preset: str) -> bytes:
    return he.ClientKey(preset).encrypt(np.zeros(4))[0].serialize()


@functools.cache
def _secret_context(preset: str) -> bytes:
    return he.ClientKey(preset, exportable=True).export_secret()


# --- the two fuzzers -----------------------------------------------------------------------------------------


def _send(http: httpx.Client, tally: Tally, source: str, label: str, method: str, path: str, **kw) -> httpx.Response:
    try:
        r = http.request(method, path, **kw)
    except httpx.HTTPError as e:
        tally.record(source, label, f"connection:{type(e).__name__}", str(e))
        return None
    tally.record(source, label, r.status_code, r.text if r.status_code >= 500 else "")
    return r


def fuzz_frames(
    target: Target, n: int, seed: int, tally: Tally, check_every: int = 40, progress_every: int = 0
) -> None:
    """``n`` mutated frames: session openings and steps of live sessions of every kind."""
    rng = np.random.default_rng(seed)
    with target.client() as http:
        sessions = [open_session(http, target, enc, preset) for enc, preset in SESSION_KINDS]
        since_check = 0
        for k in range(n):
            if progress_every and k and k % progress_every == 0:
                print(f"{k} of {n} frames sent; failures so far: {len(tally.failures)}", flush=True)
            what = rng.random()
            auth = target.auth() if rng.random() > 0.03 else _pick(rng, [{}, target.auth("hdt_wrong")])
            ctype = FRAME if rng.random() > 0.02 else {"content-type": _pick(rng, ["application/json", "text/plain"])}
            if what < 0.25:
                if rng.random() < 0.5:
                    label, body = semantic_open_mutations(target, rng)
                else:
                    good = open_frame(target, *_pick(rng, SESSION_KINDS)).encode()
                    label, body = _pick(rng, [byte_mutations, header_mutations])(good, rng)
                r = _send(http, tally, "frames/open", label, "POST", "/v1/sessions", content=body, headers=auth | ctype)
                if r is not None and r.status_code == 201:  # the mutation happened to be valid: do not hold a slot
                    http.delete(f"/v1/sessions/{r.json()['session_id']}", headers=target.auth())
                continue
            i = int(rng.integers(0, len(sessions)))
            s = sessions[i]
            if rng.random() < 0.5:
                label, body = semantic_step_mutations(s, rng)
            else:
                label, body = _pick(rng, [byte_mutations, header_mutations])(s.step_frame().encode(), rng)
            path = f"/v1/sessions/{s.id}/steps"
            r = _send(http, tally, "frames/step", label, "POST", path, content=body, headers=auth | ctype)
            since_check += 1
            if r is not None and r.status_code == 200:
                # a mutation that is still a valid step (e.g. another key's ciphertext): the session moved on
                sessions[i] = _renew(http, target, s)
            elif since_check >= check_every:
                since_check = 0
                sessions[i] = _check_state(http, target, s, tally)
        for s in sessions:
            http.delete(f"/v1/sessions/{s.id}", headers=target.auth())


def _renew(http: httpx.Client, target: Target, s: LiveSession) -> LiveSession:
    http.delete(f"/v1/sessions/{s.id}", headers=target.auth())
    return open_session(http, target, s.encryption, s.preset)


def _check_state(http: httpx.Client, target: Target, s: LiveSession, tally: Tally) -> LiveSession:
    """After garbage, the session's next valid step must still be answered as if nothing had happened."""
    tally.state_checks += 1
    r = http.post(f"/v1/sessions/{s.id}/steps", content=s.step_frame().encode(), headers=target.auth() | FRAME)
    answer = protocol.decode_frame(r.content) if r.status_code == 200 else None
    if answer is None or answer.meta.get("step") != s.next_step:
        tally.failures.append({"source": "state", "case": f"valid step {s.next_step}", "status": r.status_code})
    return _renew(http, target, s)


def _case_sender(http: httpx.Client, target: Target, tally: Tally, label: str, live_id: str, auths: list[dict]):
    sent = [0]

    def send(case) -> None:
        sent[0] += 1
        if "session_id" in (case.path_parameters or {}) and sent[0] % 2:
            case.path_parameters["session_id"] = live_id
        kwargs = case.as_transport_kwargs(base_url=target.url, headers=auths[sent[0] % len(auths)])
        body = kwargs.get("data")
        if body is None and "json" in kwargs:
            body = json.dumps(kwargs["json"]).encode()
        _send(
            http,
            tally,
            "openapi",
            label,
            kwargs["method"],
            kwargs["url"],
            content=body,
            headers=kwargs.get("headers"),
            params=kwargs.get("params"),
            cookies=kwargs.get("cookies"),
        )

    return send


def fuzz_openapi(target: Target, n_per_operation: int, seed: int, tally: Tally) -> None:
    """schemathesis cases for every route of the backend's OpenAPI document, with good, wrong and no tokens.

    Half the session routes get a live session's id, so the random bodies reach a real session's step handler.
    """
    import hypothesis
    import schemathesis
    from hypothesis import HealthCheck, Phase

    schemathesis.serializer.alias(protocol.FRAME_CONTENT_TYPE, "application/octet-stream")
    with target.client() as http:
        spec = http.get("/openapi.json", headers=target.auth()).json()  # the document needs the token
        live = open_session(http, target, "full", "fast")
        schema = schemathesis.openapi.from_dict(spec)
        auths = [target.auth(), {}, target.auth("hdt_wrong"), {"Authorization": "Basic Zm9vOmJhcg=="}]
        for result in schema.get_all_operations():
            operation = result.ok()
            for mode in schemathesis.GenerationMode:
                strategy = operation.as_strategy(generation_mode=mode)
                label = f"{mode.value} {operation.method.upper()} {operation.path}"
                send = _case_sender(http, target, tally, label, live.id, auths)
                send = hypothesis.given(case=strategy)(send)
                send = hypothesis.settings(
                    max_examples=n_per_operation,
                    database=None,
                    deadline=None,
                    phases=[Phase.generate],
                    suppress_health_check=list(HealthCheck),
                )(send)
                send = hypothesis.seed(seed)(send)
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        send()
                except hypothesis.errors.Unsatisfiable:
                    pass  # e.g. a negative case for a route that takes no input at all
        http.delete(f"/v1/sessions/{live.id}", headers=target.auth())


# --- the bench command ---------------------------------------------------------------------------------------


def run(target: Target, n_requests: int, seed: int, progress_every: int = 0) -> Tally:
    """About a fifth of the requests from schemathesis (it stops early on routes with little to vary), the rest
    mutated frames, so that the total is at least ``n_requests``."""
    tally = Tally()
    fuzz_openapi(target, max(10, n_requests // 25), seed, tally)
    fuzz_frames(target, max(0, n_requests - tally.requests), seed, tally, progress_every=progress_every)
    return tally


@contextlib.contextmanager
def served_target(model: str, *serve_args: str):
    """`hediff serve` on the tiny model (built in a temporary folder) or on a model folder, and a Target for it.

    Yields (served, target, model folder); on exit the server is stopped and its log kept in ``served.log_text``.
    """
    from hediff.common.models import build_tiny_model, load_scheduler_config

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        path = build_tiny_model(workdir / "model", seed=0) if model == "tiny" else Path(model)
        served = serve_subprocess(str(path), workdir, *serve_args)
        try:
            caps = httpx.get(served.url + "/v1/capabilities", headers={"Authorization": f"Bearer {served.token}"})
            model_caps = caps.json()["model"]
            dim, weights = model_caps["cross_attention_dim"], model_caps["weights_digest"]
            yield served, Target(served.url, served.token, load_scheduler_config(path), dim, weights), path
        finally:
            served.stop()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="tiny", help="'tiny' (built here, seed 0) or a diffusers folder")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args(argv)

    from bench.report import command_line, machine_info

    # fuzzing exercises the parser, so the malformed-request cool-down (which would stop reading after 5) is off
    with served_target(args.model, "--failures-before-cooldown", "1000000000") as (served, target, _):
        t0 = time.perf_counter()
        tally = run(target, args.requests, args.seed, progress_every=1000)
        wall = time.perf_counter() - t0
        alive = httpx.get(served.url + "/v1/health", timeout=10).status_code == 200
    report = {
        "command": command_line("bench.fuzz", argv),
        "machine": machine_info(),
        "wall_s": round(wall, 1),
        "server_alive_after": alive and not served.died_early,
        "server_internal_errors_logged": served.log_text.count("internal error"),
        **tally.to_json(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fuzz.json").write_text(json.dumps(report, indent=2))
    print(f"{tally.requests} requests in {wall:.0f} s; by status: {report['by_status']}")
    for source, counts in report["by_source"].items():
        print(f"  {source}: {dict(counts)}")
    print(f"state checks: {tally.state_checks}; server alive after: {report['server_alive_after']}")
    print(f"failures (5xx, dropped connections, changed state): {len(tally.failures)}")
    for f in tally.failures[:20]:
        print("  ", f)
    return 0 if not tally.failures and report["server_alive_after"] else 1


if __name__ == "__main__":
    sys.exit(main())
