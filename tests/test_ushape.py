"""U-shaped splits (u1, u2, u3): the client keeps the first and last UNet blocks, the latent and the noise prediction.

Checked against diffusers itself: head + server middle + tail against ``UNet2DConditionModel``, a whole
generation against ``StableDiffusionPipeline``; what crosses the wire is read from the bytes the server received.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from hediff.common import models, protocol, split
from hediff.common.schedulers import build_plan
from hediff.common.split import UNetBody, UNetHeadTail, UnsupportedUNetError, client_parameter_names, split_unet
from hediff.desktop.core.backend_client import BackendClient, BackendRejected
from hediff.desktop.core.client_model import ClientModel
from hediff.desktop.core.engine import GenerationParams, Generator
from tests.conftest import start_backend
from tests.test_e2e import NEGATIVE, PROMPT, SIZE, reference

# the tiny model's UNet with a third resolution level, so that u2 has something left for the server
DEEP_UNET = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 32, 64],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
    "norm_num_groups": 8,
}


@pytest.fixture(scope="module")
def deep_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    from diffusers import UNet2DConditionModel

    dst = tmp_path_factory.mktemp("deep-model") / "model"
    shutil.copytree(tiny_model_dir, dst)
    shutil.rmtree(dst / "unet")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        UNet2DConditionModel(**DEEP_UNET).save_pretrained(dst / "unet", safe_serialization=True)
    return dst


@pytest.fixture(scope="module")
def deep_unet(deep_model_dir):
    return models.load_unet(deep_model_dir)


def _full_vs_split(unet, sp: str, hw: tuple[int, int], t) -> float:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, *hw, generator=g)
    ehs = torch.randn(2, 77, 32, generator=g)
    client, body = split_unet(unet, sp)
    with torch.no_grad():
        full = unet(torch.cat([x, x]), t, encoder_hidden_states=ehs).sample
        sent, kept = client.head(x, t, ehs)
        assert set(sent) == {"h"}
        assert tuple(sent["h"].shape) == split.activation_shapes(unet.config, sp, (2, 4, *hw))["h"]
        hidden = body(sent, t, ehs, latent_size=hw)
        assert tuple(hidden.shape) == split.return_shape(unet.config, sp, (2, 4, *hw))
        out = client.tail(hidden, kept, ehs)
    assert out.shape == full.shape
    return float((out - full).abs().max())


@pytest.mark.parametrize(
    ("sp", "hw"),
    [("u1", (16, 16)), ("u1", (15, 9)), ("u2", (16, 16)), ("u2", (13, 10)), ("u3", (16, 16)), ("u3", (13, 10))],
)
def test_head_middle_tail_reproduce_the_unet(deep_unet, sp, hw):
    # odd sizes exercise the forward_upsample_size path, where the server's last upsampler needs a client size
    assert _full_vs_split(deep_unet, sp, hw, torch.tensor(501)) <= 1e-5


def test_u1_on_the_tiny_model(server_model):
    assert _full_vs_split(server_model.unet, "u1", (16, 16), 999) <= 1e-5


def test_u3_on_the_tiny_model(server_model):
    """Two down blocks: u3 keeps both on the client and the server runs the mid block only."""
    assert _full_vs_split(server_model.unet, "u3", (16, 16), 999) <= 1e-5


def test_u3_sends_the_last_down_blocks_output_and_keeps_it_too(deep_unet):
    """u3: the last down block has no downsampler, so its output is both what the mid block gets and a skip the
    client's first up block consumes; the server answers with the mid block's output, same shape."""
    cfg = deep_unet.config
    assert split.activation_shapes(cfg, "u3", (2, 4, 16, 16)) == {"h": (2, 64, 4, 4)}
    assert split.return_shape(cfg, "u3", (2, 4, 16, 16)) == (2, 64, 4, 4)
    client = UNetHeadTail.from_unet(deep_unet, "u3")
    sent, kept = client.head(torch.zeros(1, 4, 16, 16), 3, torch.zeros(2, 77, 32))
    assert len(kept.skips) == sum(len(b.resnets) for b in deep_unet.up_blocks) == 6
    assert torch.equal(kept.skips[-1], sent["h"])
    names = client_parameter_names(cfg, "u3")
    assert not any(n.startswith("mid_block") for n in names)
    assert {n.split(".")[0] for n in names} >= {"down_blocks", "up_blocks", "conv_in", "conv_out"}
    assert {n.split(".")[1] for n in names if n.startswith(("down_blocks", "up_blocks"))} == {"0", "1", "2"}


def test_what_travels_and_what_stays(deep_unet):
    """Only the last client down block's output goes; the skips the client's up blocks consume all stay."""
    cfg = deep_unet.config
    assert split.activation_shapes(cfg, "u1", (2, 4, 16, 16)) == {"h": (2, 32, 8, 8)}
    assert split.return_shape(cfg, "u1", (2, 4, 16, 16)) == (2, 32, 16, 16)
    assert split.activation_shapes(cfg, "u2", (2, 4, 16, 16)) == {"h": (2, 32, 4, 4)}
    assert split.return_shape(cfg, "u2", (2, 4, 16, 16)) == (2, 64, 8, 8)
    client = UNetHeadTail.from_unet(deep_unet, "u2")
    _sent, kept = client.head(torch.zeros(1, 4, 16, 16), 3, torch.zeros(2, 77, 32))
    # conv_in, down0's resnet, down0's downsampler, down1's resnet = 2 + 2 resnets in up_blocks[1:]
    assert len(kept.skips) == sum(len(b.resnets) for b in deep_unet.up_blocks[1:]) == 4


def test_client_reads_only_head_and_tail_tensors(deep_model_dir, deep_unet):
    cfg = models.load_unet_config(deep_model_dir)
    names = client_parameter_names(cfg, "u1")
    assert any(n.startswith("down_blocks.0.attentions") for n in names)
    assert any(n.startswith("up_blocks.2.") for n in names) and "conv_out.weight" in names
    assert not any(n.startswith(("down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1")) for n in names)
    part = UNetHeadTail.from_pretrained(deep_model_dir, "u1")
    assert sorted(part.loaded_keys) == sorted(names) == sorted(part.state_dict())
    full = deep_unet.state_dict()
    assert all(torch.equal(v, full[k]) for k, v in part.state_dict().items())
    assert sum(p.numel() for p in part.parameters()) < 0.6 * sum(p.numel() for p in deep_unet.parameters())


def test_shallow_or_odd_unets_are_refused_naming_the_file(tiny_model_dir, deep_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    with pytest.raises(UnsupportedUNetError, match=r"unet/config\.json.*at least 3 down blocks"):
        UNetHeadTail.from_pretrained(tiny_model_dir, "u2")
    with pytest.raises(UnsupportedUNetError, match=r"unet/config\.json"):
        ClientModel(tiny_model_dir, "u2")
    with pytest.raises(ValueError, match="U-shaped"):
        split.UNetHead.from_unet(models.load_unet(tiny_model_dir), "u1")
    cfg = dict(DEEP_UNET, up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "AttnUpBlock2D"])
    with pytest.raises(UnsupportedUNetError, match=r"up_block_types\[2\]"):
        split.check_unet_config(cfg, "u1")
    split.check_unet_config(cfg, "conv_in")  # the server runs that block as a whole in the paper's splits
    # a tail tensor missing from the weights: named, with the file
    dst = tmp_path / "m"
    (dst / "unet").mkdir(parents=True)
    shutil.copy(deep_model_dir / "unet" / "config.json", dst / "unet" / "config.json")
    sd = load_file(deep_model_dir / "unet" / "diffusion_pytorch_model.safetensors")
    del sd["conv_out.weight"]
    save_file(sd, dst / "unet" / "diffusion_pytorch_model.safetensors")
    split.UNetHead.from_pretrained(dst, "conv_in")  # the paper's head does not need it
    with pytest.raises(models.ModelFolderError, match=r"diffusion_pytorch_model\.safetensors.*conv_out\.weight"):
        UNetHeadTail.from_pretrained(dst, "u1")


# ---------------------------------------------------------------------------------------------------
# Whole generations through a real loopback backend
# ---------------------------------------------------------------------------------------------------


def _pipeline_latent(model_dir, scheduler: str, steps: int, guidance: float) -> np.ndarray:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return reference(pipe, scheduler, steps=steps, guidance=guidance)[0]


def _params(**kw) -> GenerationParams:
    base = dict(prompt=PROMPT, negative_prompt=NEGATIVE, steps=4, guidance=7.5, seed=0, width=SIZE, height=SIZE)
    base.update(kw)
    return GenerationParams(**base)


@pytest.fixture(scope="module")
def deep_backend(deep_model_dir):
    from hediff.backend.engine import ServerModel

    running, info = start_backend(ServerModel(deep_model_dir, "deep-test", device="cpu", dtype="float32"))
    yield info
    running.stop()


def _generate(model_dir, backend, **kw):
    model = ClientModel(model_dir, kw["split"])
    updates = []
    with BackendClient(backend.url, backend.token) as client:
        result = Generator(model, client).generate(_params(**kw), on_step=updates.append)
    return result, updates


def test_u1_generation_matches_diffusers_and_sends_no_latent(tiny_model_dir, backend):
    ref = _pipeline_latent(tiny_model_dir, "plms", 4, 7.5)
    backend.recorded.clear()
    result, updates = _generate(tiny_model_dir, backend, split="u1", scheduler="plms")
    assert np.abs(result.latent - ref).max() <= 1e-4
    assert result.params.encryption == "none" and result.encrypted_fractions == [] and result.key_fingerprint is None
    assert all([item["name"] for item in u.sent] == ["h"] for u in updates)  # what the client reports as sent
    opens = [body for path, body in backend.recorded if path == "/v1/sessions"]
    steps = [body for path, body in backend.recorded if path.endswith("/steps")]
    assert len(opens) == 1 and len(steps) == len(result.step_timings) == 5  # PLMS: steps + 1 UNet calls
    opened = protocol.decode_frame(opens[0])
    assert opened.blobs == {} and opened.meta["encryption"] == "none" and opened.meta["he_preset"] is None
    for body in steps:
        frame = protocol.decode_frame(body)
        assert set(frame.tensors) == {"h"} and frame.blobs == {}  # no latent, no ciphertexts, no skip connection
        assert frame.tensors["h"].shape == (2, 32, 8, 8)  # down_blocks[0]'s output, both guidance branches


def test_u2_generation_matches_diffusers(deep_model_dir, deep_backend):
    ref = _pipeline_latent(deep_model_dir, "dpmpp-2m", 3, 7.5)
    result, _ = _generate(deep_model_dir, deep_backend, split="u2", scheduler="dpmpp-2m", steps=3)
    assert np.abs(result.latent - ref).max() <= 1e-4
    ref1 = _pipeline_latent(deep_model_dir, "ddim", 2, 1.0)  # no guidance: batch 1 everywhere
    result1, _ = _generate(deep_model_dir, deep_backend, split="u2", scheduler="ddim", steps=2, guidance=1.0)
    assert np.abs(result1.latent - ref1).max() <= 1e-4


def test_u3_generation_matches_diffusers_and_sends_only_the_mid_blocks_input(tiny_model_dir, backend):
    ref = _pipeline_latent(tiny_model_dir, "ddim", 3, 7.5)
    backend.recorded.clear()
    result, _ = _generate(tiny_model_dir, backend, split="u3", scheduler="ddim", steps=3)
    assert np.abs(result.latent - ref).max() <= 1e-4
    steps = [protocol.decode_frame(body) for path, body in backend.recorded if path.endswith("/steps")]
    assert len(steps) == 3
    for frame in steps:
        assert set(frame.tensors) == {"h"} and frame.blobs == {}
        assert frame.tensors["h"].shape == (2, 64, 8, 8)  # down_blocks[1]'s output: the tiny mid block's input


def test_u1_fp16_activations_both_ways(tiny_model_dir, backend):
    ref = _pipeline_latent(tiny_model_dir, "ddim", 2, 7.5)
    backend.recorded.clear()
    result, _ = _generate(tiny_model_dir, backend, split="u1", scheduler="ddim", steps=2, activation_dtype="float16")
    assert np.abs(result.latent - ref).max() < 2e-2
    steps = [protocol.decode_frame(body) for path, body in backend.recorded if path.endswith("/steps")]
    assert all(f.tensors["h"].dtype == np.float16 for f in steps)


def test_u_splits_refuse_partial_encryption_on_the_client():
    with pytest.raises(ValueError, match="only applies to the paper's splits"):
        _params(split="u1", encryption="random-mask").validate()
    with pytest.raises(ValueError, match="split must be one of"):
        _params(split="u9").validate()


def _open(http_backend, server_model, **meta):
    import httpx

    s = dict(scheduler="ddim", steps=2, guidance=7.5, height=SIZE, width=SIZE, split="u1", encryption="none")
    s.update(he_preset=None, activation_dtype="float32")
    s.update(meta)
    s["plan_digest"] = build_plan("ddim", server_model.scheduler_config, 2).digest()
    s["weights_digest"] = server_model.weights_digest
    emb = np.zeros((1, 77, server_model.cross_attention_dim), dtype=np.float32)
    frame = protocol.Frame(meta=s, tensors={"cond": emb, "uncond": emb})
    headers = {"Authorization": f"Bearer {http_backend.token}", "content-type": protocol.FRAME_CONTENT_TYPE}
    return httpx.post(http_backend.url + "/v1/sessions", content=frame.encode(), headers=headers, timeout=60)


def test_server_refuses_what_its_model_cannot_split_with_a_4xx(backend, server_model):
    with BackendClient(backend.url, backend.token) as client:
        caps = client.capabilities()
    assert "u1" in caps["splits"] and "u2" not in caps["splits"]
    assert "at least 3 down blocks" in caps["unsupported_splits"]["u2"]
    r = _open(backend, server_model, split="u2")
    assert r.status_code == 400 and "unet/config.json" in r.json()["detail"] and "u2" in r.json()["detail"]
    r = _open(backend, server_model, encryption="full", he_preset="fast")
    assert r.status_code == 400 and "'encryption' must be 'none'" in r.json()["detail"]
    assert _open(backend, server_model).status_code == 201


def test_client_gets_the_servers_reason(deep_model_dir, backend):
    """A deeper client model against a server whose UNet cannot run u2: a clear error, not a broken image."""
    with pytest.raises(BackendRejected, match=r"cannot run split 'u2'.*unet/config\.json"):
        _generate(deep_model_dir, backend, split="u2", scheduler="ddim", steps=2)


def test_server_checks_the_activation_shape(backend, server_model):
    import httpx

    opened = _open(backend, server_model).json()
    assert opened["activation_shapes"] == {"h": [2, 32, 8, 8]}
    headers = {"Authorization": f"Bearer {backend.token}", "content-type": protocol.FRAME_CONTENT_TYPE}
    bad = protocol.Frame(meta={"step": 0}, tensors={"h": np.zeros((2, 32, 4, 16), dtype=np.float32)})
    url = f"{backend.url}/v1/sessions/{opened['session_id']}/steps"
    r = httpx.post(url, content=bad.encode(), headers=headers, timeout=60)
    assert r.status_code == 400 and "'h'" in r.json()["detail"]
    # larger than any step of this session can be: refused from its size, before it is read
    big = protocol.Frame(meta={"step": 0}, tensors={"h": np.zeros((2, 32, 16, 16), dtype=np.float32)})
    r = httpx.post(url, content=big.encode(), headers=headers, timeout=60)
    assert r.status_code == 413 and r.json()["error"] == "payload_too_large"
    good = protocol.Frame(meta={"step": 0}, tensors={"h": np.zeros((2, 32, 8, 8), dtype=np.float32)})
    answer = protocol.decode_frame(httpx.post(url, content=good.encode(), headers=headers, timeout=60).content)
    assert set(answer.tensors) == {split.RETURN_NAME} and answer.blobs == {}
    assert answer.tensors[split.RETURN_NAME].shape == (2, 64, 16, 16)


def test_u_body_needs_the_latent_size(deep_unet):
    body = UNetBody.from_unet(deep_unet, "u1")
    h = torch.zeros(2, 32, 8, 8)
    with pytest.raises(ValueError, match="latent_size"):
        body({"h": h}, 1, torch.zeros(2, 77, 32))
    with pytest.raises(ValueError, match="spatial size"):
        body({"h": h}, 1, torch.zeros(2, 77, 32), latent_size=(32, 32))


def test_params_form_offers_the_new_choices(qtbot):
    from hediff.desktop.ui.params_form import ParamsForm

    form = ParamsForm()
    qtbot.addWidget(form)
    splits = [form.split_combo.itemText(i) for i in range(form.split_combo.count())]
    modes = [form.encryption_combo.itemData(i) for i in range(form.encryption_combo.count())]
    assert splits == list(split.SPLIT_POINTS) and "random-mask" in modes
    form.prompt_edit.setPlainText("a cat")
    form.load_dict({"encryption": "random-mask", "mask_fraction": 0.5, "split": "conv_in"})
    assert form.fraction_spin.isEnabled() and not form.tau_spin.isEnabled()
    p = form.params()
    assert (p.encryption, p.mask_fraction, p.split) == ("random-mask", 0.5, "conv_in")
    p.validate()
    form.split_combo.setCurrentText("u1")  # the latent stays here: nothing to choose about encryption
    assert not form.encryption_combo.isEnabled() and not form.fraction_spin.isEnabled()
    p = form.params()
    assert (p.encryption, p.split) == ("none", "u1")
    p.validate()
