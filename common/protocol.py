"""Wire format between client and backend: binary frames for tensors and ciphertexts, JSON for the rest.

A frame is ``MAGIC | version u8 | reserved u8 | header length u32 LE | header (UTF-8 JSON) | blobs``. The
header names each blob with its kind ("tensor" with dtype and shape, or "bytes") and its length; blobs
follow in that order with nothing in between or after. Large arrays never go through base64.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any

import numpy as np
from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass

from hediff.common import settings
from hediff.common.errors import EXIT_PROTOCOL, HEDiffusionError

PROTOCOL_VERSION = 1
MAGIC = b"HEDF"
FRAME_CONTENT_TYPE = "application/x-hediff-frame"
_PREFIX = struct.Struct("<4sBBI")

MAX_HEADER_BYTES = 1 << 20
MAX_BLOBS = 256
MAX_DIMS = 6
MAX_TENSOR_ELEMENTS = 1 << 31  # far above any latent or activation; bounds what a shape may claim
DEFAULT_MAX_FRAME_BYTES = 256 << 20

TENSOR_DTYPES = {"float16": np.float16, "float32": np.float32, "float64": np.float64, "uint8": np.uint8}
ACTIVATION_DTYPES = settings.ACTIVATION_DTYPES


class ProtocolError(HEDiffusionError, ValueError):
    """A message that does not follow the protocol; the text says what is wrong."""

    exit_code = EXIT_PROTOCOL


@dataclass
class Frame:
    meta: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)

    def encode(self) -> bytes:
        entries, payloads = [], []
        for name, arr in self.tensors.items():
            arr = np.ascontiguousarray(arr)
            dtype = _dtype_name(arr.dtype)
            entries.append(
                {"name": name, "kind": "tensor", "dtype": dtype, "shape": list(arr.shape), "nbytes": arr.nbytes}
            )
            payloads.append(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
        for name, data in self.blobs.items():
            entries.append({"name": name, "kind": "bytes", "nbytes": len(data)})
            payloads.append(bytes(data))
        header = json.dumps({"meta": self.meta, "blobs": entries}, separators=(",", ":")).encode()
        return b"".join([_PREFIX.pack(MAGIC, PROTOCOL_VERSION, 0, len(header)), header, *payloads])

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.tensors.values()) + sum(len(b) for b in self.blobs.values())


def _dtype_name(dtype: np.dtype) -> str:
    for name, t in TENSOR_DTYPES.items():
        if np.dtype(t) == dtype.newbyteorder("="):
            return name
    raise ProtocolError(f"dtype {dtype} cannot go on the wire; use one of {', '.join(TENSOR_DTYPES)}")


def decode_frame(data: bytes, max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Frame:
    if len(data) > max_bytes:
        raise ProtocolError(f"frame of {len(data)} bytes exceeds the limit of {max_bytes} bytes")
    if len(data) < _PREFIX.size:
        raise ProtocolError(f"frame truncated: {len(data)} bytes is shorter than the {_PREFIX.size}-byte prefix")
    magic, version, _reserved, header_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError("not an HE-Diffusion frame (bad magic bytes)")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"frame protocol version {version} is not supported (this side speaks {PROTOCOL_VERSION})")
    if header_len > MAX_HEADER_BYTES or _PREFIX.size + header_len > len(data):
        raise ProtocolError(f"frame header length {header_len} is impossible for a {len(data)}-byte frame")
    try:
        header = json.loads(data[_PREFIX.size : _PREFIX.size + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"frame header is not valid JSON: {e}") from None
    except RecursionError:
        raise ProtocolError("frame header nests JSON too deeply") from None
    except ValueError as e:  # e.g. an integer with more digits than Python converts
        raise ProtocolError(f"frame header holds an unreadable value: {e}") from None
    if (
        not isinstance(header, dict)
        or not isinstance(header.get("meta"), dict)
        or not isinstance(header.get("blobs"), list)
    ):
        raise ProtocolError("frame header must be an object with 'meta' (object) and 'blobs' (list)")
    entries = header["blobs"]
    if len(entries) > MAX_BLOBS:
        raise ProtocolError(f"frame has {len(entries)} blobs; at most {MAX_BLOBS} are allowed")
    frame = Frame(meta=header["meta"])
    offset = _PREFIX.size + header_len
    for i, entry in enumerate(entries):
        name, kind, nbytes = _entry_fields(entry, i)
        if name in frame.tensors or name in frame.blobs:
            raise ProtocolError(f"blob {name!r} appears twice")
        if offset + nbytes > len(data):
            raise ProtocolError(f"frame truncated: blob {name!r} needs {nbytes} bytes, {len(data) - offset} remain")
        chunk = data[offset : offset + nbytes]
        offset += nbytes
        if kind == "bytes":
            frame.blobs[name] = chunk
        else:
            frame.tensors[name] = _tensor_from(entry, name, chunk)
    if offset != len(data):
        raise ProtocolError(f"frame has {len(data) - offset} unexpected trailing bytes")
    return frame


def _entry_fields(entry: Any, i: int) -> tuple[str, str, int]:
    if not isinstance(entry, dict):
        raise ProtocolError(f"blob entry {i} is not an object")
    name, kind, nbytes = entry.get("name"), entry.get("kind"), entry.get("nbytes")
    if not isinstance(name, str) or not name or len(name) > 64:
        raise ProtocolError(f"blob entry {i} has no valid name")
    if kind not in ("tensor", "bytes"):
        raise ProtocolError(f"blob {name!r} has unknown kind {kind!r}")
    if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
        raise ProtocolError(f"blob {name!r} has an invalid length {nbytes!r}")
    return name, kind, nbytes


def _tensor_from(entry: dict, name: str, chunk: bytes) -> np.ndarray:
    dtype, shape = entry.get("dtype"), entry.get("shape")
    if dtype not in TENSOR_DTYPES:
        raise ProtocolError(f"tensor {name!r} has unsupported dtype {dtype!r}; allowed: {', '.join(TENSOR_DTYPES)}")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 31 for d in shape)
    ):
        raise ProtocolError(f"tensor {name!r} has an invalid shape {shape!r}")
    elements = math.prod(shape)  # Python ints: numpy's int64 product wraps for crafted shapes
    if elements > MAX_TENSOR_ELEMENTS:
        raise ProtocolError(
            f"tensor {name!r} of shape {shape} has {elements} elements; at most {MAX_TENSOR_ELEMENTS} are allowed"
        )
    np_dtype = np.dtype(TENSOR_DTYPES[dtype]).newbyteorder("<")
    expected = elements * np_dtype.itemsize
    if expected != len(chunk):
        raise ProtocolError(
            f"tensor {name!r} of shape {shape} and dtype {dtype} needs {expected} bytes, got {len(chunk)}"
        )
    return np.frombuffer(chunk, dtype=np_dtype).reshape(shape).astype(np_dtype.newbyteorder("="), copy=False)


# --- message-level helpers, used by both sides ---------------------------------------------------


def require_tensor(frame: Frame, name: str, shape: tuple[int, ...], dtypes: tuple[str, ...]) -> np.ndarray:
    """The named tensor with exactly this shape, one of these dtypes, all finite."""
    if name not in frame.tensors:
        raise ProtocolError(f"missing tensor {name!r}")
    arr = frame.tensors[name]
    if tuple(arr.shape) != tuple(shape):
        raise ProtocolError(f"tensor {name!r} has shape {tuple(arr.shape)}, expected {tuple(shape)}")
    if _dtype_name(arr.dtype) not in dtypes:
        raise ProtocolError(f"tensor {name!r} has dtype {_dtype_name(arr.dtype)}, expected {' or '.join(dtypes)}")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise ProtocolError(f"tensor {name!r} contains NaN or infinite values")
    return arr


def ciphertext_names(n: int) -> list[str]:
    return [f"ct{i}" for i in range(n)]


def collect_ciphertexts(frame: Frame, n: int) -> list[bytes]:
    names = ciphertext_names(n)
    missing = [x for x in names if x not in frame.blobs]
    if missing:
        raise ProtocolError(f"expected {n} ciphertexts, missing {', '.join(missing[:4])}")
    extra = [x for x in frame.blobs if x.startswith("ct") and x not in names]
    if extra:
        raise ProtocolError(f"expected {n} ciphertexts, got extra blobs {', '.join(extra[:4])}")
    return [frame.blobs[x] for x in names]


def meta_int(meta: dict, key: str, lo: int, hi: int) -> int:
    v = meta.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ProtocolError(f"{key!r} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


# --- session settings ------------------------------------------------------------------------------

# The encryption modes and activation dtypes are the settings' vocabulary; named here too for the wire code.
ENCRYPTION_CHOICES = settings.ENCRYPTION_MODES
PARTIAL_ENCRYPTION = settings.PARTIAL_ENCRYPTION


_WireSide = Annotated[int, Field(ge=settings.SIZE_MULTIPLE, le=settings.MAX_SIDE)]


@pydantic_dataclass(frozen=True, config=ConfigDict(strict=True, extra="ignore"))
class SessionSettings:
    """The session-open header: the generation settings the server needs, in the settings model's own types
    (same bounds and choices), plus the digest of the client's step plan. The prompt, seed and index-set
    choices never travel."""

    scheduler: settings.Scheduler
    steps: settings.Steps
    guidance: settings.Guidance
    height: _WireSide  # the multiple a side must be depends on the model: the server checks it with the model
    width: _WireSide
    split: settings.SplitPoint
    encryption: settings.EncryptionMode
    he_preset: settings.HEPreset | None
    activation_dtype: settings.ActivationDtype
    plan_digest: Annotated[str, Field(pattern="^[0-9a-f]{64}$")]
    # models.unet_weights_digest of the client's model: the server must run the same weights
    weights_digest: Annotated[str, Field(pattern="^[0-9a-f]{64}$")]
    # img2img: the strength the plan starts at (the server builds the same shortened plan); None: from noise.
    # The picture itself never travels: the client encodes and noises it.
    strength: settings.Fraction | None = None
    # images in the session, run as one UNet batch; the latent is then (count, C, h, w)
    count: Annotated[int, Field(ge=1, le=settings.MAX_COUNT)] = 1

    def to_meta(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_meta(
        cls,
        meta: dict,
        *,
        schedulers=settings.SCHEDULER_NAMES,
        splits=settings.SPLIT_POINTS,
        presets=settings.HE_PRESET_NAMES,
        max_steps: int = settings.MAX_STEPS,
        max_side: int = settings.MAX_SIDE,
        u_splits=tuple(settings.U_SPLITS),
    ) -> SessionSettings:
        """The header validated by the settings' types, then against this server: the splits, schedulers and
        presets it runs, its step and size caps. ProtocolError names the field and what is allowed."""
        if not isinstance(meta, dict):
            raise ProtocolError("the session header must be an object")
        if meta.get("encryption") == "none":
            meta = {**meta, "he_preset": None}  # a plaintext session has no HE parameters, whatever was sent
        try:
            header = cls(**{k: meta[k] for k in _HEADER_FIELDS if k in meta})
        except ValidationError as e:
            err = e.errors(include_url=False)[0]
            name = str(err["loc"][0])
            if err["type"] == "missing":
                raise ProtocolError(f"{name!r} is missing: it {_rule(name)}") from None
            raise ProtocolError(f"{name!r} {_rule(name)}, got {err.get('input')!r}") from None
        for name, options in (("scheduler", schedulers), ("split", splits), ("he_preset", presets)):
            value = getattr(header, name)
            if value is not None and value not in tuple(options):
                raise ProtocolError(f"{name!r} must be one of {', '.join(options)} on this server, got {value!r}")
        if header.steps > max_steps:
            raise ProtocolError(f"'steps' must be an integer in [1, {max_steps}] on this server, got {header.steps}")
        for name in ("height", "width"):
            if getattr(header, name) > max_side:
                raise ProtocolError(
                    f"{name!r} must be in [{settings.SIZE_MULTIPLE}, {max_side}] on this server, "
                    f"got {getattr(header, name)}"
                )
        if header.split in tuple(u_splits) and header.encryption != "none":
            raise ProtocolError(
                f"split {header.split!r} keeps the latent on the client, so nothing is encrypted: 'encryption' must "
                f"be 'none', got {header.encryption!r}"
            )
        if header.encryption != "none" and header.he_preset is None:
            raise ProtocolError(f"'he_preset' must be one of {', '.join(presets)} for an encrypted session")
        return header


_HEADER_FIELDS = ("scheduler", "steps", "guidance", "height", "width", "split", "encryption", "he_preset")
_HEADER_FIELDS += ("activation_dtype", "plan_digest", "weights_digest", "strength", "count")


def _rule(name: str) -> str:
    if name == "plan_digest":
        return "must be the 64-character hex digest of the client's step plan"
    if name == "weights_digest":
        return "must be the 64-character hex SHA-256 of the client's UNet weights"
    if name in ("height", "width"):
        return f"must be an integer in [{settings.SIZE_MULTIPLE}, {settings.MAX_SIDE}]"
    if name == "he_preset":
        return "must be one of " + ", ".join(settings.HE_PRESET_NAMES)
    return "must be " + settings.allowed(name)
