"""img2img through the encrypted split and a real loopback backend, checked against diffusers' own
StableDiffusionImg2ImgPipeline with the same seed: the client encodes the picture with the VAE, noises it to the
start timestep (drawing from the seed's generator in the pipeline's order) and the shortened plan runs from there."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline
from PIL import Image

from hediff.common import protocol
from hediff.common.img2img import InitImageError
from hediff.common.schedulers import build_plan, make_scheduler
from hediff.common.settings import SettingsError
from tests.test_e2e import NEGATIVE, PROMPT, params

STEPS = 5


def _picture(size: tuple[int, int] = (32, 32)) -> Image.Image:
    """A picture with structure (a gradient and a disc), so the encoded latent is far from noise."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 255 / w, yy * 255 / h, 128 + 0 * xx], axis=-1)
    rgb[(xx - w / 3) ** 2 + (yy - h / 3) ** 2 < (min(w, h) / 5) ** 2] = (250, 20, 20)
    return Image.fromarray(rgb.astype(np.uint8))


@pytest.fixture(scope="module")
def init_png(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("img2img") / "init.png"
    _picture().save(path)
    return str(path)


@pytest.fixture(scope="module")
def img2img_pipe(tiny_model_dir):
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
        tiny_model_dir, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


_refs: dict = {}


def reference(pipe, scheduler: str, strength: float, seed: int, image: Image.Image | None = None) -> np.ndarray:
    """diffusers' img2img pipeline: the final latent (before VAE scaling)."""
    key = (pipe.config._name_or_path, scheduler, strength, seed, image is None)
    if key not in _refs:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
        out = pipe(
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            image=_picture() if image is None else image,
            strength=strength,
            num_inference_steps=STEPS,
            guidance_scale=7.5,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="latent",
        )
        _refs[key] = out.images[0].double().numpy()
    return _refs[key]


@pytest.mark.parametrize("encryption", ["full", "none"])
@pytest.mark.parametrize(("scheduler", "strength"), [("ddim", 0.6), ("euler-a", 0.8), ("dpmpp-2m", 0.5)])
def test_img2img_matches_diffusers(img2img_pipe, generator, backend, init_png, scheduler, strength, encryption):
    ref = reference(img2img_pipe, scheduler, strength, seed=4)
    backend.recorded.clear()
    result = generator.generate(
        params(scheduler=scheduler, steps=STEPS, seed=4, init_image=init_png, strength=strength, encryption=encryption)
    )
    diff = np.abs(result.latent - ref).max()
    assert diff <= 1e-3, f"{scheduler}/{strength}/{encryption}: max abs latent difference {diff:.2e}"
    # the pipeline runs int(steps x strength) of the steps: so many UNet evaluations reached the server
    assert len(result.step_timings) == int(STEPS * strength)
    assert len([p for p, _ in backend.recorded if p.endswith("/steps")]) == int(STEPS * strength)
    # the session header carries the strength, never the picture
    opened = [protocol.decode_frame(b) for p, b in backend.recorded if p.endswith("/sessions")]
    assert [f.meta["strength"] for f in opened] == [strength]
    assert set(opened[0].tensors) == {"cond", "uncond"}


def test_img2img_through_the_u_shaped_split_and_the_pictures_own_size(img2img_pipe, tiny_model_dir, backend, tmp_path):
    from hediff.desktop.core.backend_client import BackendClient
    from hediff.desktop.core.client_model import ClientModel
    from hediff.desktop.core.engine import Generator

    wide = _picture((48, 32))
    path = tmp_path / "wide.png"
    wide.save(path)
    ref = reference(img2img_pipe, "unipc", 0.7, seed=2, image=wide)
    with BackendClient(backend.url, backend.token) as client:
        result = Generator(ClientModel(tiny_model_dir, "u1"), client).generate(
            params(
                scheduler="unipc",
                steps=STEPS,
                seed=2,
                split="u1",
                init_image=str(path),
                strength=0.7,
                width=0,
                height=0,
            )
        )
    assert result.latent.shape == ref.shape == (4, 16, 24)  # the tiny VAE halves each side
    assert (result.params.width, result.params.height) == (48, 32)
    assert np.abs(result.latent - ref).max() <= 1e-3


def test_strength_one_still_starts_from_the_picture(img2img_pipe, generator, init_png):
    """At strength 1 every step runs but x_0 is still the noised picture (not fresh noise), as in diffusers."""
    ref = reference(img2img_pipe, "ddim", 1.0, seed=0)
    result = generator.generate(params(scheduler="ddim", steps=STEPS, seed=0, init_image=init_png, strength=1.0))
    assert np.abs(result.latent - ref).max() <= 1e-3
    assert len(build_plan("ddim", img2img_pipe.scheduler.config, STEPS, 1.0).steps) == STEPS


def test_img2img_mistakes_are_named(generator, init_png, tmp_path):
    with pytest.raises(SettingsError, match=r"strength must be at least 1/steps \(0.2\)"):
        generator.generate(params(steps=STEPS, init_image=init_png, strength=0.1))
    with pytest.raises(InitImageError, match="does not exist"):
        generator.generate(params(steps=STEPS, init_image=str(tmp_path / "missing.png")))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a picture")
    with pytest.raises(InitImageError, match="is not a readable picture"):
        generator.generate(params(steps=STEPS, init_image=str(bad)))


def test_a_server_refuses_a_strength_that_runs_no_step(server_model):
    with pytest.raises(protocol.ProtocolError, match="runs no step"):
        server_model.plan("ddim", 4, 0.1)


def test_on_device_img2img_is_diffusers_img2img(img2img_pipe, tiny_model_dir, init_png):
    from hediff.desktop.core.on_device import OnDeviceGenerator

    steps = []
    result = OnDeviceGenerator(tiny_model_dir).generate(
        params(scheduler="euler-a", steps=STEPS, seed=4, init_image=init_png, strength=0.8, width=0, height=0),
        on_step=steps.append,
    )
    assert np.abs(result.latent - reference(img2img_pipe, "euler-a", 0.8, seed=4)).max() <= 1e-5
    assert [s.total for s in steps] == [int(STEPS * 0.8)] * int(STEPS * 0.8)
    assert (result.params.width, result.params.height, result.params.init_image) == (32, 32, init_png)


def test_the_cli_and_api_take_the_init_image(tiny_model_dir, init_png, tmp_path):
    from hediff.desktop.cli import build_parser, generation_settings
    from hediff.desktop.core.api import HEDiffusion

    args = build_parser().parse_args(
        ["generate", "--prompt", "p", "--init-image", init_png, "--strength", "0.5", "--count", "2"]
    )
    settings, _given = generation_settings(args)
    assert (settings.init_image, settings.strength, settings.count) == (init_png, 0.5, 2)
    with HEDiffusion(tiny_model_dir) as hd:  # a path object is taken as the file's name
        assert hd.settings(PROMPT, init_image=Path(init_png), strength=0.5).init_image == init_png
        with pytest.raises(InitImageError, match="missing.png' does not exist"):
            hd.generate(PROMPT, steps=STEPS, init_image=tmp_path / "missing.png")


def test_img2img_batch_each_image_is_its_seeds_img2img(img2img_pipe, generator, init_png):
    """--count with --init-image: each image encodes and noises the picture with its own seed's generator."""
    result = generator.generate(
        params(scheduler="euler-a", steps=STEPS, seed=4, count=2, init_image=init_png, strength=0.8)
    )
    assert result.latent.shape == (2, 4, 16, 16)
    for k in range(2):
        assert np.abs(result.latent[k] - reference(img2img_pipe, "euler-a", 0.8, seed=4 + k)).max() <= 1e-3
