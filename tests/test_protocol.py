import json
import struct

import numpy as np
import pytest

from hediff.common import protocol
from hediff.common.protocol import Frame, ProtocolError, decode_frame


def _frame():
    return Frame(
        meta={"step": 3, "note": "ünïcode"},
        tensors={"h": np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4), "m": np.array([1, 2, 255], dtype=np.uint8)},
        blobs={"ct0": b"\x00\x01cipher", "ct1": b""},
    )


def test_roundtrip_preserves_values_dtypes_and_bytes():
    f = _frame()
    data = f.encode()
    g = decode_frame(data)
    assert g.meta == f.meta
    assert g.blobs == f.blobs
    for k, v in f.tensors.items():
        assert g.tensors[k].dtype == v.dtype and np.array_equal(g.tensors[k], v)
    # tensors travel as raw little-endian bytes, not base64: the payload is the data plus a small header
    assert len(data) - f.nbytes < 400
    assert f.tensors["h"].tobytes() in data


def test_float16_tensor_is_half_the_bytes():
    a = np.random.default_rng(0).standard_normal((1, 8, 16, 16)).astype(np.float32)
    assert len(Frame(tensors={"h": a.astype(np.float16)}).encode()) < 0.55 * len(Frame(tensors={"h": a}).encode())


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda d: d[:10], "truncated|impossible"),
        (lambda d: d[:-1], "truncated"),
        (lambda d: d + b"x", "trailing"),
        (lambda d: b"XXXX" + d[4:], "magic"),
        (lambda d: d[:4] + bytes([9]) + d[5:], "version"),
        (lambda d: d[:8] + struct.pack("<I", 1 << 30)[:0] + d[8:10], "impossible|truncated"),
        (lambda d: b"", "truncated"),
    ],
)
def test_malformed_frames_are_refused_with_a_specific_message(mutate, message):
    with pytest.raises(ProtocolError, match=message):
        decode_frame(mutate(_frame().encode()))


def _raw(header: dict, payload: bytes = b"") -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<4sBBI", protocol.MAGIC, protocol.PROTOCOL_VERSION, 0, len(h)) + h + payload


@pytest.mark.parametrize(
    "header,payload,message",
    [
        (
            {"meta": {}, "blobs": [{"name": "x", "kind": "tensor", "dtype": "int64", "shape": [1], "nbytes": 8}]},
            b"\0" * 8,
            "unsupported dtype",
        ),
        (
            {"meta": {}, "blobs": [{"name": "x", "kind": "tensor", "dtype": "float32", "shape": [3], "nbytes": 8}]},
            b"\0" * 8,
            "needs 12 bytes",
        ),
        (
            {"meta": {}, "blobs": [{"name": "x", "kind": "tensor", "dtype": "float32", "shape": [-1], "nbytes": 4}]},
            b"\0" * 4,
            "invalid shape",
        ),
        ({"meta": {}, "blobs": [{"name": "x", "kind": "weird", "nbytes": 0}]}, b"", "unknown kind"),
        (
            {
                "meta": {},
                "blobs": [{"name": "x", "kind": "bytes", "nbytes": 1}, {"name": "x", "kind": "bytes", "nbytes": 1}],
            },
            b"ab",
            "twice",
        ),
        ({"meta": [], "blobs": []}, b"", "must be an object"),
        ({"meta": {}, "blobs": [{"kind": "bytes", "nbytes": 0}]}, b"", "no valid name"),
        ({"meta": {}, "blobs": [{"name": "x", "kind": "bytes", "nbytes": -5}]}, b"", "invalid length"),
    ],
)
def test_bad_headers(header, payload, message):
    with pytest.raises(ProtocolError, match=message):
        decode_frame(_raw(header, payload))


def test_size_limit_and_bad_json():
    data = _frame().encode()
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        decode_frame(data, max_bytes=len(data) - 1)
    bad = struct.pack("<4sBBI", protocol.MAGIC, protocol.PROTOCOL_VERSION, 0, 3) + b"{x}"
    with pytest.raises(ProtocolError, match="not valid JSON"):
        decode_frame(bad)


def test_require_tensor_checks_shape_dtype_and_finiteness():
    f = Frame(tensors={"h": np.array([[1.0, np.nan]], dtype=np.float32), "g": np.ones((2, 2), dtype=np.float64)})
    g = decode_frame(f.encode())
    with pytest.raises(ProtocolError, match="NaN"):
        protocol.require_tensor(g, "h", (1, 2), ("float32",))
    with pytest.raises(ProtocolError, match="shape"):
        protocol.require_tensor(g, "g", (4,), ("float64",))
    with pytest.raises(ProtocolError, match="dtype"):
        protocol.require_tensor(g, "g", (2, 2), ("float32",))
    with pytest.raises(ProtocolError, match="missing"):
        protocol.require_tensor(g, "zz", (1,), ("float32",))


def test_ciphertext_collection():
    f = Frame(blobs={"ct0": b"a", "ct1": b"b"})
    assert protocol.collect_ciphertexts(f, 2) == [b"a", b"b"]
    with pytest.raises(ProtocolError, match="missing ct2"):
        protocol.collect_ciphertexts(f, 3)
    with pytest.raises(ProtocolError, match="extra"):
        protocol.collect_ciphertexts(f, 1)


def test_fuzzed_frames_never_raise_anything_but_protocol_error():
    rng = np.random.default_rng(0)
    data = bytearray(_frame().encode())
    for _ in range(2000):
        d = bytearray(data)
        for _ in range(rng.integers(1, 4)):
            d[rng.integers(len(d))] = rng.integers(256)
        try:
            decode_frame(bytes(d[: rng.integers(len(d) + 1)]))
        except ProtocolError:
            pass
