"""UNet head/body split (common.split): exact parity with the full diffusers UNet, partial loading."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from hediff.common import models, split
from hediff.common.split import (
    PAPER_SPLITS,
    SPLIT_POINTS,
    UNetBody,
    UNetHead,
    UnsupportedUNetError,
    activation_names,
    check_unet_config,
    head_parameter_names,
    split_unet,
)

# Extra small UNet configs beyond the tiny model's (CrossAttn first, layers_per_block 1).
_BASE = {
    "in_channels": 4,
    "out_channels": 4,
    "cross_attention_dim": 32,
    "attention_head_dim": 2,
    "norm_num_groups": 8,
}
UNET_CONFIGS = {
    # two layers per block, attention in down block 0 (and in every block)
    "lpb2-attn-first": dict(
        _BASE,
        sample_size=8,
        block_out_channels=(16, 32),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ),
    # first down block without attention
    "lpb2-downblock-first": dict(
        _BASE,
        sample_size=8,
        block_out_channels=(16, 32),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    ),
    # less common settings that the forward pass has to honour
    "exotic": dict(
        _BASE,
        sample_size=8,
        block_out_channels=(16, 16, 32),
        layers_per_block=(1, 2, 1),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"),
        center_input_sample=True,
        time_embedding_act_fn="silu",
        timestep_post_act="silu",
        resnet_time_scale_shift="scale_shift",
        use_linear_projection=True,
        mid_block_type=None,
        flip_sin_to_cos=False,
        freq_shift=1,
    ),
    # Fourier time embedding (a time_proj with weights, which the head must load), cross-only attention
    "fourier": dict(
        _BASE,
        sample_size=8,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        time_embedding_type="fourier",
        only_cross_attention=True,
        upcast_attention=True,
    ),
}

TIMESTEPS = [999, 1, 0, torch.tensor(501), torch.tensor(250.0), torch.tensor([981]), 37.5]


def _ids(ts):
    return [f"{type(t).__name__}-{t.tolist() if torch.is_tensor(t) else t}" for t in ts]


@pytest.fixture(scope="module")
def tiny_unet(tiny_model_dir: Path):
    return models.load_unet(tiny_model_dir)


def _make_unet(config: dict, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**config).eval()


@pytest.fixture(scope="module", params=sorted(UNET_CONFIGS))
def config_unet(request):
    return request.param, _make_unet(UNET_CONFIGS[request.param])


def _inputs(unet, height: int, width: int, batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, unet.config.in_channels, height, width, generator=g)
    ehs = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)
    return x, ehs


def _assert_exact_parity(unet, sp: str, x, ehs, timesteps):
    """head + body on the full guidance batch == unet(...), bit for bit."""
    head, body = split_unet(unet, sp)
    batch = ehs.shape[0]
    xb = torch.cat([x] * batch)
    with torch.no_grad():
        for t in timesteps:
            full = unet(xb, t, encoder_hidden_states=ehs).sample
            acts = head(xb, t)
            assert tuple(acts) == activation_names(sp)
            out = body(acts, t, ehs)
            assert out.shape == full.shape
            assert torch.equal(out, full), f"split {sp} t={t}: max diff {(out - full).abs().max().item()}"


@pytest.mark.parametrize("sp", PAPER_SPLITS)
def test_tiny_model_parity_exact(tiny_unet, sp):
    x, ehs = _inputs(tiny_unet, 16, 16)
    _assert_exact_parity(tiny_unet, sp, x, ehs, TIMESTEPS)
    # a latent size that is not a multiple of 2**num_upsamplers exercises forward_upsample_size
    x, ehs = _inputs(tiny_unet, 15, 9)
    _assert_exact_parity(tiny_unet, sp, x, ehs, [torch.tensor(400)])


@pytest.mark.parametrize("sp", PAPER_SPLITS)
def test_other_configs_parity_exact(config_unet, sp):
    _name, unet = config_unet
    x, ehs = _inputs(unet, 8, 8)
    _assert_exact_parity(unet, sp, x, ehs, [999, torch.tensor(500), 0])
    x, ehs = _inputs(unet, 7, 10)
    _assert_exact_parity(unet, sp, x, ehs, [torch.tensor(400)])


@pytest.mark.parametrize("sp", PAPER_SPLITS)
def test_batch1_head_expanded_by_body(tiny_unet, sp):
    """Production path: head on the (1, 4, h, w) latent, body expands to the CFG batch of 2.

    On CPU, oneDNN convolutions / MKL GEMMs may round differently for batch 1 and batch 2, so this is
    only ~1e-6 close to the batch-2 full UNet (bit-exactness is checked with matched batches above).
    Without guidance (batch 1 everywhere) it is exact.
    """
    head, body = split_unet(tiny_unet, sp)
    x, ehs = _inputs(tiny_unet, 16, 16)
    with torch.no_grad():
        for t in (torch.tensor(801), 3):
            acts = head(x, t)
            assert all(a.shape[0] == 1 for a in acts.values())
            out = body(acts, t, ehs)
            full = tiny_unet(torch.cat([x, x]), t, encoder_hidden_states=ehs).sample
            assert out.shape == (2, 4, 16, 16)
            torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-5)
            # batch 1 everywhere: exact
            full1 = tiny_unet(x, t, encoder_hidden_states=ehs[1:]).sample
            assert torch.equal(body(acts, t, ehs[1:]), full1)


def test_noise_predictions_are_not_degenerate(tiny_unet):
    x, ehs = _inputs(tiny_unet, 16, 16)
    with torch.no_grad():
        eps = tiny_unet(torch.cat([x, x]), torch.tensor(500), encoder_hidden_states=ehs).sample
    assert 0.05 < eps.std().item() < 2.0
    assert (eps[0] - eps[1]).abs().max() > 1e-3  # the prompt embedding matters


@pytest.mark.parametrize("sp", PAPER_SPLITS)
def test_split_denoising_loop_matches_pipeline(tiny_model_dir, tiny_unet, sp):
    """A CFG denoising loop with head + body reproduces StableDiffusionPipeline's latents exactly."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from diffusers.utils.torch_utils import randn_tensor

    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_model_dir, safety_checker=None, requires_safety_checker=False, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    prompt, negative, steps, scale = "a red circle", "blurry", 2, 7.5
    ref = pipe(
        prompt,
        negative_prompt=negative,
        num_inference_steps=steps,
        guidance_scale=scale,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).images

    tok, te = models.load_tokenizer(tiny_model_dir), models.load_text_encoder(tiny_model_dir)
    cond, uncond = models.encode_prompt(tok, te, prompt, negative)
    ehs = torch.cat([uncond, cond])  # the pipeline's order: negative first
    head, body = split_unet(tiny_unet, sp)
    sched = PNDMScheduler.from_config(models.load_scheduler_config(tiny_model_dir))
    sched.set_timesteps(steps)
    latents = randn_tensor((1, 4, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    latents = latents * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([latents] * 2), t)
            eps_uncond, eps_cond = body(head(inp, t), t, ehs).chunk(2)
            eps = eps_uncond + scale * (eps_cond - eps_uncond)
            latents = sched.step(eps, t, latents, return_dict=False)[0]
    assert torch.equal(latents, ref)


# ---------------------------------------------------------------------------------------------------
# Partial loading
# ---------------------------------------------------------------------------------------------------


class _RecordingSafeOpen:
    """Wraps safetensors.safe_open and records every tensor name read."""

    def __init__(self, real):
        self.real = real
        self.requested: list[str] = []

    def __call__(self, *args, **kwargs):
        recorder = self

        class _Handle:
            def __init__(self, handle):
                self._h = handle

            def __enter__(self):
                self._inner = self._h.__enter__()
                return self

            def __exit__(self, *exc):
                return self._h.__exit__(*exc)

            def keys(self):
                return self._inner.keys()

            def get_tensor(self, name):
                recorder.requested.append(name)
                return self._inner.get_tensor(name)

            def get_slice(self, name):  # pragma: no cover - not used by the head loader
                recorder.requested.append(name)
                return self._inner.get_slice(name)

        return _Handle(self.real(*args, **kwargs))


@pytest.mark.parametrize("sp", PAPER_SPLITS)
def test_head_from_pretrained_reads_only_head_tensors(tiny_model_dir, tiny_unet, sp, monkeypatch):
    import safetensors

    recorder = _RecordingSafeOpen(safetensors.safe_open)
    monkeypatch.setattr(safetensors, "safe_open", recorder)
    head = UNetHead.from_pretrained(tiny_model_dir, sp)

    names = head_parameter_names(models.load_unet_config(tiny_model_dir), sp)
    assert sorted(recorder.requested) == sorted(names)
    assert head.loaded_keys is not None and sorted(head.loaded_keys) == sorted(names)
    assert set(head.state_dict()) == set(names)
    # the head's keys are the UNet's keys, with the same values
    full_sd = tiny_unet.state_dict()
    for k, v in head.state_dict().items():
        assert torch.equal(v, full_sd[k]), k
    n_head = sum(p.numel() for p in head.parameters())
    assert n_head == sum(full_sd[k].numel() for k in names)
    assert n_head < 0.1 * sum(p.numel() for p in tiny_unet.parameters())
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in head.parameters())

    ref = UNetHead.from_unet(tiny_unet, sp)
    x, _ = _inputs(tiny_unet, 16, 16)
    with torch.no_grad():
        for t in (torch.tensor(999), 10):
            a, b = head(x, t), ref(x, t)
            assert a.keys() == b.keys()
            assert all(torch.equal(a[k], b[k]) for k in a)


def test_head_parameter_names(tiny_model_dir):
    cfg = models.load_unet_config(tiny_model_dir)
    assert head_parameter_names(cfg, "conv_in") == ["conv_in.weight", "conv_in.bias"]
    names = head_parameter_names(cfg, "down0.resnet0")
    assert names[:2] == ["conv_in.weight", "conv_in.bias"]
    assert "time_embedding.linear_1.weight" in names
    assert "down_blocks.0.resnets.0.conv1.weight" in names
    assert not any(n.startswith(("down_blocks.0.attentions", "down_blocks.1", "mid_block", "up_blocks")) for n in names)


def test_sd15_head_parameter_names_on_meta():
    """SD 1.5 head keys come from a meta-device UNet: no weights, fast."""
    names = head_parameter_names(models.SD15_UNET_CONFIG, "down0.resnet0")
    assert len(names) == 16
    assert "down_blocks.0.resnets.0.time_emb_proj.weight" in names
    shapes = split.activation_shapes(models.SD15_UNET_CONFIG, "down0.resnet0", (1, 4, 64, 64))
    assert shapes == {"skip0": (1, 320, 64, 64), "h": (1, 320, 64, 64)}


def test_head_from_pretrained_dtype(tiny_model_dir):
    head = UNetHead.from_pretrained(tiny_model_dir, "down0.resnet0", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in head.parameters())
    acts = head(torch.zeros(1, 4, 8, 8), 5)
    assert acts["h"].dtype == torch.bfloat16


def _copy_unet_dir(src: Path, dst: Path) -> Path:
    (dst / "unet").mkdir(parents=True)
    shutil.copy(src / "unet" / "config.json", dst / "unet" / "config.json")
    return dst


def test_head_from_pretrained_missing_tensor(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    dst = _copy_unet_dir(tiny_model_dir, tmp_path / "m")
    sd = load_file(tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors")
    del sd["down_blocks.0.resnets.0.conv2.weight"]
    save_file(sd, dst / "unet" / "diffusion_pytorch_model.safetensors")
    UNetHead.from_pretrained(dst, "conv_in")  # does not need that tensor
    with pytest.raises(models.ModelFolderError, match=r"down_blocks\.0\.resnets\.0\.conv2\.weight"):
        UNetHead.from_pretrained(dst, "down0.resnet0")


def test_head_from_pretrained_shape_mismatch(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    dst = _copy_unet_dir(tiny_model_dir, tmp_path / "m")
    sd = load_file(tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors")
    sd["conv_in.bias"] = torch.zeros(7)
    save_file(sd, dst / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(models.ModelFolderError, match=r"conv_in\.bias.*shape"):
        UNetHead.from_pretrained(dst, "conv_in")


def test_head_from_pretrained_sharded(tiny_model_dir, tmp_path):
    """Sharded weights (index + several files) are read shard by shard."""
    import json

    from safetensors.torch import load_file, save_file

    dst = _copy_unet_dir(tiny_model_dir, tmp_path / "m")
    sd = load_file(tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors")
    keys = sorted(sd)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[::2]}
    shards["diffusion_pytorch_model-00002-of-00002.safetensors"] = keys[1::2]
    weight_map = {}
    for fname, ks in shards.items():
        save_file({k: sd[k] for k in ks}, dst / "unet" / fname)
        weight_map.update({k: fname for k in ks})
    (dst / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    head = UNetHead.from_pretrained(dst, "down0.resnet0")
    for k, v in head.state_dict().items():
        assert torch.equal(v, sd[k])


# ---------------------------------------------------------------------------------------------------
# API checks
# ---------------------------------------------------------------------------------------------------


def test_activation_names_and_shapes(tiny_unet):
    assert SPLIT_POINTS == ("conv_in", "down0.resnet0", "u1", "u2", "u3")
    assert PAPER_SPLITS == ("conv_in", "down0.resnet0")
    assert split.DEFAULT_SPLIT == "conv_in"
    assert activation_names("conv_in") == ("h",)
    assert activation_names("down0.resnet0") == ("skip0", "h")
    with pytest.raises(ValueError, match="Unknown split point"):
        activation_names("mid")
    for sp in PAPER_SPLITS:
        head = UNetHead.from_unet(tiny_unet, sp)
        x = torch.zeros(1, 4, 12, 10)
        acts = head(x, 3)
        expected = head.activation_shapes(tuple(x.shape))
        assert {k: tuple(v.shape) for k, v in acts.items()} == expected
        assert UNetBody.from_unet(tiny_unet, sp).activation_shapes((1, 4, 12, 10)) == expected


def test_modules_are_shared(tiny_unet):
    head, body = split_unet(tiny_unet, "down0.resnet0")
    assert head.conv_in is tiny_unet.conv_in
    assert head.down_blocks[0].resnets[0] is tiny_unet.down_blocks[0].resnets[0]
    assert body.up_blocks is tiny_unet.up_blocks


def test_body_validates_activations(tiny_unet):
    body = UNetBody.from_unet(tiny_unet, "down0.resnet0")
    ehs = torch.zeros(2, 77, 32)
    h = torch.zeros(1, 32, 16, 16)
    with pytest.raises(ValueError, match="skip0"):
        body({"h": h}, 1, ehs)
    with pytest.raises(ValueError, match="channels"):
        body({"h": h, "skip0": torch.zeros(1, 31, 16, 16)}, 1, ehs)
    with pytest.raises(ValueError, match="batch"):
        body({"h": h, "skip0": torch.zeros(3, 32, 16, 16)}, 1, ehs)
    with pytest.raises(ValueError, match="spatial"):
        body({"h": h, "skip0": torch.zeros(1, 32, 8, 16)}, 1, ehs)
    with pytest.raises(ValueError, match="timestep"):
        UNetHead.from_unet(tiny_unet, "down0.resnet0")(torch.zeros(1, 4, 16, 16))


@pytest.mark.parametrize(
    ("extra", "setting"),
    [
        ({"class_embed_type": "timestep"}, "class_embed_type"),
        ({"num_class_embeds": 10}, "num_class_embeds"),
        ({"addition_embed_type": "text"}, "addition_embed_type"),
        ({"encoder_hid_dim": 16, "encoder_hid_dim_type": "text_proj"}, "encoder_hid_dim_type"),
        ({"time_cond_proj_dim": 8}, "time_cond_proj_dim"),
        ({"conv_in_kernel": 4}, "conv_in_kernel"),
    ],
)
def test_unsupported_configs(extra, setting):
    cfg = dict(UNET_CONFIGS["lpb2-attn-first"], **extra)
    for sp in SPLIT_POINTS:
        with pytest.raises(UnsupportedUNetError, match=setting):
            check_unet_config(cfg, sp)


def test_unsupported_first_block_for_down0_resnet0():
    cfg = dict(UNET_CONFIGS["lpb2-attn-first"], down_block_types=("AttnDownBlock2D", "CrossAttnDownBlock2D"))
    check_unet_config(cfg, "conv_in")  # fine: the body runs down_blocks[0] as a whole
    with pytest.raises(UnsupportedUNetError, match=r"down_block_types\[0\]"):
        check_unet_config(cfg, "down0.resnet0")
    assert issubclass(UnsupportedUNetError, ValueError)


def test_unsupported_unet_module():
    unet = _make_unet(dict(UNET_CONFIGS["lpb2-attn-first"], time_cond_proj_dim=8))
    with pytest.raises(UnsupportedUNetError, match="time_cond_proj_dim"):
        UNetHead.from_unet(unet, "conv_in")
    with pytest.raises(UnsupportedUNetError, match="time_cond_proj_dim"):
        UNetBody.from_unet(unet, "conv_in")
    with pytest.raises(UnsupportedUNetError, match="UNet2DConditionModel"):
        UNetHead.from_unet(torch.nn.Conv2d(4, 4, 3), "conv_in")


# ---------------------------------------------------------------------------------------------------
# Real SD 1.5 architecture (random weights)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sd15_unet_parity_random_weights():
    """SD 1.5 UNet (860M params, random weights; ~3.5 GB RAM, ~1 min on 2 cores): head + body == full."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(models.SD15_UNET_CONFIG).eval()
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 64, 64, generator=g)
    ehs = torch.randn(1, 77, 768, generator=g)
    t = torch.tensor(501)
    with torch.no_grad():
        full = unet(x, t, encoder_hidden_states=ehs).sample
        assert full.shape == (1, 4, 64, 64)
        for sp in PAPER_SPLITS:
            head, body = split_unet(unet, sp)
            out = body(head(x, t), t, ehs)
            assert torch.equal(out, full), f"{sp}: max diff {(out - full).abs().max().item()}"
        for sp in split.U_SPLITS:  # U-shaped: client head, server middle, client tail
            client, body = split_unet(unet, sp)
            sent, kept = client.head(x, t, ehs)
            out = client.tail(body(sent, t, ehs, latent_size=(64, 64)), kept, ehs)
            assert torch.equal(out, full), f"{sp}: max diff {(out - full).abs().max().item()}"


def test_split_family_says_which_side_keeps_the_latent():
    assert [split.split_family(name) for name in split.PAPER_SPLITS] == [split.PAPER_FAMILY] * len(split.PAPER_SPLITS)
    assert {split.split_family(name) for name in split.U_SPLITS} == {split.U_SHAPED_FAMILY}
    with pytest.raises(ValueError, match="Unknown split point 'down1'; choose one of conv_in"):
        split.split_family("down1")


def test_mix_guidance_weights_the_conditional_branch_and_keeps_a_lone_one():
    uncond = torch.full((1, 4, 2, 3), 1.0)
    cond = torch.full((1, 4, 2, 3), 3.0)
    mixed = split.mix_guidance(torch.cat([uncond, cond]), 2.5)  # negative first, as diffusers' pipeline
    assert mixed.dtype == "float64" and mixed.shape == (4, 2, 3)
    assert (mixed == 1.0 + 2.5 * (3.0 - 1.0)).all()
    alone = split.mix_guidance(cond, 2.5)  # guidance <= 1 runs the conditional branch only
    assert (alone == 3.0).all() and alone.shape == (4, 2, 3)
