"""The client's session loop: one round trip per denoising step, the latent only ever leaving encrypted.

In a U-shaped split the latent does not leave at all: the client runs the first and last UNet blocks, the
guidance and the scheduler step; the server gets the first blocks' output and returns the last blocks' input.
What each step runs and sends is the split family's step strategy (step_strategies.py); this module drives them.

Qt-free: the CLI, the Python API and the desktop UI all drive ``Generator.generate``.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from hediff.common import he, models, protocol
from hediff.common.errors import Cancelled, UsageError
from hediff.common.img2img import load_init_image, prepare_init_image
from hediff.common.schedulers import AffinePlan, build_plan, img2img_start_latent, noise_term, x0_coefficients
from hediff.common.settings import GenerationSettings
from hediff.desktop.core.backend_client import BackendClient, BackendError, BackendProtocolError, Exchange
from hediff.desktop.core.client_model import ClientModel
from hediff.desktop.core.preview import X0Estimator
from hediff.desktop.core.step_strategies import StepStrategy, strategy_for

# "head" is all UNet work on this machine: in a U-shaped split it includes the tail, guidance and scheduler step
TIMING_KEYS = ("head", "select", "encrypt", "upload", "server_body", "server_he", "download", "decrypt")


class GenerationCancelled(Cancelled):
    pass


# the settings model under the name the engine has always used; one definition in common.settings
GenerationParams = GenerationSettings


@dataclass
class StepUpdate:
    index: int
    total: int
    timestep: int
    latent: np.ndarray  # decrypted x_{i+1}
    preview: Image.Image  # of x0, the final latent this step predicts (of x_{i+1} where that cannot be estimated)
    timings: dict[str, float]
    bytes_sent: int
    bytes_received: int
    encrypted_fraction: float
    elapsed_s: float
    eta_s: float
    sent: list[dict] = field(default_factory=list)  # what this step's request carried: name, kind, shape, bytes
    key_fingerprint: str | None = None


@dataclass
class GenerationResult:
    params: GenerationParams
    image: Image.Image  # the first image (the only one unless params.count > 1)
    latent: np.ndarray  # (C, H, W); (count, C, H, W) for several images
    step_timings: list[dict[str, float]] = field(default_factory=list)
    bytes_sent: list[int] = field(default_factory=list)
    bytes_received: list[int] = field(default_factory=list)
    encrypted_fractions: list[float] = field(default_factory=list)
    setup_s: float = 0.0
    decode_s: float = 0.0
    total_s: float = 0.0
    server_url: str = ""
    mode: str = "split"  # "split" (through a backend) or "on-device" (the whole pipeline in this process)
    key_fingerprint: str | None = None
    images: list[Image.Image] = field(default_factory=list)  # every image, in seed order

    def timing_totals(self) -> dict[str, float]:
        return {k: float(sum(t.get(k, 0.0) for t in self.step_timings)) for k in TIMING_KEYS}

    def save(self, path, include_prompt: bool = False) -> None:
        """The image as PNG with the generation parameters in text chunks (the prompts only if asked)."""
        from pathlib import Path

        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        for k, v in self.metadata(include_prompt).items():
            info.add_text(k, v)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.image.save(path, pnginfo=info)

    def metadata(self, include_prompt: bool = False) -> dict[str, str]:
        """Generation parameters for PNG text chunks; the prompts only when the user asks for them."""
        meta = self.params.to_text(include_prompt)
        meta["hediff:mode"] = self.mode
        meta["hediff:mean_encrypted_fraction"] = (
            f"{np.mean(self.encrypted_fractions) if self.encrypted_fractions else 0:.4f}"
        )
        return meta


def describe_frame(frame: protocol.Frame) -> list[dict]:
    """What a request carries, for showing the user exactly what left the machine."""
    items = [
        {"name": k, "kind": "tensor", "dtype": str(v.dtype), "shape": list(v.shape), "bytes": int(v.nbytes)}
        for k, v in frame.tensors.items()
    ]
    items += [{"name": k, "kind": "ciphertext", "bytes": len(v)} for k, v in frame.blobs.items()]
    return items


class SeedNoise:
    """Every random tensor of one generation, drawn from the seed's CPU generator in the order diffusers'
    pipeline draws them: the initial latents, then each stochastic step's fresh noise, all float32.

    ``count`` images (seeds seed, seed+1, ...) each draw from their own seed's generator, so that each is the
    image a single-image run with its seed makes; their latents are then (count, C, H, W)."""

    def __init__(self, seed: int, count: int = 1):
        self.generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(count)]

    def draw(self, shape: tuple[int, ...], scale: float = 1.0) -> np.ndarray:
        """One draw of the latent ``shape`` ((count, C, H, W) for several images), times ``scale`` in float32 as
        the pipeline multiplies (x_T by init_noise_sigma)."""
        if len(self.generators) == 1:
            return _draw(self.generators[0], shape, scale)
        return np.stack([_draw(g, shape[1:], scale) for g in self.generators])


def _draw(generator: torch.Generator, shape: tuple[int, ...], scale: float) -> np.ndarray:
    noise = torch.randn((1, *shape), generator=generator, dtype=torch.float32)
    return (noise * scale)[0].numpy().astype(np.float64)


class Generator:
    def __init__(self, model: ClientModel, client: BackendClient):
        self.model = model
        self.client = client

    def generate(
        self,
        params: GenerationParams,
        on_step: Callable[[StepUpdate], None] | None = None,
        cancel: threading.Event | None = None,
        key: he.ClientKey | None = None,
    ) -> GenerationResult:
        """Run one generation. ``key``: a stored device key to use; by default a fresh key per generation."""
        params.validate()
        if params.split != self.model.split:
            raise UsageError(f"this client model was loaded for split {self.model.split!r}, not {params.split!r}")
        if tuple(params.lora) != self.model.lora:
            raise UsageError(
                f"this client model was loaded with LoRAs {list(self.model.lora)}, not {list(params.lora)}"
            )
        t_start = time.perf_counter()
        init_image = None
        if params.init_image:  # img2img: the picture sets the size unless width/height ask for another
            init_image = prepare_init_image(
                load_init_image(params.init_image), self.model.vae_scale_factor, params.width, params.height
            )
            params = _with_changes(params, height=int(init_image.shape[2]), width=int(init_image.shape[3]))
        native = self.model.native_size
        params = _with_changes(params, width=params.width or native, height=params.height or native)
        strength = params.strength if init_image is not None else None
        plan = build_plan(params.scheduler, self.model.scheduler_config, params.steps, strength)
        embeds = self.model.encode(params.prompt, params.negative_prompt)
        cond, uncond = embeds["cond"], embeds["uncond"]
        strategy = strategy_for(self.model, params, key)
        params = _with_changes(params, **strategy.settings_overrides)
        session_id, latent_shape = self._open_session(params, plan, embeds, strategy)
        added_cond = None
        if "cond_pooled" in embeds:  # SDXL: what a client-side time embedding adds (U-shaped splits)
            time_ids = np.array([models.add_time_ids(params.height, params.width)], dtype=np.float32)
            added_cond = {"cond_pooled": embeds["cond_pooled"], "uncond_pooled": embeds["uncond_pooled"]}
            added_cond["time_ids"] = time_ids

        result = GenerationResult(params=params, image=None, latent=None, server_url=self.client.url)  # type: ignore[arg-type]
        result.key_fingerprint = strategy.key.fingerprint if strategy.key else None
        seed_noise = SeedNoise(params.seed, params.count)
        if init_image is None:
            history = {0: seed_noise.draw(latent_shape, plan.init_noise_sigma)}
        else:
            history = {0: self._noised_image(init_image, plan, seed_noise)}
        noise_history: dict[int, np.ndarray] = {}  # step -> the fresh noise z it drew; never leaves this machine
        keep = max(plan.client_history_needed(), plan.latent_history_needed())  # latents terms and pivot masks
        strategy.start(plan, latent_shape, cond, uncond, added_cond)
        x0 = X0Estimator(plan, x0_coefficients(plan, self.model.scheduler_config)) if on_step is not None else None
        result.setup_s = time.perf_counter() - t_start
        loop_start = time.perf_counter()
        try:
            for step in plan.steps:
                if cancel is not None and cancel.is_set():
                    raise GenerationCancelled(f"cancelled before step {step.index + 1} of {len(plan.steps)}")
                timings = dict.fromkeys(TIMING_KEYS, 0.0)
                request = strategy.request(step, history, timings)
                if request.encrypted_fraction is not None:
                    result.encrypted_fractions.append(request.encrypted_fraction)
                exchange = self.client.step(session_id, request.frame, on_uploaded=request.on_uploaded)
                _add_exchange_timings(timings, exchange)
                try:
                    x_next = strategy.finish(step, exchange.frame, history, timings)
                except (protocol.ProtocolError, he.HEError) as e:
                    raise BackendProtocolError(f"{self.client.url} sent an unusable step answer: {e}") from None
                if step.draws_noise:  # drawn even when unused (coefficient 0): diffusers' generator advances too
                    noise_history[step.index] = seed_noise.draw(latent_shape)
                # the preview's x0 unmixes this step's noise prediction from the noise-free part of the step
                history[step.index + 1] = x_next
                predicted = x0.update(step, history) if x0 is not None else None
                history[step.index + 1] = x_next + noise_term(step, noise_history)
                for k in [k for k in history if k < step.index + 1 - keep]:
                    del history[k]
                for k in [k for k in noise_history if k <= step.index - plan.noise_history_needed()]:
                    del noise_history[k]
                strategy.forget_before(step.index + 1 - keep)

                result.step_timings.append(timings)
                result.bytes_sent.append(exchange.bytes_sent)
                result.bytes_received.append(exchange.bytes_received)
                if on_step is not None:
                    done = step.index + 1
                    elapsed = time.perf_counter() - loop_start
                    on_step(
                        StepUpdate(
                            index=step.index,
                            total=len(plan.steps),
                            timestep=step.timestep,
                            latent=history[done],
                            preview=self._preview(history[done] if predicted is None else predicted, params),
                            timings=timings,
                            bytes_sent=exchange.bytes_sent,
                            bytes_received=exchange.bytes_received,
                            encrypted_fraction=request.encrypted_fraction or 0.0,
                            elapsed_s=elapsed,
                            eta_s=elapsed / done * (len(plan.steps) - done),
                            sent=describe_frame(request.frame),
                            key_fingerprint=result.key_fingerprint,
                        )
                    )
        finally:
            try:
                self.client.close_session(session_id)
            except BackendError:  # the session expires on its own; closing is a courtesy
                pass

        result.latent = history[len(plan.steps)]
        t = time.perf_counter()
        result.images = [self.model.decode(x) for x in (result.latent if params.count > 1 else [result.latent])]
        result.image = result.images[0]
        result.decode_s = time.perf_counter() - t
        result.total_s = time.perf_counter() - t_start
        return result

    def _noised_image(self, image, plan: AffinePlan, seed_noise: SeedNoise) -> np.ndarray:
        """img2img's x_0, drawn as StableDiffusionImg2ImgPipeline draws it: the VAE's sample, then the noise."""
        latents, noise = [], []
        for generator in seed_noise.generators:  # per image, as a single-image run with its seed draws
            latents.append(self.model.encode_image(image, generator))
            noise.append(torch.randn(tuple(latents[-1].shape), generator=generator, dtype=torch.float32))
        start = img2img_start_latent(
            plan.scheduler,
            self.model.scheduler_config,
            plan.num_inference_steps,
            plan.strength,
            torch.cat(latents),
            torch.cat(noise),
        )
        start = start.cpu().numpy().astype(np.float64)
        return start[0] if len(latents) == 1 else start

    def _open_session(
        self,
        params: GenerationParams,
        plan: AffinePlan,
        embeds: dict[str, np.ndarray],
        strategy: StepStrategy,
    ) -> tuple[str, tuple[int, ...]]:
        """Open the session on the server; its id and the latent shape both sides agreed on."""
        settings = protocol.SessionSettings(
            scheduler=params.scheduler,
            steps=params.steps,
            guidance=params.guidance,
            height=params.height,
            width=params.width,
            split=params.split,
            encryption=params.encryption,
            he_preset=params.he_preset if strategy.key else None,
            activation_dtype=params.activation_dtype,
            plan_digest=plan.digest(),
            weights_digest=self.model.weights_digest,  # the UNet's and every LoRA's with its scale
            strength=plan.strength,
            count=params.count,
        )
        open_frame = protocol.Frame(meta=settings.to_meta(), tensors=dict(embeds))
        open_frame.blobs.update(strategy.open_blobs())
        opened = self.client.open_session(open_frame)
        session_id = opened.get("session_id")
        if not isinstance(session_id, str) or opened.get("plan_digest") != plan.digest():
            raise BackendProtocolError(f"{self.client.url} answered the session request inconsistently")
        latent_shape = tuple(opened.get("latent_shape", ()))
        expected_shape = (
            *((params.count,) if params.count > 1 else ()),
            self.model.latent_channels,
            params.height // self.model.vae_scale_factor,
            params.width // self.model.vae_scale_factor,
        )
        if latent_shape != expected_shape:
            raise BackendProtocolError(
                f"{self.client.url} expects latents of shape {latent_shape}, this client's model makes "
                f"{expected_shape}; use the same model on both sides"
            )
        return session_id, latent_shape

    def _preview(self, latent: np.ndarray, params: GenerationParams) -> Image.Image:
        if latent.ndim == 4:  # several images: the first one's preview
            latent = latent[0]
        return self.model.preview(latent)


def _add_exchange_timings(timings: dict[str, float], exchange: Exchange) -> None:
    """The step's transfer times as the client measured them, and the server's own times from its answer."""
    server = exchange.frame.meta.get("timings", {}) if isinstance(exchange.frame.meta, dict) else {}
    timings["upload"] = exchange.upload_s
    timings["download"] = exchange.download_s
    timings["server_body"] = float(server.get("server_body_s", 0.0))
    timings["server_he"] = float(server.get("server_he_s", 0.0))


def _with_changes(params: GenerationParams, **changes) -> GenerationParams:
    """A copy of ``params`` with ``changes`` (a dataclass here; a pydantic settings model has ``model_copy``)."""
    if dataclasses.is_dataclass(params):
        return dataclasses.replace(params, **changes)
    return params.model_copy(update=changes)
