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


@pytest.mark.parametrize("scheduler", ["plms", "euler"])
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
