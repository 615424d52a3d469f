"""The UNet weight digest: what it covers, when it changes, and the session-open refusal when the server runs
other weights than the client."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from hediff.backend.engine import ServerModel
from hediff.common import protocol
from hediff.common.models import ModelFolderError, unet_weights_digest
from hediff.desktop.core.backend_client import BackendClient, BackendError
from hediff.desktop.core.engine import Generator
from tests.conftest import start_backend
from tests.test_e2e import params

UNET_FILE = Path("unet") / "diffusion_pytorch_model.safetensors"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, copy_function=shutil.copy)  # plain copy: new mtimes, same bytes
    return dst


def _change_one_tensor(folder: Path, name: str = "conv_in.bias", delta: float = 1e-3) -> None:
    tensors = load_file(folder / UNET_FILE)
    tensors[name] = tensors[name] + delta
    save_file(tensors, folder / UNET_FILE, metadata={"format": "pt"})


def test_the_digest_covers_tensor_data_not_files(tiny_model_dir, tmp_path):
    original = unet_weights_digest(tiny_model_dir)
    assert len(original) == 64 and int(original, 16) >= 0

    copy = _copy(tiny_model_dir, tmp_path / "copy")
    assert unet_weights_digest(copy) == original  # another folder, other mtimes, same weights

    # the same tensors saved in another order with other header metadata: the same weights
    tensors = load_file(copy / UNET_FILE)
    save_file(dict(reversed(list(tensors.items()))), copy / UNET_FILE, metadata={"format": "pt", "note": "resaved"})
    assert unet_weights_digest(copy) == original

    # the same tensors in two shards with an index, as large models ship
    sharded = _copy(tiny_model_dir, tmp_path / "sharded")
    names = sorted(tensors)
    shards = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2 :]}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, sharded / "unet" / file)
    (sharded / UNET_FILE).unlink()
    index = {"weight_map": {n: file for file, part in shards.items() for n in part}}
    (sharded / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    assert unet_weights_digest(sharded) == original


def test_one_changed_tensor_changes_the_digest_even_in_place(tiny_model_dir, tmp_path):
    folder = _copy(tiny_model_dir, tmp_path / "model")
    before = unet_weights_digest(folder)
    stat = (folder / UNET_FILE).stat()
    _change_one_tensor(folder)
    os.utime(folder / UNET_FILE, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # a later mtime
    assert unet_weights_digest(folder) != before  # the per-file cache notices the new (size, mtime)

    scaled = _copy(tiny_model_dir, tmp_path / "dtype")  # same values, other dtype: other weights on the wire
    tensors = {k: v.to(torch.float16) for k, v in load_file(scaled / UNET_FILE).items()}
    save_file(tensors, scaled / UNET_FILE)
    assert unet_weights_digest(scaled) != before


def test_a_corrupt_weight_file_is_named(tiny_model_dir, tmp_path):
    folder = _copy(tiny_model_dir, tmp_path / "model")
    data = (folder / UNET_FILE).read_bytes()
    (folder / UNET_FILE).write_bytes(data[: len(data) // 2])  # truncated: tensors lie past the end
    with pytest.raises(ModelFolderError, match=r"diffusion_pytorch_model\.safetensors is not a readable"):
        unet_weights_digest(folder)


@pytest.fixture(scope="module")
def other_weights_backend(tiny_model_dir, tmp_path_factory):
    """A server whose model is the test model with one UNet tensor changed (a different fine-tune)."""
    folder = _copy(tiny_model_dir, tmp_path_factory.mktemp("fine-tune") / "model")
    _change_one_tensor(folder)
    server = ServerModel(folder, "other-fine-tune", device="cpu", dtype="float32")
    running, info = start_backend(server)
    yield info, server
    running.stop()


def test_a_server_with_other_weights_refuses_the_session_before_any_step(client_model, other_weights_backend):
    backend, server = other_weights_backend
    ours, theirs = unet_weights_digest(client_model.path), server.weights_digest
    assert ours != theirs
    backend.recorded.clear()
    with BackendClient(backend.url, backend.token) as client:
        assert client.capabilities()["model"]["weights_digest"] == theirs
        with pytest.raises(BackendError) as e:
            Generator(client_model, client).generate(params(scheduler="ddim", steps=2))
    message = str(e.value)
    assert "HTTP 400" in message and ours[:12] in message and theirs[:12] in message
    assert "load the same model folder" in message and "'other-fine-tune'" in message
    assert [path for path, _ in backend.recorded] == ["/v1/sessions"]  # refused at open: no step was sent


def test_the_same_weights_open_and_a_missing_or_malformed_digest_is_400(generator, backend, server_model):
    result = generator.generate(params(scheduler="ddim", steps=2))  # the matching digest opens normally
    assert result.latent.shape == (4, 16, 16)
    opened = protocol.decode_frame([b for p, b in backend.recorded if p == "/v1/sessions"][-1])
    assert opened.meta["weights_digest"] == server_model.weights_digest

    for bad in (None, "abc", server_model.weights_digest.upper()):
        meta = dict(opened.meta)
        if bad is None:
            del meta["weights_digest"]
        else:
            meta["weights_digest"] = bad
        frame = protocol.Frame(meta=meta, tensors=opened.tensors, blobs=opened.blobs)
        r = httpx.post(
            backend.url + "/v1/sessions",
            content=frame.encode(),
            headers={"Authorization": f"Bearer {backend.token}", "content-type": protocol.FRAME_CONTENT_TYPE},
            timeout=60,
        )
        expected = "'weights_digest' is missing: it must be" if bad is None else "'weights_digest' must be"
        assert r.status_code == 400 and f"{expected} the 64-character hex SHA-256" in r.json()["detail"]
