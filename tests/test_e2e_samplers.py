"""The stochastic and few-step samplers through the encrypted split and a real loopback backend, checked against
diffusers' own StableDiffusionPipeline with the same seed (the client draws the fresh noise in the pipeline's order).
"""

from __future__ import annotations

import numpy as np
import pytest
from diffusers import StableDiffusionPipeline

from hediff.common import protocol
from hediff.common.schedulers import build_plan
from hediff.desktop.core.backend_client import BackendClient
from hediff.desktop.core.client_model import ClientModel
from hediff.desktop.core.engine import Generator
from tests.test_e2e import params, reference

NEW_SCHEDULERS = ("euler-a", "dpmpp-2m-sde", "unipc", "heun", "lcm", "ddpm")
STEPS = 4


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def u1_model(tiny_model_dir):
    return ClientModel(tiny_model_dir, "u1")


# tests/test_e2e.py's parity test runs every name in SCHEDULER_NAMES through both encryption modes (full,
# min-distortion) of the paper's split; this module adds the U-shaped split, the step count and the seeds.


@pytest.mark.parametrize("scheduler", NEW_SCHEDULERS)
def test_sampler_matches_diffusers_through_the_u_shaped_split(pipe, u1_model, backend, scheduler, seed=3):
    ref_latent, _ = reference(pipe, scheduler, steps=STEPS, seed=seed)
    backend.recorded.clear()
    with BackendClient(backend.url, backend.token) as client:  # the client runs the scheduler step, noise included
        result = Generator(u1_model, client).generate(params(scheduler=scheduler, steps=STEPS, seed=seed, split="u1"))
    diff = np.abs(result.latent - ref_latent).max()
    assert diff <= 1e-3, f"{scheduler}/u1: max abs latent difference {diff:.2e}"
    # one UNet evaluation per plan step went to the server: Heun evaluates twice per step but the last
    n_calls = len(build_plan(scheduler, pipe.scheduler.config, STEPS).steps)
    assert n_calls == (2 * STEPS - 1 if scheduler == "heun" else STEPS)
    assert len([p for p, _ in backend.recorded if p.endswith("/steps")]) == n_calls == len(result.step_timings)


@pytest.mark.parametrize("scheduler", ["euler-a", "ddpm"])
def test_the_fresh_noise_follows_the_seed_and_stays_on_the_client(pipe, generator, backend, scheduler):
    """Another seed gives diffusers' other image (the noise is drawn per seed, not fixed), and no request
    carries anything but the head's activations and the encrypted latent."""
    first = generator.generate(params(scheduler=scheduler, steps=STEPS, seed=5))
    backend.recorded.clear()
    second = generator.generate(params(scheduler=scheduler, steps=STEPS, seed=6))
    assert np.abs(first.latent - reference(pipe, scheduler, steps=STEPS, seed=5)[0]).max() <= 1e-3
    assert np.abs(second.latent - reference(pipe, scheduler, steps=STEPS, seed=6)[0]).max() <= 1e-3
    assert np.abs(first.latent - second.latent).max() > 0.1
    for path, body in backend.recorded:
        if path.endswith("/steps"):
            frame = protocol.decode_frame(body)
            assert set(frame.tensors) == {"h"} and all(name.startswith("ct") for name in frame.blobs)


def test_which_steps_draw_follows_diffusers(pipe):
    """A draw is recorded even where its coefficient is 0 (Euler a's last sigma_up), and none where diffusers
    draws none (LCM's last step): either mistake would shift every later draw off the pipeline's stream."""
    euler_a = build_plan("euler-a", pipe.scheduler.config, STEPS)
    assert [s.draws_noise for s in euler_a.steps] == [True] * STEPS
    assert [bool(s.noise_coeffs) for s in euler_a.steps] == [True] * (STEPS - 1) + [False]
    lcm = build_plan("lcm", pipe.scheduler.config, STEPS)
    assert [s.draws_noise for s in lcm.steps] == [True] * (STEPS - 1) + [False]
    for name in ("unipc", "heun"):
        assert not any(s.draws_noise or s.noise_coeffs for s in build_plan(name, pipe.scheduler.config, STEPS).steps)
