"""HE-compatible affine descriptions of diffusers scheduler steps.

For the samplers supported here, one denoising step is *affine* in the latents with public
(plaintext) coefficients::

    x_{i+1} = sum_j a_j * x_j + sum_k c_k * e_k + sum_k d_k * z_k

where ``x_j`` are the latents the client has held so far (``x_0`` is the initial noise
already multiplied by ``init_noise_sigma``), ``e_k`` is the guided noise prediction
computed at step ``k`` and ``z_k`` is the fresh Gaussian noise a stochastic sampler
(Euler a, DPM++ 2M SDE, LCM, DDPM) draws in step ``k``.  The server holds an encrypted copy
of one latent ``x_p`` (the *pivot*) and adds a plaintext vector built from its own noise
predictions; the client, who holds the secret key, decrypts and applies the remaining latent
coefficients and the fresh-noise term, so the server never learns the noise.  The client
draws ``z_k`` from the seed's CPU ``torch.Generator`` right after the initial latents, one
draw per step whose :attr:`AffineStep.draws_noise` is set, in step order: exactly the order
of diffusers' ``StableDiffusionPipeline`` (whose ``step()`` calls ``randn_tensor`` with the
pipeline's generator), so a seed gives the same image.

Coefficients are not derived by hand: :func:`build_plan` runs the real diffusers
scheduler (built by :func:`make_scheduler`, exactly as ``StableDiffusionPipeline`` would
use it after ``Scheduler.from_config(pipe.scheduler.config)``) on one-hot coefficient
vectors ("symbolic linear execution").  Every supported ``step()`` is linear in
``(sample, model_output, stored history, drawn noise)``, so the output vector *is* the
coefficient vector of ``x_{i+1}`` in the basis ``(x_0..x_N, e_0..e_{N-1}, z_0..z_{N-1})``;
during the trace the scheduler's ``randn_tensor`` hands out the one-hot ``z_i`` instead of
random numbers (for the tracing thread only), which also records whether step ``i`` draws.
The prediction type (epsilon, v_prediction, sample) is part of that linear map, so SD 2.x's
v-prediction needs nothing special.

Precision: the symbolic run uses float64 tensors.  DDIM and PNDM keep float64 throughout
(their scalars ``alphas_cumprod`` are float32 values, applied in float64).  Euler and
DPM-Solver++ upcast ``sample`` to float32 unconditionally inside ``step()``; one-hot
vectors survive that cast exactly, and because ``model_output`` is float64 the result is
promoted back to float64, so the coefficients are the float64 evaluation of the
scheduler's float32 scalars.  A real float32 pipeline run therefore agrees with the plan
to float32 rounding (~1e-7 relative); a real float64 run of DDIM/PNDM agrees to ~1e-15.

Note that the number of steps in a plan is ``len(scheduler.timesteps)``, which for PLMS
(PNDM with ``skip_prk_steps``) is ``num_inference_steps + 1`` when ``num_inference_steps
>= 2``: diffusers evaluates the UNet twice at the second-highest timestep.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
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
from diffusers.schedulers.scheduling_utils import SchedulerMixin

__all__ = [
    "SCHEDULER_NAMES",
    "AffinePlan",
    "AffineStep",
    "apply_step",
    "build_plan",
    "client_finish",
    "img2img_start_latent",
    "make_scheduler",
    "model_evaluations",
    "noise_term",
    "server_offset",
]

#: Supported scheduler names, in a stable order.
from hediff.common.settings import SCHEDULER_NAMES  # noqa: E402  (the settings own the names; this module the plans)

# name -> (diffusers class, keyword overrides passed to from_config)
_SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
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

# step()-time knobs that would make a step stochastic; we always call step() with the
# defaults, so a config that asks for anything else is rejected rather than ignored.
_STEP_KWARG_DEFAULTS: dict[str, float] = {
    "eta": 0.0,  # DDIM
    "s_churn": 0.0,  # Euler
    "s_tmin": 0.0,
    "s_tmax": float("inf"),
    "s_noise": 1.0,
}

_PLAN_FORMAT = "he-diffusion/affine-plan/v2"  # v2: the fresh-noise term
# Coefficients whose magnitude is below this fraction of the step's largest coefficient
# are float64 cancellation noise (e.g. 1 - 1 in a derivative); they are dropped.
_DROP_REL = 1e-13
# A latent coefficient smaller than this fraction of the largest one cannot be a pivot.
_PIVOT_REL = 1e-12
# every prediction type diffusers' schedulers convert linearly (SD 1.x/XL: epsilon, SD 2.x 768: v_prediction)
_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
_LEARNED_VARIANCE = ("learned", "learned_range")


# --------------------------------------------------------------------------------------
# Scheduler construction and validation
# --------------------------------------------------------------------------------------


def _check_name(name: str) -> None:
    if name not in _SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; valid names are: {', '.join(SCHEDULER_NAMES)}")


def make_scheduler(name: str, config: Mapping[str, Any]) -> SchedulerMixin:
    """Build the diffusers scheduler ``name`` from a model's scheduler config.

    This is exactly the object ``StableDiffusionPipeline`` would use after
    ``pipe.scheduler = Cls.from_config(pipe.scheduler.config, **overrides)``; use it for the
    pipeline too when comparing against a plan.  Settings that make a step non-affine or
    non-deterministic (or that we do not support) raise ``ValueError`` naming the setting.
    """
    _check_name(name)
    if not isinstance(config, Mapping):
        raise TypeError(f"scheduler config must be a mapping, got {type(config).__name__}")
    raw = dict(config)
    _check_raw_config(name, raw)
    cls, overrides = _SCHEDULERS[name]
    scheduler = cls.from_config(raw, **overrides)
    _check_resolved_config(name, dict(scheduler.config))
    return scheduler


def _check_raw_config(name: str, raw: dict[str, Any]) -> None:
    for key, default in _STEP_KWARG_DEFAULTS.items():
        if key in raw and raw[key] is not None and float(raw[key]) != default:
            raise ValueError(
                f"scheduler {name!r}: {key}={raw[key]!r} is not supported (only the deterministic "
                f"default {key}={default} gives an affine step)"
            )
    if raw.get("clip_sample"):
        raise ValueError(
            f"scheduler {name!r}: clip_sample=True is not supported (clipping the predicted sample is "
            "not affine); set clip_sample=False"
        )


def _check_resolved_config(name: str, cfg: dict[str, Any]) -> None:
    pred = cfg.get("prediction_type", "epsilon")
    if pred not in _PREDICTION_TYPES:
        raise ValueError(
            f"scheduler {name!r}: prediction_type={pred!r} is not supported; use one of {', '.join(_PREDICTION_TYPES)}"
        )
    if cfg.get("thresholding"):
        raise ValueError(f"scheduler {name!r}: thresholding=True is not supported (dynamic thresholding is not affine)")
    if cfg.get("clip_sample"):
        raise ValueError(f"scheduler {name!r}: clip_sample=True is not supported (not affine)")
    if cfg.get("timestep_spacing") == "leading" and cfg.get("steps_offset", 0) != 1:
        # StableDiffusionPipeline silently rewrites steps_offset to 1 on construction, so a
        # different value here would give timesteps that differ from the pipeline's.
        raise ValueError(
            f"scheduler {name!r}: steps_offset={cfg.get('steps_offset')!r} is not supported with "
            "timestep_spacing='leading'; StableDiffusionPipeline forces steps_offset=1, pass its "
            "scheduler.config (or set steps_offset=1)"
        )
    if cfg.get("variance_type") in _LEARNED_VARIANCE or (
        name.startswith("dpmpp") and cfg.get("variance_type") is not None
    ):
        raise ValueError(
            f"scheduler {name!r}: variance_type={cfg['variance_type']!r} is not supported "
            "(a learned variance needs a UNet that predicts it; Stable Diffusion's UNets do not)"
        )
    if name.startswith("dpmpp"):
        if cfg.get("use_dynamic_shifting"):
            raise ValueError(f"scheduler {name!r}: use_dynamic_shifting=True is not supported")


def _check_num_steps(num_inference_steps: Any, num_train_timesteps: int) -> int:
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
        raise TypeError(f"num_inference_steps must be an integer, got {type(num_inference_steps).__name__}")
    n = int(num_inference_steps)
    if not 1 <= n <= 1000:
        raise ValueError(f"num_inference_steps must be in [1, 1000], got {n}")
    if n > num_train_timesteps:
        raise ValueError(f"num_inference_steps={n} exceeds the scheduler's num_train_timesteps={num_train_timesteps}")
    return n


# --------------------------------------------------------------------------------------
# Data structures
# --------------------------------------------------------------------------------------


def _coeff_dict(d: Mapping[Any, Any], what: str) -> dict[int, float]:
    out: dict[int, float] = {}
    for k, v in d.items():
        fv = float(v)
        if not math.isfinite(fv):
            raise ValueError(f"{what}[{k}] is not finite: {v!r}")
        if fv != 0.0:
            out[int(k)] = fv
    return dict(sorted(out.items()))


def _timestep_value(t: Any) -> int | float:
    if isinstance(t, bool):
        raise TypeError("timestep must be a number, not a bool")
    if isinstance(t, (int, np.integer)):
        return int(t)
    return float(t)


@dataclass(frozen=True)
class AffineStep:
    """One denoising step: ``x_{i+1} = sum_j a_j x_j + sum_k c_k e_k + sum_k d_k z_k``.

    ``timestep`` is the value fed to the UNet: an ``int`` for DDIM/PLMS/DPM-Solver++ and a
    ``float`` for Euler (its linspace timesteps are float32 and generally non-integral).
    The model input is ``input_scale * x_index``.  ``draws_noise``: diffusers' step draws one
    latent-shaped ``z_index`` from the generator here (even where its coefficient is 0, as in
    Euler a's last step: the draw still advances the generator).
    """

    index: int
    timestep: int | float
    input_scale: float
    pivot: int
    latent_coeffs: dict[int, float]
    eps_coeffs: dict[int, float]
    noise_coeffs: dict[int, float] = field(default_factory=dict)
    draws_noise: bool = False

    def __post_init__(self) -> None:
        lat = _coeff_dict(self.latent_coeffs, "latent_coeffs")
        eps = _coeff_dict(self.eps_coeffs, "eps_coeffs")
        noise = _coeff_dict(self.noise_coeffs, "noise_coeffs")
        if not isinstance(self.draws_noise, bool):
            raise TypeError(f"draws_noise must be a bool, got {type(self.draws_noise).__name__}")
        object.__setattr__(self, "index", int(self.index))
        object.__setattr__(self, "timestep", _timestep_value(self.timestep))
        object.__setattr__(self, "input_scale", float(self.input_scale))
        object.__setattr__(self, "pivot", int(self.pivot))
        object.__setattr__(self, "latent_coeffs", lat)
        object.__setattr__(self, "eps_coeffs", eps)
        object.__setattr__(self, "noise_coeffs", noise)
        i = self.index
        if i < 0:
            raise ValueError(f"step index must be >= 0, got {i}")
        if not (math.isfinite(self.input_scale) and self.input_scale != 0.0):
            raise ValueError(f"step {i}: input_scale must be finite and nonzero, got {self.input_scale}")
        if self.pivot not in lat:
            raise ValueError(f"step {i}: pivot {self.pivot} has no nonzero latent coefficient")
        if any(j < 0 or j > i for j in lat):
            raise ValueError(f"step {i}: latent coefficients must reference x_0..x_{i}, got {sorted(lat)}")
        if any(k < 0 or k > i for k in eps):
            raise ValueError(f"step {i}: eps coefficients must reference e_0..e_{i}, got {sorted(eps)}")
        if any(k < 0 or k > i for k in noise):
            raise ValueError(f"step {i}: noise coefficients must reference z_0..z_{i}, got {sorted(noise)}")
        if i in noise and not self.draws_noise:
            raise ValueError(f"step {i}: a noise coefficient for z_{i} needs draws_noise=True")

    def __hash__(self) -> int:
        return hash(
            (
                self.index,
                self.timestep,
                self.input_scale,
                self.pivot,
                tuple(self.latent_coeffs.items()),
                tuple(self.eps_coeffs.items()),
                tuple(self.noise_coeffs.items()),
                self.draws_noise,
            )
        )

    @property
    def pivot_coeff(self) -> float:
        """``a_p``, the coefficient of the latent the server updates."""
        return self.latent_coeffs[self.pivot]

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "timestep": self.timestep,
            "input_scale": self.input_scale,
            "pivot": self.pivot,
            "latent_coeffs": {str(k): v for k, v in self.latent_coeffs.items()},
            "eps_coeffs": {str(k): v for k, v in self.eps_coeffs.items()},
            "noise_coeffs": {str(k): v for k, v in self.noise_coeffs.items()},
            "draws_noise": self.draws_noise,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AffineStep:
        try:
            return cls(
                index=d["index"],
                timestep=d["timestep"],
                input_scale=d["input_scale"],
                pivot=d["pivot"],
                latent_coeffs=d["latent_coeffs"],
                eps_coeffs=d["eps_coeffs"],
                noise_coeffs=d["noise_coeffs"],
                draws_noise=d["draws_noise"],
            )
        except KeyError as exc:
            raise ValueError(f"AffineStep dict is missing key {exc.args[0]!r}") from None

    def _canonical(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "timestep": _round12(self.timestep),
            "input_scale": _round12(self.input_scale),
            "pivot": self.pivot,
            "latent_coeffs": {str(k): _round12(v) for k, v in self.latent_coeffs.items()},
            "eps_coeffs": {str(k): _round12(v) for k, v in self.eps_coeffs.items()},
            "noise_coeffs": {str(k): _round12(v) for k, v in self.noise_coeffs.items()},
            "draws_noise": self.draws_noise,
        }


def _round12(v: float) -> float:
    if isinstance(v, int):
        return v
    r = float(f"{v:.12g}")
    return 0.0 if r == 0.0 else r  # normalise -0.0


@dataclass(frozen=True)
class AffinePlan:
    """The full sampling schedule as a sequence of affine steps.

    ``len(steps)`` is the number of UNet evaluations, i.e. ``len(scheduler.timesteps)``,
    which can exceed ``num_inference_steps`` (PLMS).  The final latent is ``x_{len(steps)}``.
    """

    scheduler: str
    num_inference_steps: int
    init_noise_sigma: float
    steps: tuple[AffineStep, ...]
    # img2img: the strength the plan starts at (its steps are the pipeline's last ones); None: from pure noise
    strength: float | None = None

    def __post_init__(self) -> None:
        _check_name(self.scheduler)
        if self.strength is not None:
            object.__setattr__(self, "strength", float(self.strength))
        steps = tuple(s if isinstance(s, AffineStep) else AffineStep.from_dict(s) for s in self.steps)
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "num_inference_steps", int(self.num_inference_steps))
        object.__setattr__(self, "init_noise_sigma", float(self.init_noise_sigma))
        if not steps:
            raise ValueError("an AffinePlan needs at least one step")
        for i, s in enumerate(steps):
            if s.index != i:
                raise ValueError(f"plan steps out of order: position {i} holds step {s.index}")
            undrawn = [k for k in s.noise_coeffs if not steps[k].draws_noise]
            if undrawn:
                raise ValueError(f"step {i} uses noise z_{undrawn[0]} that step {undrawn[0]} does not draw")

    def __len__(self) -> int:
        return len(self.steps)

    def eps_history_needed(self) -> int:
        """How many noise predictions (current one included) the server must keep."""
        return max(((s.index - min(s.eps_coeffs)) + 1 for s in self.steps if s.eps_coeffs), default=0)

    def latent_history_needed(self) -> int:
        """How many encrypted latents (current one included) the server must keep (>= 1)."""
        return max(max(s.index - s.pivot + 1 for s in self.steps), 1)

    def client_history_needed(self) -> int:
        """How many plaintext latents (current one included) the client must keep (>= 1)."""
        return max(max(s.index - min(s.latent_coeffs) + 1 for s in self.steps), 1)

    def noise_history_needed(self) -> int:
        """How many drawn noise tensors (the current step's included) the client must keep."""
        return max(((s.index - min(s.noise_coeffs)) + 1 for s in self.steps if s.noise_coeffs), default=0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": _PLAN_FORMAT,
            "scheduler": self.scheduler,
            "num_inference_steps": self.num_inference_steps,
            "init_noise_sigma": self.init_noise_sigma,
            "steps": [s.to_dict() for s in self.steps],
            "strength": self.strength,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AffinePlan:
        fmt = d.get("format", _PLAN_FORMAT)
        if fmt != _PLAN_FORMAT:
            raise ValueError(f"unsupported plan format {fmt!r} (expected {_PLAN_FORMAT!r})")
        try:
            return cls(
                scheduler=d["scheduler"],
                num_inference_steps=d["num_inference_steps"],
                init_noise_sigma=d["init_noise_sigma"],
                steps=tuple(AffineStep.from_dict(s) for s in d["steps"]),
                strength=d.get("strength"),
            )
        except KeyError as exc:
            raise ValueError(f"AffinePlan dict is missing key {exc.args[0]!r}") from None

    def canonical_json(self) -> str:
        """Canonical JSON (coefficients rounded to 12 significant digits) hashed by :meth:`digest`."""
        payload = {
            "format": _PLAN_FORMAT,
            "scheduler": self.scheduler,
            "num_inference_steps": self.num_inference_steps,
            "init_noise_sigma": _round12(self.init_noise_sigma),
            "steps": [s._canonical() for s in self.steps],
        }
        if self.strength is not None:  # only then: text-to-image plans keep the digests they always had
            payload["strength"] = _round12(self.strength)
        return json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)

    def digest(self) -> str:
        """sha256 hex of :meth:`canonical_json`, for client/server agreement checks."""
        return hashlib.sha256(self.canonical_json().encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------
# Plan construction by symbolic linear execution
# --------------------------------------------------------------------------------------


def _sparse(vec: np.ndarray, lo: int, hi: int, scale: float) -> dict[int, float]:
    thresh = _DROP_REL * scale
    return {j - lo: float(vec[j]) for j in range(lo, hi) if abs(vec[j]) > thresh}


# one trace at a time may stand in for a scheduler module's randn_tensor
_TRACE_LOCK = threading.Lock()


class _NoiseTap:
    """Stands in for ``randn_tensor`` during a trace: counts the draws of each step and returns ``make``'s tensor."""

    def __init__(self, make: Callable[[int, tuple[int, ...], torch.dtype], torch.Tensor]):
        self.make = make
        self.step = -1  # the step whose step() is running
        self.draws: dict[int, int] = {}

    def __call__(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        self.draws[self.step] = self.draws.get(self.step, 0) + 1
        return self.make(self.step, shape, dtype)


@contextlib.contextmanager
def _tapped_noise(scheduler: SchedulerMixin, tap: _NoiseTap) -> Iterator[None]:
    """Route the scheduler module's ``randn_tensor`` to ``tap`` for this thread; other threads (a local
    diffusers run, say) keep drawing real noise from their generators."""
    module = sys.modules[type(scheduler).__module__]
    original = getattr(module, "randn_tensor", None)
    if original is None:  # this scheduler never draws
        yield
        return
    tracer = threading.get_ident()

    def randn_tensor(
        shape: Any, generator: Any = None, device: Any = None, dtype: Any = None, layout: Any = None
    ) -> torch.Tensor:
        if threading.get_ident() != tracer:
            return original(shape, generator=generator, device=device, dtype=dtype, layout=layout)
        return tap(tuple(shape), dtype or torch.float32)

    with _TRACE_LOCK:
        module.randn_tensor = randn_tensor
        try:
            yield
        finally:
            module.randn_tensor = original


def _check_strength(strength: Any, n: int) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be a number in [0, 1], got {strength!r}")
    if min(int(n * strength), n) < 1:
        raise ValueError(
            f"strength {strength} of {n} steps runs no step (img2img runs int(steps x strength) of them): "
            "raise the strength or the steps"
        )
    return float(strength)


def _prepared(name: str, scheduler_config: Mapping[str, Any], n: int, strength: float | None):
    """The scheduler after the pipeline's set-up and the timesteps it runs: all of them, or for img2img the last
    ``int(n * strength)`` steps' worth, with the begin index set exactly as StableDiffusionImg2ImgPipeline's
    ``get_timesteps`` does."""
    scheduler = make_scheduler(name, scheduler_config)
    n = _check_num_steps(n, int(scheduler.config.num_train_timesteps))
    scheduler.set_timesteps(n, device="cpu")
    timesteps = scheduler.timesteps
    if strength is not None:
        strength = _check_strength(strength, n)
        t_start = max(n - min(int(n * strength), n), 0)
        timesteps = timesteps[t_start * scheduler.order :]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(t_start * scheduler.order)
    return scheduler, n, timesteps


def model_evaluations(
    name: str, scheduler_config: Mapping[str, Any], num_inference_steps: int, strength: float | None = None
) -> int:
    """How many UNet evaluations diffusers' pipeline makes (img2img: from ``strength`` on)."""
    return len(_prepared(name, scheduler_config, num_inference_steps, strength)[2])


def img2img_start_latent(
    name: str,
    scheduler_config: Mapping[str, Any],
    num_inference_steps: int,
    strength: float,
    init_latents: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """img2img's x_0: the encoded image noised to the plan's first timestep by the scheduler's own ``add_noise``
    (the pipeline's arithmetic and dtype, so the same seed gives the same start)."""
    scheduler, _n, timesteps = _prepared(name, scheduler_config, num_inference_steps, strength)
    return scheduler.add_noise(init_latents, noise, timesteps[:1].repeat(init_latents.shape[0]))


def build_plan(
    name: str, scheduler_config: Mapping[str, Any], num_inference_steps: int, strength: float | None = None
) -> AffinePlan:
    """Derive the affine plan of scheduler ``name`` from the real diffusers implementation.

    The scheduler is driven exactly like ``StableDiffusionPipeline`` does (``set_timesteps``
    on CPU, then ``scale_model_input`` followed by ``step`` at every timestep), but on one-hot
    float64 coefficient vectors.  With ``strength`` (img2img) it runs only the steps
    ``StableDiffusionImg2ImgPipeline`` runs from that strength on; ``x_0`` is then the noised
    image (:func:`img2img_start_latent`).  The result is verified against a numeric run of a
    fresh scheduler before it is returned.
    """
    scheduler, n, timesteps = _prepared(name, scheduler_config, num_inference_steps, strength)
    num_calls = len(timesteps)
    dim = 3 * num_calls + 1  # x_0..x_N, e_0..e_{N-1}, z_0..z_{N-1}
    e_off = num_calls + 1
    z_off = 2 * num_calls + 1

    def onehot(j: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        v = torch.zeros((1, dim), dtype=dtype)  # a batch of one: UniPC's einsum wants a batch axis
        v[0, j] = 1.0
        return v

    tap = _NoiseTap(lambda i, shape, dtype: onehot(z_off + i, dtype))
    steps: list[AffineStep] = []
    for i, t in enumerate(timesteps):
        x_i = onehot(i)
        tap.step = i
        try:
            scaled = scheduler.scale_model_input(x_i, t)
            with _tapped_noise(scheduler, tap):
                out = scheduler.step(model_output=onehot(e_off + i), timestep=t, sample=x_i, return_dict=True)
        except (IndexError, ZeroDivisionError) as exc:
            raise ValueError(
                f"diffusers' {type(scheduler).__name__} cannot run {n} steps with this config "
                f"(it fails at step {i}, timestep {t.item()}: {exc})"
            ) from exc
        scaled_np = scaled.detach().to(torch.float64).cpu().numpy().ravel()
        input_scale = float(scaled_np[i])
        others = np.delete(scaled_np, i)
        if not math.isfinite(input_scale) or input_scale == 0.0 or np.any(others != 0.0):
            raise RuntimeError(f"{name}: scale_model_input at step {i} is not a nonzero scalar multiple")
        vec = out.prev_sample.detach().to(torch.float64).cpu().numpy().ravel()
        if not np.all(np.isfinite(vec)):
            dup = bool((timesteps[1:] == timesteps[:-1]).any()) and name != "plms"
            raise ValueError(
                f"diffusers' {type(scheduler).__name__} produces non-finite values at step {i} for "
                f"num_inference_steps={n}" + (" (its timestep schedule repeats a timestep)" if dup else "")
            )
        scale = float(np.max(np.abs(vec))) or 1.0
        lat = _sparse(vec, 0, num_calls + 1, scale)
        eps = _sparse(vec, e_off, z_off, scale)
        noise = _sparse(vec, z_off, dim, scale)
        if tap.draws.get(i, 0) > 1:
            raise RuntimeError(f"{name}: step {i} draws noise {tap.draws[i]} times; one draw per step is supported")
        if any(j > i for j in lat) or any(k > i for k in eps) or any(k > i for k in noise):
            raise RuntimeError(f"{name}: step {i} references future latents/noise predictions")
        if not lat:
            raise RuntimeError(f"{name}: step {i} does not depend on any latent")
        amax = max(abs(v) for v in lat.values())
        candidates = [j for j, v in lat.items() if abs(v) > _PIVOT_REL * amax]
        pivot = i if i in candidates else max(candidates)
        steps.append(
            AffineStep(
                index=i,
                timestep=_timestep_value(t.item()),
                input_scale=input_scale,
                pivot=pivot,
                latent_coeffs=lat,
                eps_coeffs=eps,
                noise_coeffs=noise,
                draws_noise=i in tap.draws,
            )
        )

    init_sigma = scheduler.init_noise_sigma
    init_sigma = float(init_sigma.item() if isinstance(init_sigma, torch.Tensor) else init_sigma)
    plan = AffinePlan(
        scheduler=name, num_inference_steps=n, init_noise_sigma=init_sigma, steps=tuple(steps), strength=strength
    )
    _self_check(plan, scheduler_config)
    return plan


def _self_check(plan: AffinePlan, scheduler_config: Mapping[str, Any], rtol: float = 1e-4) -> None:
    """Guard against a step that is not actually linear: replay a numeric run and compare."""
    scheduler, _n, timesteps = _prepared(plan.scheduler, scheduler_config, plan.num_inference_steps, plan.strength)
    rng = np.random.default_rng(1234)
    size = (1, 8)
    x = rng.standard_normal(size) * plan.init_noise_sigma
    latents = {0: x}
    eps_hist: dict[int, np.ndarray] = {}
    noise_hist: dict[int, np.ndarray] = {}

    def draw(i: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        noise_hist[i] = rng.standard_normal(shape).astype(np.float32).astype(np.float64)
        return torch.from_numpy(noise_hist[i]).to(dtype)

    tap = _NoiseTap(draw)
    real = torch.from_numpy(x.copy())
    for step, t in zip(plan.steps, timesteps, strict=True):
        i = step.index
        tap.step = i
        eps_hist[i] = rng.standard_normal(size)
        model_in = scheduler.scale_model_input(real, t).to(torch.float64).numpy()
        with _tapped_noise(scheduler, tap):
            real = scheduler.step(torch.from_numpy(eps_hist[i]), t, real, return_dict=True).prev_sample
        real = real.to(torch.float64)
        want_out = real.numpy()
        got_in = step.input_scale * latents[i]
        got_out = apply_step(step, latents, eps_hist, noise_hist)
        for got, want in ((got_in, model_in), (got_out, want_out)):
            err = float(np.max(np.abs(got - want)))
            if not err <= rtol * max(float(np.max(np.abs(want))), 1e-30):
                raise RuntimeError(
                    f"{plan.scheduler}: affine plan disagrees with diffusers at step {i} "
                    f"(max abs error {err:.3g}); the step is probably not affine for this config"
                )
        latents[i + 1] = want_out  # follow the real trajectory so errors don't compound


# --------------------------------------------------------------------------------------
# The two halves of a step (plaintext reference; ciphertext code uses the same coefficients)
# --------------------------------------------------------------------------------------


def _f64(a: Any) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu()
    return np.asarray(a, dtype=np.float64)


def _get(history: Mapping[int, Any], k: int, what: str, step: AffineStep) -> np.ndarray:
    try:
        return _f64(history[k])
    except KeyError:
        raise KeyError(f"step {step.index} needs {what}[{k}] but the history only has {sorted(history)}") from None


def _eps_sum(step: AffineStep, eps_history: Mapping[int, Any]) -> np.ndarray:
    total: np.ndarray | None = None
    for k, c in step.eps_coeffs.items():
        term = c * _get(eps_history, k, "eps_history", step)
        total = term if total is None else total + term
    return np.zeros((), dtype=np.float64) if total is None else total


def server_offset(
    step: AffineStep, eps_history: Mapping[int, np.ndarray], server_multiplies: bool
) -> tuple[float, np.ndarray]:
    """Plaintext part of the server's update ``y = scalar * x_p + offset`` (``p = step.pivot``).

    ``server_multiplies=False`` (fast preset): ``scalar = 1``, ``offset = (1/a_p) sum_k c_k e_k``.
    ``server_multiplies=True`` (paper preset): ``scalar = a_p``, ``offset = sum_k c_k e_k``.
    ``eps_history`` maps step index ``k`` to the guided noise prediction ``e_k``.
    """
    a_p = step.pivot_coeff
    s = _eps_sum(step, eps_history)
    if server_multiplies:
        return a_p, s
    return 1.0, s * (1.0 / a_p)


def client_finish(
    step: AffineStep, y: np.ndarray, latent_history: Mapping[int, np.ndarray], server_multiplies: bool
) -> np.ndarray:
    """Client side after decrypting ``y``: ``x_{i+1} = (a_p y or y) + sum_{j != p} a_j x_j``.

    ``latent_history`` maps ``j`` to the plaintext latent ``x_j`` (only non-pivot ``j`` with a
    nonzero coefficient are read).
    """
    out = _f64(y) if server_multiplies else step.pivot_coeff * _f64(y)
    for j, a in step.latent_coeffs.items():
        if j != step.pivot:
            out = out + a * _get(latent_history, j, "latent_history", step)
    return out


def noise_term(step: AffineStep, noise_history: Mapping[int, Any]) -> np.ndarray:
    """``sum_k d_k z_k``, the fresh-noise part of ``x_{i+1}`` only the client knows (0 for a deterministic step).

    ``noise_history`` maps step index ``k`` to the noise ``z_k`` drawn in that step.
    """
    total = np.zeros((), dtype=np.float64)
    for k, d in step.noise_coeffs.items():
        total = total + d * _get(noise_history, k, "noise_history", step)
    return total


def apply_step(
    step: AffineStep,
    latent_history: Mapping[int, np.ndarray],
    eps_history: Mapping[int, np.ndarray],
    noise_history: Mapping[int, np.ndarray] | None = None,
) -> np.ndarray:
    """Plaintext reference: ``x_{i+1} = sum_j a_j x_j + sum_k c_k e_k`` in float64, plus
    ``sum_k d_k z_k`` when ``noise_history`` is given (without it: the step's deterministic part)."""
    out = _eps_sum(step, eps_history)
    for j, a in step.latent_coeffs.items():
        out = out + a * _get(latent_history, j, "latent_history", step)
    if noise_history is not None:
        out = out + noise_term(step, noise_history)
    return out


# --------------------------------------------------------------------------------------
# Predicted final latent (x0) for previews
# --------------------------------------------------------------------------------------


def x0_coefficients(plan: AffinePlan, scheduler_config: Mapping[str, Any]) -> list[tuple[float, float]]:
    """Per step ``(s_i, q_i)`` with ``x0 = s_i x_i + q_i e_i``: the final latent the step's noise estimate predicts.

    Schedulers that scale the model input (Euler-type, sigma space) have ``x_i = x0 + sigma e_i`` with
    ``input_scale = 1 / sqrt(sigma^2 + 1)``; the others (DDIM, PLMS, DPM-Solver++) work in the variance-preserving
    form ``x_i = sqrt(abar_t) x0 + sqrt(1 - abar_t) e_i``; v- and sample-prediction models (SD 2.x) convert their
    output the way diffusers' schedulers do.
    """
    alphas_cumprod = make_scheduler(plan.scheduler, scheduler_config).alphas_cumprod.to(torch.float64).numpy()
    prediction = scheduler_config.get("prediction_type", "epsilon")
    coeffs: list[tuple[float, float]] = []
    for step in plan.steps:
        if prediction == "sample":
            coeffs.append((0.0, 1.0))
        elif abs(step.input_scale - 1.0) > 1e-12:
            sigma = math.sqrt(max(1.0 / step.input_scale**2 - 1.0, 0.0))
            if prediction == "v_prediction":  # diffusers' Euler: x0 = x / (sigma^2 + 1) - v sigma / sqrt(sigma^2 + 1)
                coeffs.append((1.0 / (sigma**2 + 1.0), -sigma / math.sqrt(sigma**2 + 1.0)))
            else:
                coeffs.append((1.0, -sigma))
        else:
            abar = float(alphas_cumprod[int(round(step.timestep))])
            if prediction == "v_prediction":  # x0 = sqrt(abar) x - sqrt(1 - abar) v
                coeffs.append((math.sqrt(abar), -math.sqrt(1.0 - abar)))
            else:
                coeffs.append((1.0 / math.sqrt(abar), -math.sqrt((1.0 - abar) / abar)))
    return coeffs
