"""--count N: N images with seeds s, s+1, ... in one session, the server running them as one UNet batch per step;
each image equals diffusers' single-image run with its seed (the client draws each image's noise from its own
seed's generator)."""

from __future__ import annotations

import numpy as np
import pytest
from diffusers import StableDiffusionPipeline
from PIL import Image

from hediff.common import protocol
from hediff.common.settings import SettingsError
from hediff.desktop.core.backend_client import BackendClient
from hediff.desktop.core.client_model import ClientModel
from hediff.desktop.core.engine import Generator
from tests.test_e2e import NEGATIVE, PROMPT, SIZE, params, reference

STEPS = 4


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _check_each_image(pipe, result, scheduler: str, seed: int, count: int) -> None:
    assert result.latent.shape == (count, 4, 16, 16)
    for k in range(count):
        ref = reference(pipe, scheduler, steps=STEPS, seed=seed + k)[0]
        diff = np.abs(result.latent[k] - ref).max()
        assert diff <= 1e-3, f"{scheduler}: image {k} (seed {seed + k}) max abs latent difference {diff:.2e}"
    assert len(result.images) == count and all(im.size == (SIZE, SIZE) for im in result.images)


@pytest.mark.parametrize("encryption", ["full", "none"])
@pytest.mark.parametrize("scheduler", ["ddim", "euler-a"])
def test_each_image_of_a_batch_is_its_seeds_diffusers_image(pipe, generator, backend, scheduler, encryption):
    backend.recorded.clear()
    result = generator.generate(params(scheduler=scheduler, steps=STEPS, seed=7, count=3, encryption=encryption))
    _check_each_image(pipe, result, scheduler, seed=7, count=3)
    # one request, so one UNet call, per step for all three images: the head's activation holds the batch
    steps = [protocol.decode_frame(body) for path, body in backend.recorded if path.endswith("/steps")]
    assert len(steps) == STEPS == len(result.step_timings)
    assert all(frame.tensors["h"].shape[0] == 3 for frame in steps)
    opened = [protocol.decode_frame(b) for p, b in backend.recorded if p.endswith("/sessions")]
    assert [f.meta["count"] for f in opened] == [3]


def test_a_batch_with_min_distortion_selects_per_image(pipe, generator):
    result = generator.generate(params(scheduler="dpmpp-2m", steps=STEPS, seed=1, count=2, encryption="min-distortion"))
    _check_each_image(pipe, result, "dpmpp-2m", seed=1, count=2)
    assert all(0.5 < f < 1.0 for f in result.encrypted_fractions)


def test_a_batch_through_the_u_shaped_split(pipe, tiny_model_dir, backend):
    with BackendClient(backend.url, backend.token) as client:
        result = Generator(ClientModel(tiny_model_dir, "u1"), client).generate(
            params(scheduler="dpmpp-2m-sde", steps=STEPS, seed=2, count=2, split="u1")
        )
    _check_each_image(pipe, result, "dpmpp-2m-sde", seed=2, count=2)


def test_a_batch_on_this_device(pipe, tiny_model_dir):
    from hediff.desktop.core.on_device import OnDeviceGenerator

    result = OnDeviceGenerator(tiny_model_dir).generate(params(scheduler="euler-a", steps=STEPS, seed=3, count=2))
    _check_each_image(pipe, result, "euler-a", seed=3, count=2)


def test_the_cli_writes_every_image_and_the_batch_of_latents(pipe, tiny_model_dir, tmp_path, capsys):
    from hediff.desktop.cli import main

    base = ["generate", "--local-backend", "--model", str(tiny_model_dir), "--prompt", PROMPT]
    base += ["--negative-prompt", NEGATIVE, "--steps", str(STEPS), "--scheduler", "ddim", "--quiet", "--seed", "4"]
    npy = tmp_path / "lat.npy"
    rc = main([*base, "--count", "2", "--out", str(tmp_path / "b.png"), "--latents-out", str(npy)])
    assert rc == 0, capsys.readouterr().err
    latents = np.load(npy)
    assert latents.shape == (2, 4, 16, 16)
    for k, name in enumerate(["b.png", "b-1.png"]):
        assert np.abs(latents[k] - reference(pipe, "ddim", steps=STEPS, seed=4 + k)[0]).max() <= 1e-3
        text = Image.open(tmp_path / name).text
        assert (text["hediff:seed"], text["hediff:count"]) == (str(4 + k), "1")  # rerunning it makes this image


def test_count_bounds_are_named():
    with pytest.raises(SettingsError, match=r"count must be an integer in \[1, 16\], got 17"):
        params(count=17)
    with pytest.raises(SettingsError, match="count must be at most 2 from seed 2147483646"):
        params(count=3, seed=2**31 - 2).validate()
