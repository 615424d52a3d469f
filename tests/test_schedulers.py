"""Affine scheduler plans vs. the real diffusers schedulers (no mocks)."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

from hediff.common.schedulers import (
    SCHEDULER_NAMES,
    AffinePlan,
    AffineStep,
    apply_step,
    build_plan,
    client_finish,
    make_scheduler,
    noise_term,
    server_offset,
)

# SD 1.x scheduler/scheduler_config.json
SD1_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

STEP_COUNTS = [1, 2, 3, 5, 10, 20]
STOCHASTIC = ("euler-a", "dpmpp-2m-sde", "lcm", "ddpm")  # their step() draws fresh noise from the generator
DETERMINISTIC = tuple(n for n in SCHEDULER_NAMES if n not in STOCHASTIC)
CASES = [(name, n) for name in SCHEDULER_NAMES for n in STEP_COUNTS] + [("dpmpp-2m", 25), ("plms", 25)]

_plan_cache: dict[tuple[str, int], AffinePlan] = {}


def _plan(name: str, n: int) -> AffinePlan:
    if (name, n) not in _plan_cache:
        _plan_cache[(name, n)] = build_plan(name, SD1_CONFIG, n)
    return _plan_cache[(name, n)]


def _noise(i: int, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(shape, generator=g, dtype=torch.float32)


def _fake_model(model_input, i: int, shape):
    """Deterministic stand-in for the guided UNet output: a fixed affine map of the input."""
    n = _noise(i, shape)
    if isinstance(model_input, torch.Tensor):
        return 0.1 * model_input + n.to(model_input.dtype)
    return 0.1 * model_input + n.double().numpy()


def _rel(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _run_real(name: str, n: int, dtype: torch.dtype, shape=(1, 4, 8, 8), config=SD1_CONFIG):
    """The StableDiffusionPipeline loop: init_noise_sigma, then scale_model_input + step with the
    generator that drew the initial latents (the pipeline's extra_step_kwargs)."""
    sched = make_scheduler(name, config)
    sched.set_timesteps(n, device="cpu")
    g = torch.Generator().manual_seed(7)
    latents = torch.randn(shape, generator=g, dtype=torch.float32).to(dtype) * sched.init_noise_sigma
    xs, inputs = [latents.clone()], []
    accepts = inspect.signature(sched.step).parameters
    kwargs = {"eta": 0.0} if "eta" in accepts else {}
    if "generator" in accepts:
        kwargs["generator"] = g
    for i, t in enumerate(sched.timesteps):
        model_in = sched.scale_model_input(latents, t)
        inputs.append(model_in.clone())
        eps = _fake_model(model_in, i, shape)
        latents = sched.step(eps, t, latents, **kwargs, return_dict=False)[0]
        xs.append(latents.clone())
    return sched, xs, inputs


def _run_plan(plan: AffinePlan, x0: np.ndarray, shape=(1, 4, 8, 8)):
    """Drive the plan through server_offset + client_finish (fast preset) plus the client's noise term,
    checking the paper preset and the plain reference give the same latent at every step.  The fresh
    noise comes from the generator that drew x0 (seed 7, as in _run_real), one draw per drawing step."""
    g = torch.Generator().manual_seed(7)
    torch.randn(shape, generator=g, dtype=torch.float32)  # x0's draw
    xs = {0: np.asarray(x0, dtype=np.float64)}
    eps_hist: dict[int, np.ndarray] = {}
    noise_hist: dict[int, np.ndarray] = {}
    inputs = []
    worst_modes = 0.0
    for step in plan.steps:
        i = step.index
        model_in = step.input_scale * xs[i]
        inputs.append(model_in)
        eps_hist[i] = _fake_model(model_in, i, shape)
        if step.draws_noise:
            noise_hist[i] = torch.randn(shape, generator=g, dtype=torch.float32).double().numpy()
        outs = []
        for server_multiplies in (False, True):
            scalar, offset = server_offset(step, eps_hist, server_multiplies)
            y = scalar * xs[step.pivot] + offset  # what the server does homomorphically
            outs.append(client_finish(step, y, xs, server_multiplies) + noise_term(step, noise_hist))
        ref = apply_step(step, xs, eps_hist, noise_hist)
        worst_modes = max(worst_modes, _rel(outs[0], ref), _rel(outs[1], ref))
        xs[i + 1] = outs[0]
    return xs, inputs, worst_modes


@pytest.mark.parametrize(("name", "n"), CASES)
def test_plan_matches_diffusers_float32(name, n):
    plan = _plan(name, n)
    sched, real_xs, real_inputs = _run_real(name, n, torch.float32)

    assert plan.scheduler == name and plan.num_inference_steps == n
    assert len(plan.steps) == len(sched.timesteps)
    assert [s.timestep for s in plan.steps] == sched.timesteps.tolist()
    assert plan.init_noise_sigma == pytest.approx(float(sched.init_noise_sigma), rel=1e-12)
    for s in plan.steps:
        assert s.pivot in s.latent_coeffs and s.latent_coeffs[s.pivot] != 0.0
        assert s.eps_coeffs, "every step must use at least one noise prediction"

    plan_xs, plan_inputs, worst_modes = _run_plan(plan, real_xs[0].double().numpy())
    err_in = max(_rel(p, r.double().numpy()) for p, r in zip(plan_inputs, real_inputs, strict=True))
    err_x = max(_rel(plan_xs[i + 1], real_xs[i + 1].double().numpy()) for i in range(len(plan.steps)))
    # Heun's float32 step recovers its derivative as (sample - (sample - sigma * e)) / sigma: float32
    # cancellation of a large sample costs the real run itself a few 1e-5; the plan is float64 throughout
    tol = 1e-4 if name == "heun" else 1e-5
    assert err_in < tol, f"{name} n={n}: model input max rel error {err_in:.3g}"
    assert err_x < tol, f"{name} n={n}: latent max rel error {err_x:.3g}"
    assert worst_modes < 1e-12, f"{name} n={n}: server/client presets disagree by {worst_modes:.3g}"


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_v_prediction_plan_matches_diffusers(name):
    """SD 2.x (768 px) models predict v; each scheduler converts it linearly, so the traced plan covers it."""
    config = {**SD1_CONFIG, "prediction_type": "v_prediction"}
    plan = build_plan(name, config, 5)
    _, real_xs, real_inputs = _run_real(name, 5, torch.float32, config=config)
    plan_xs, plan_inputs, worst_modes = _run_plan(plan, real_xs[0].double().numpy())
    err_in = max(_rel(p, r.double().numpy()) for p, r in zip(plan_inputs, real_inputs, strict=True))
    err_x = max(_rel(plan_xs[i + 1], real_xs[i + 1].double().numpy()) for i in range(len(plan.steps)))
    assert err_in < 1e-4 and err_x < 1e-4, f"{name}: max rel error input {err_in:.3g}, latent {err_x:.3g}"
    assert worst_modes < 1e-12
    assert plan.digest() != _plan(name, 5).digest()  # a v-prediction plan is not the epsilon one


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_plan_matches_diffusers_float64(name):
    """In float64 DDIM/PLMS agree to rounding; Euler and DPM-Solver++ cast `sample` to float32
    inside step(), so a float64 diffusers run is itself only float32-accurate.  (The stochastic
    samplers draw their noise in the model's dtype, a float64 stream no float32 pipeline uses.)"""
    n = 10
    plan = _plan(name, n)
    _, real_xs, _ = _run_real(name, n, torch.float64)
    plan_xs, _, _ = _run_plan(plan, real_xs[0].numpy())
    err = max(_rel(plan_xs[i + 1], real_xs[i + 1].numpy()) for i in range(len(plan.steps)))
    tol = 1e-12 if name in ("ddim", "plms") else 1e-6
    assert err < tol, f"{name}: float64 max rel error {err:.3g}"


def test_history_and_structure():
    # DDIM / Euler: single-step, x_{i+1} depends on x_i and e_i only.
    for name in ("ddim", "euler"):
        p = _plan(name, 10)
        assert (p.eps_history_needed(), p.latent_history_needed(), p.client_history_needed()) == (1, 1, 1)
        assert all(set(s.latent_coeffs) == {s.index} == set(s.eps_coeffs) for s in p.steps)
    euler = _plan("euler", 10)
    assert all(s.latent_coeffs == {s.index: 1.0} for s in euler.steps)
    assert euler.steps[0].input_scale == pytest.approx(1 / (euler.init_noise_sigma**2 + 1) ** 0.5, rel=1e-6)

    # PLMS: n + 1 UNet calls; the second call restarts from x_0 (diffusers' `cur_sample`).
    plms = _plan("plms", 10)
    assert len(plms.steps) == 11
    s1 = plms.steps[1]
    assert s1.pivot == 0 and set(s1.latent_coeffs) == {0} and set(s1.eps_coeffs) == {0, 1}
    assert plms.latent_history_needed() == 2
    # e_1 is only used by step 1; e_0 stays in the Adams-Bashforth history until step 4.
    assert all(1 not in s.eps_coeffs for s in plms.steps[2:])
    assert set(plms.steps[4].eps_coeffs) == {0, 2, 3, 4}
    assert plms.eps_history_needed() == 5
    assert len(_plan("plms", 1).steps) == 1

    # DPM-Solver++ 2M: uses the previous latent through its stored data prediction, and its
    # final step (final_sigmas_type="zero") is first order and returns the data prediction.
    for n in (3, 10, 20, 25):
        dpm = _plan("dpmpp-2m", n)
        assert all(s.pivot == s.index for s in dpm.steps)
        mids = dpm.steps[1:-1]
        assert all(set(s.latent_coeffs) == {s.index - 1, s.index} for s in mids)
        assert all(set(s.eps_coeffs) == {s.index - 1, s.index} for s in mids)
        last = dpm.steps[-1]
        assert set(last.latent_coeffs) == {last.index} and set(last.eps_coeffs) == {last.index}
        assert (dpm.eps_history_needed(), dpm.latent_history_needed(), dpm.client_history_needed()) == (
            2,
            1,
            2,
        )


def test_digest_and_serialisation():
    a = build_plan("dpmpp-2m", SD1_CONFIG, 10)
    b = build_plan("dpmpp-2m", dict(SD1_CONFIG), 10)
    assert a == b and a.digest() == b.digest()
    assert len(a.digest()) == 64
    digests = {_plan(name, n).digest() for name in SCHEDULER_NAMES for n in (5, 10)}
    assert len(digests) == 2 * len(SCHEDULER_NAMES)

    for name in SCHEDULER_NAMES:
        p = _plan(name, 5)
        d = json.loads(json.dumps(p.to_dict()))
        q = AffinePlan.from_dict(d)
        assert q == p and q.digest() == p.digest()
        assert [type(s.timestep) for s in q.steps] == [type(s.timestep) for s in p.steps]
    # Pipeline timestep types: integers except for Euler's float linspace schedule.
    assert isinstance(_plan("euler", 20).steps[1].timestep, float)
    assert all(isinstance(s.timestep, int) for s in _plan("dpmpp-2m", 20).steps)

    # A coefficient change beyond 12 significant digits changes the digest; below it does not.
    d = a.to_dict()
    d["steps"][3]["eps_coeffs"]["3"] *= 1 + 1e-9
    assert AffinePlan.from_dict(d).digest() != a.digest()
    d = a.to_dict()
    d["steps"][3]["eps_coeffs"]["3"] *= 1 + 1e-15
    assert AffinePlan.from_dict(d).digest() == a.digest()


def test_make_scheduler_matches_pipeline_swap():
    pndm = PNDMScheduler.from_config(SD1_CONFIG)
    expected = {
        "ddim": (DDIMScheduler, {}),
        "plms": (PNDMScheduler, {"skip_prk_steps": True}),
        "euler": (EulerDiscreteScheduler, {}),
        "dpmpp-2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
        "euler-a": (EulerAncestralDiscreteScheduler, {}),
        "dpmpp-2m-sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
        "unipc": (UniPCMultistepScheduler, {}),
        "heun": (HeunDiscreteScheduler, {}),
        "lcm": (LCMScheduler, {}),
        "ddpm": (DDPMScheduler, {}),
    }
    assert set(expected) == set(SCHEDULER_NAMES)
    for name, (cls, overrides) in expected.items():
        ours = make_scheduler(name, pndm.config)  # a pipeline's FrozenDict config works too
        theirs = cls.from_config(pndm.config, **overrides)
        assert type(ours) is cls
        assert dict(ours.config) == dict(theirs.config)


def test_history_helpers_accept_float32_and_report_missing():
    step = _plan("dpmpp-2m", 5).steps[2]
    x = {j: np.ones(4, dtype=np.float32) for j in (1, 2)}
    e = {k: np.full(4, 0.5, dtype=np.float32) for k in (1, 2)}
    scalar, offset = server_offset(step, e, server_multiplies=False)
    assert scalar == 1.0 and offset.dtype == np.float64
    out = client_finish(step, x[2] + offset, x, server_multiplies=False)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, apply_step(step, x, e), rtol=1e-12)
    with pytest.raises(KeyError, match=r"eps_history\[1\]"):
        server_offset(step, {2: e[2]}, server_multiplies=True)
    with pytest.raises(KeyError, match=r"latent_history\[1\]"):
        client_finish(step, x[2], {2: x[2]}, server_multiplies=True)


def test_affine_step_validation():
    with pytest.raises(ValueError, match="pivot"):
        AffineStep(index=1, timestep=1, input_scale=1.0, pivot=0, latent_coeffs={1: 1.0}, eps_coeffs={1: 1.0})
    with pytest.raises(ValueError, match="x_0..x_1"):
        AffineStep(index=1, timestep=1, input_scale=1.0, pivot=1, latent_coeffs={2: 1.0, 1: 1.0}, eps_coeffs={})


@pytest.mark.parametrize(
    ("name", "overrides", "match"),
    [
        ("ddim", {"prediction_type": "flow_prediction"}, "prediction_type"),
        ("euler-a", {"prediction_type": "flow_prediction"}, "prediction_type"),
        ("ddim", {"thresholding": True}, "thresholding"),
        ("dpmpp-2m", {"thresholding": True}, "thresholding"),
        ("ddim", {"clip_sample": True}, "clip_sample"),
        ("ddim", {"eta": 0.5}, "eta"),
        ("euler", {"s_churn": 1.0}, "s_churn"),
        ("euler", {"s_noise": 0.5}, "s_noise"),
        ("plms", {"steps_offset": 0}, "steps_offset"),
        ("dpmpp-2m", {"variance_type": "learned_range"}, "variance_type"),
        ("dpmpp-2m-sde", {"variance_type": "learned_range"}, "variance_type"),
        ("ddpm", {"variance_type": "learned_range"}, "variance_type"),
        ("unipc", {"thresholding": True}, "thresholding"),
    ],
)
def test_rejects_unsupported_settings(name, overrides, match):
    cfg = {**SD1_CONFIG, **overrides}
    with pytest.raises(ValueError, match=match):
        make_scheduler(name, cfg)
    with pytest.raises(ValueError, match=match):
        build_plan(name, cfg, 5)


def test_ddpm_default_clipping_is_refused_when_the_config_leaves_it_unset():
    config = {k: v for k, v in SD1_CONFIG.items() if k != "clip_sample"}  # DDPMScheduler's own default clips
    with pytest.raises(ValueError, match="clip_sample=True is not supported"):
        build_plan("ddpm", config, 5)
    assert build_plan("ddpm", {**config, "clip_sample": False}, 5).steps[0].draws_noise


def test_rejects_bad_names_and_step_counts():
    with pytest.raises(ValueError, match="valid names are: ddim, plms, euler, dpmpp-2m"):
        build_plan("k_lms", SD1_CONFIG, 5)
    with pytest.raises(ValueError, match="valid names"):
        make_scheduler("DDIM", SD1_CONFIG)
    for bad in (0, -3, 1001):
        with pytest.raises(ValueError, match=r"\[1, 1000\]"):
            build_plan("ddim", SD1_CONFIG, bad)
    with pytest.raises(ValueError, match="num_train_timesteps=50"):
        build_plan("euler", {**SD1_CONFIG, "num_train_timesteps": 50}, 60)
    with pytest.raises(TypeError, match="integer"):
        build_plan("ddim", SD1_CONFIG, 5.0)
    # diffusers itself cannot run these: DDIM "leading" + steps_offset=1 indexes timestep 1000,
    # and DPM-Solver++ at 1000 steps repeats a timestep (h = 0 -> NaN).
    with pytest.raises(ValueError, match="cannot run 1000 steps"):
        build_plan("ddim", SD1_CONFIG, 1000)
    with pytest.raises(ValueError, match="non-finite"):
        build_plan("dpmpp-2m", SD1_CONFIG, 1000)
