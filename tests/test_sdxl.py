"""SDXL (two text encoders; the pooled text embedding and six time ids as added conditioning) through the
encrypted split and a real loopback backend, checked against diffusers' StableDiffusionXLPipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from hediff.backend.engine import ServerModel
from hediff.common import protocol
from hediff.common.schedulers import make_scheduler
from hediff.common.split import UnsupportedUNetError, check_unet_config
from hediff.desktop.core.backend_client import BackendClient
from hediff.desktop.core.client_model import ClientModel
from hediff.desktop.core.engine import Generator
from tests.conftest import start_backend
from tests.test_e2e import NEGATIVE, PROMPT, SIZE, params

STEPS = 4


@pytest.fixture(scope="module")
def xl_pipe(tiny_sdxl_model_dir):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def xl_served(tiny_sdxl_model_dir):
    server = ServerModel(tiny_sdxl_model_dir, "tiny-sdxl", device="cpu", dtype="float32")
    running, info = start_backend(server)
    yield server, info
    running.stop()


_refs: dict = {}


def reference(pipe, scheduler: str, seed: int, negative: str | None = NEGATIVE, count: int = 1) -> np.ndarray:
    """diffusers' SDXL pipeline: the final latent(s) before VAE scaling."""
    key = (scheduler, seed, negative, count)
    if key not in _refs:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
        latents = pipe(
            prompt=PROMPT,
            negative_prompt=negative,
            num_inference_steps=STEPS,
            guidance_scale=7.5,
            height=SIZE,
            width=SIZE,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="latent",
        ).images
        _refs[key] = latents[0].double().numpy()
    return _refs[key]


_clients: dict = {}


def _generate(model_dir, backend, **kw):
    if kw["split"] not in _clients:
        _clients[kw["split"]] = ClientModel(model_dir, kw["split"])
    with BackendClient(backend.url, backend.token) as client:
        return Generator(_clients[kw["split"]], client).generate(params(steps=STEPS, **kw))


def test_the_tiny_sdxl_model_has_sdxls_features(xl_pipe, xl_served):
    server = xl_served[0]
    unet = xl_pipe.unet.config
    assert unet.addition_embed_type == "text_time" and unet.cross_attention_dim == 64
    assert list(unet.transformer_layers_per_block) == [1, 2] and unet.use_linear_projection
    assert type(xl_pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert xl_pipe.vae.config.scaling_factor == 0.13025
    assert server.pooled_dim == 32 and "down0.resnet0" in server.unsupported
    assert set(server.splits) >= {"conv_in", "u1"}


@pytest.mark.parametrize(
    ("split", "scheduler", "encryption"),
    [
        ("conv_in", "euler", "full"),  # SDXL's own scheduler
        ("conv_in", "euler", "none"),
        ("conv_in", "dpmpp-2m", "min-distortion"),
        ("conv_in", "euler-a", "full"),
        ("u1", "ddim", "none"),  # the client's time embedding carries the added conditioning too
        ("u1", "dpmpp-2m-sde", "none"),
    ],
)
def test_sdxl_matches_diffusers_through_the_split(
    xl_pipe, tiny_sdxl_model_dir, xl_served, split, scheduler, encryption
):
    ref = reference(xl_pipe, scheduler, seed=1)
    result = _generate(
        tiny_sdxl_model_dir, xl_served[1], split=split, scheduler=scheduler, encryption=encryption, tau=0.1, seed=1
    )
    diff = np.abs(result.latent - ref).max()
    assert diff <= 1e-3, f"{split}/{scheduler}/{encryption}: max abs latent difference {diff:.2e}"


def test_the_pooled_embeddings_travel_at_session_open_and_an_empty_negative_is_zeros(
    xl_pipe, tiny_sdxl_model_dir, xl_served
):
    """No negative prompt: the pipeline's zeros (force_zeros_for_empty_prompt), in both the embeddings and the
    pooled embedding; the session header carries both pooled embeddings, the steps carry nothing new."""
    backend = xl_served[1]
    backend.recorded.clear()
    result = _generate(tiny_sdxl_model_dir, backend, split="conv_in", scheduler="euler", seed=2, negative_prompt="")
    assert np.abs(result.latent - reference(xl_pipe, "euler", seed=2, negative=None)).max() <= 1e-3
    opened = [protocol.decode_frame(b) for p, b in backend.recorded if p.endswith("/sessions")]
    assert set(opened[0].tensors) == {"cond", "uncond", "cond_pooled", "uncond_pooled"}
    assert opened[0].tensors["cond_pooled"].shape == (1, 32) and not opened[0].tensors["uncond_pooled"].any()
    steps = [protocol.decode_frame(b) for p, b in backend.recorded if p.endswith("/steps")]
    assert all(set(f.tensors) == {"h"} for f in steps)


def test_an_sdxl_batch(xl_pipe, tiny_sdxl_model_dir, xl_served):
    result = _generate(tiny_sdxl_model_dir, xl_served[1], split="conv_in", scheduler="euler", seed=5, count=2)
    for k in range(2):
        assert np.abs(result.latent[k] - reference(xl_pipe, "euler", seed=5 + k)).max() <= 1e-3


def test_on_device_sdxl_is_diffusers_sdxl(xl_pipe, tiny_sdxl_model_dir):
    from hediff.desktop.core.on_device import OnDeviceGenerator

    result = OnDeviceGenerator(tiny_sdxl_model_dir).generate(params(scheduler="euler-a", steps=STEPS, seed=3))
    assert np.abs(result.latent - reference(xl_pipe, "euler-a", seed=3)).max() <= 1e-5
    assert result.image.size == (SIZE, SIZE)


def test_what_sdxl_does_not_do_yet_is_named(tiny_sdxl_model_dir, xl_served, tmp_path):
    with pytest.raises(UnsupportedUNetError, match="'text_time' \\(SDXL\\) with split 'down0.resnet0'"):
        check_unet_config(xl_served[0].unet.config, "down0.resnet0")


@pytest.mark.parametrize(("split", "encryption"), [("conv_in", "full"), ("conv_in", "none"), ("u1", "none")])
def test_sdxl_img2img_matches_diffusers(tiny_sdxl_model_dir, xl_served, tmp_path, split, encryption):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    from tests.test_img2img import _picture

    path = tmp_path / "init.png"
    _picture().save(path)
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(tiny_sdxl_model_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler("euler-a", pipe.scheduler.config)
    ref = (
        pipe(
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            image=_picture(),
            strength=0.6,
            num_inference_steps=STEPS,
            guidance_scale=7.5,
            generator=torch.Generator("cpu").manual_seed(6),
            output_type="latent",
        )
        .images[0]
        .double()
        .numpy()
    )
    result = _generate(
        tiny_sdxl_model_dir,
        xl_served[1],
        split=split,
        scheduler="euler-a",
        encryption=encryption,
        seed=6,
        init_image=str(path),
        strength=0.6,
        width=0,
        height=0,
    )
    assert np.abs(result.latent - ref).max() <= 1e-3


def test_on_device_sdxl_img2img(tiny_sdxl_model_dir, tmp_path):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    from hediff.desktop.core.on_device import OnDeviceGenerator
    from tests.test_img2img import _picture

    path = tmp_path / "init.png"
    _picture().save(path)
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(tiny_sdxl_model_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler("ddim", pipe.scheduler.config)
    ref = (
        pipe(
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            image=_picture(),
            strength=0.5,
            num_inference_steps=STEPS,
            guidance_scale=7.5,
            generator=torch.Generator("cpu").manual_seed(1),
            output_type="latent",
        )
        .images[0]
        .double()
        .numpy()
    )
    result = OnDeviceGenerator(tiny_sdxl_model_dir).generate(
        params(scheduler="ddim", steps=STEPS, seed=1, init_image=str(path), strength=0.5, width=0, height=0)
    )
    assert np.abs(result.latent - ref).max() <= 1e-5


@pytest.fixture(scope="module")
def xl_lora(tiny_sdxl_model_dir, tmp_path_factory) -> str:
    """A random SDXL LoRA on the UNet's attention and both text encoders, saved by diffusers, at scale 0.7."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model_dir)
    torch.manual_seed(4)
    unet_targets = ["to_q", "to_k", "to_v", "to_out.0"]
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=unet_targets))
    text_targets = ["q_proj", "k_proj", "v_proj", "out_proj"]
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        encoder.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=text_targets))
    out = tmp_path_factory.mktemp("xl-lora") / "lora"
    StableDiffusionXLPipeline.save_lora_weights(
        out,
        unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        text_encoder_2_lora_layers=get_peft_model_state_dict(pipe.text_encoder_2),
    )
    return f"{out}:0.7"


@pytest.fixture(scope="module")
def xl_lora_backend(tiny_sdxl_model_dir, xl_lora):
    server = ServerModel(tiny_sdxl_model_dir, "tiny-sdxl-lora", device="cpu", dtype="float32", lora=(xl_lora,))
    running, info = start_backend(server)
    yield info
    running.stop()


def _lora_reference(model_dir, lora: str, scheduler: str, seed: int) -> np.ndarray:
    from hediff.common.lora import parse_lora

    path, scale = parse_lora(lora)
    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(path, adapter_name="l0")
    pipe.set_adapters(["l0"], adapter_weights=[scale])
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    latents = pipe(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        height=SIZE,
        width=SIZE,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="latent",
    ).images
    return latents[0].double().numpy()


@pytest.mark.parametrize(("split", "encryption"), [("conv_in", "full"), ("conv_in", "none"), ("u1", "none")])
def test_an_sdxl_lora_matches_diffusers(xl_pipe, tiny_sdxl_model_dir, xl_lora, xl_lora_backend, split, encryption):
    ref = _lora_reference(tiny_sdxl_model_dir, xl_lora, "euler", seed=2)
    with BackendClient(xl_lora_backend.url, xl_lora_backend.token) as client:
        result = Generator(ClientModel(tiny_sdxl_model_dir, split, lora=(xl_lora,)), client).generate(
            params(scheduler="euler", steps=STEPS, seed=2, split=split, encryption=encryption, lora=(xl_lora,))
        )
    assert np.abs(result.latent - ref).max() <= 1e-3
    assert np.abs(result.latent - reference(xl_pipe, "euler", seed=2)).max() > 0.05  # the LoRA changed it


def test_on_device_sdxl_lora(tiny_sdxl_model_dir, xl_lora):
    from hediff.desktop.core.on_device import OnDeviceGenerator

    result = OnDeviceGenerator(tiny_sdxl_model_dir, lora=(xl_lora,)).generate(
        params(scheduler="euler", steps=STEPS, seed=2, lora=(xl_lora,))
    )
    assert np.abs(result.latent - _lora_reference(tiny_sdxl_model_dir, xl_lora, "euler", seed=2)).max() <= 1e-5
