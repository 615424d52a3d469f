"""Private on this device: the whole pipeline in process equals diffusers' own, and nothing goes on the wire."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from hediff.common.schedulers import make_scheduler
from hediff.desktop.core.engine import GenerationCancelled, GenerationParams
from hediff.desktop.core.on_device import ON_DEVICE_LOCATION, OnDeviceGenerator

PROMPT = "a red circle on a blue background"
SIZE = 32


@pytest.fixture(scope="module")
def on_device(tiny_model_dir):
    return OnDeviceGenerator(tiny_model_dir)


# euler-a draws noise every step: the per-step preview must not change which generator it draws from
@pytest.mark.parametrize("scheduler", ["plms", "euler", "euler-a"])
def test_on_device_equals_diffusers_pipeline(on_device, tiny_model_dir, scheduler):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    kw = dict(
        prompt=PROMPT, negative_prompt="blurry", num_inference_steps=5, guidance_scale=7.5, height=SIZE, width=SIZE
    )
    ref_latent = pipe(**kw, generator=torch.Generator("cpu").manual_seed(3), output_type="latent").images[0]
    ref_image = pipe(**kw, generator=torch.Generator("cpu").manual_seed(3), output_type="pil").images[0]

    updates = []
    params = GenerationParams(
        prompt=PROMPT,
        negative_prompt="blurry",
        steps=5,
        guidance=7.5,
        seed=3,
        width=SIZE,
        height=SIZE,
        scheduler=scheduler,
    )
    result = on_device.generate(params, on_step=updates.append)

    assert np.array_equal(result.latent, ref_latent.double().numpy())
    assert np.array_equal(np.asarray(result.image), np.asarray(ref_image))
    assert result.server_url == ON_DEVICE_LOCATION
    # every step reports, nothing left the machine, the ETA counts down to zero
    assert [u.index for u in updates] == list(range(len(updates))) and len(updates) >= 5
    assert all(u.bytes_sent == 0 and u.bytes_received == 0 and u.sent == [] for u in updates)
    assert updates[-1].eta_s == 0.0 and np.array_equal(updates[-1].latent, result.latent)
    assert sum(result.bytes_sent) == 0 and len(result.step_timings) == len(updates)
    assert updates[0].preview.size == (SIZE, SIZE)


def test_on_device_cancel_stops_between_steps(on_device):
    cancel = threading.Event()
    seen = []

    def on_step(update):
        seen.append(update.index)
        if update.index == 1:
            cancel.set()

    params = GenerationParams(prompt=PROMPT, steps=6, guidance=2.0, width=SIZE, height=SIZE, scheduler="ddim")
    with pytest.raises(GenerationCancelled, match="after step 2 of 6"):
        on_device.generate(params, on_step=on_step, cancel=cancel)
    assert seen == [0, 1]


def test_api_generates_on_this_device_by_default(tiny_model_dir, tmp_path):
    from PIL import Image

    from hediff import HEDiffusion

    with HEDiffusion(tiny_model_dir) as hd:
        assert hd.privacy().private and hd.privacy().text.startswith("Private: this device")
        result = hd.generate(PROMPT, steps=3, guidance=2.0, seed=1, width=SIZE, height=SIZE)
    assert result.mode == "on-device" and result.params.encryption == "none"
    assert sum(result.bytes_sent) == 0 and hd.client is None  # no connection was ever made
    result.save(tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").text["hediff:mode"] == "on-device"


def test_a_server_that_proves_nothing_needs_an_explicit_acknowledgement(tiny_model_dir, backend):
    from hediff import HEDiffusion
    from hediff.desktop.core.api import NotPrivateError

    with pytest.raises(
        NotPrivateError, match=r"Not private: this server can rebuild your images .* accept_not_private"
    ):
        HEDiffusion(tiny_model_dir, server=backend.url, token=backend.token)
    with HEDiffusion(tiny_model_dir, server=backend.url, token=backend.token, accept_not_private=True) as hd:
        label = hd.privacy("conv_in", "full")
        assert not label.private and label.text.startswith("Not private: this server can rebuild your images")
    with HEDiffusion(tiny_model_dir, local_backend=True) as hd:  # the loopback backend is this machine
        assert hd.privacy().private


def test_cli_refuses_an_unattested_server_without_the_flag_before_loading(tiny_model_dir, backend, capsys, tmp_path):
    from hediff.desktop.cli import main

    rc = main(
        [
            "generate",
            "--server",
            backend.url,
            "--token",
            backend.token,
            "--model",
            str(tiny_model_dir),
            "--prompt",
            PROMPT,
            "--out",
            str(tmp_path / "x.png"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and not (tmp_path / "x.png").exists()
    assert "proves nothing about what it runs" in err and "--accept-not-private" in err and "Not private" in err


def test_cli_on_device_is_the_default_and_says_so(tiny_model_dir, capsys, tmp_path):
    from PIL import Image

    from hediff.desktop.cli import main

    out = tmp_path / "d.png"
    rc = main(
        [
            "generate",
            "--model",
            str(tiny_model_dir),
            "--prompt",
            PROMPT,
            "--steps",
            "2",
            "--width",
            "32",
            "--height",
            "32",
            "--out",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "Private: this device (nothing leaves this machine)" in err and "nothing left this machine" in err
    assert Image.open(out).size == (32, 32) and Image.open(out).text["hediff:mode"] == "on-device"
