"""The whole Stable Diffusion pipeline in one process: nothing is split, encrypted or sent anywhere.

This is what runs where the data may be seen in the clear: on the user's own device ("Private: this device")
and inside an attested confidential VM. It is diffusers' own ``StableDiffusionPipeline`` with our scheduler
factory, so the same seed gives exactly diffusers' image; a per-step callback reports the latent and the time
the UNet took, and can cancel between steps.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hediff.common import models
from hediff.common.img2img import resize_init_image
from hediff.common.lora import parse_loras
from hediff.common.schedulers import build_plan, make_scheduler, model_evaluations, x0_coefficients


class PipelineCancelled(Exception):
    """The caller's cancel event was set; raised between two steps."""


@dataclass(frozen=True)
class LocalStep:
    index: int  # 0-based model evaluation
    total: int  # model evaluations in this run (PLMS counts its warm-up evaluation)
    timestep: int
    latent: np.ndarray  # (C, h, w) float64 after this step
    step_s: float  # wall time of this step (UNet on both guidance branches + scheduler)
    x0: np.ndarray | None = None  # the final latent this step's noise estimate predicts (same shape as latent)


@dataclass(frozen=True)
class LocalOutput:
    latent: np.ndarray  # (C, h, w) float64, (count, C, h, w) for several: the final latent, before VAE scaling
    image: Image.Image  # the first image
    decode_s: float
    images: list[Image.Image] = field(default_factory=list)


class LocalPipeline:
    """A loaded model folder, ready to generate in process."""

    def __init__(
        self, model_path: Path, device: str = "cpu", dtype: torch.dtype = torch.float32, lora: tuple[str, ...] = ()
    ):
        """``lora``: ``DIR[:SCALE]`` entries, loaded with diffusers' ``load_lora_weights`` and ``set_adapters``
        exactly as a diffusers user would."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        self.path = Path(model_path)
        models.validate_model_folder(self.path)
        self.xl = models.model_family(self.path) == "sdxl"
        if self.xl:
            self.pipe = StableDiffusionXLPipeline.from_pretrained(
                self.path, dtype=dtype, **models.diffusers_load_kwargs()
            ).to(device)
        else:
            self.pipe = StableDiffusionPipeline.from_pretrained(
                self.path,
                safety_checker=None,
                requires_safety_checker=False,
                dtype=dtype,
                **models.diffusers_load_kwargs(),
            ).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        loras = parse_loras(lora)
        if loras:
            names = [f"lora{i}" for i in range(len(loras))]
            for name, item in zip(names, loras, strict=True):
                self.pipe.load_lora_weights(str(item.file.parent), weight_name=item.file.name, adapter_name=name)
            self.pipe.set_adapters(names, adapter_weights=[item.scale for item in loras])
        self.scheduler_config = dict(self.pipe.scheduler.config)
        self.vae_scale_factor = int(self.pipe.vae_scale_factor)
        self.native_size = int(self.pipe.unet.config.sample_size) * self.vae_scale_factor
        self.latent_channels = int(self.pipe.unet.config.in_channels)
        self._img2img_pipe = None

    def generate(
        self,
        *,
        prompt: str,
        negative_prompt: str,
        steps: int,
        guidance: float,
        seed: int,
        width: int,
        height: int,
        scheduler: str,
        on_step: Callable[[LocalStep], None] | None = None,
        cancel: threading.Event | None = None,
        init_image: Image.Image | None = None,
        strength: float = 0.8,
        count: int = 1,
    ) -> LocalOutput:
        """``init_image``: img2img with diffusers' StableDiffusionImg2ImgPipeline (same weights) from that
        picture at ``strength``; its size wins unless ``width``/``height`` (non-zero) ask for another.
        ``count``: that many images in one batch, image i drawn from seed ``seed + i``'s own generator."""
        pipe = self.pipe if init_image is None else self._img2img()
        pipe.scheduler = make_scheduler(scheduler, self.scheduler_config)
        img2img_strength = None if init_image is None else strength
        total = model_evaluations(scheduler, self.scheduler_config, steps, img2img_strength)
        last = time.perf_counter()
        seen = _watch_scheduler_steps(pipe.scheduler) if on_step is not None else None
        x0_coeffs = None
        if on_step is not None:
            plan = build_plan(scheduler, self.scheduler_config, steps, img2img_strength)
            x0_coeffs = x0_coefficients(plan, self.scheduler_config)

        def callback(_pipe, i: int, t, tensors: dict) -> dict:
            nonlocal last
            now = time.perf_counter()
            latent = _latent(tensors["latents"], count)
            if on_step is not None:
                x0 = None
                if seen and i < len(x0_coeffs):  # the step's own noise estimate and the latent it started from
                    s, q = x0_coeffs[i]
                    eps, sample = seen.pop()
                    x0 = _latent(s * sample.double() + q * eps.double(), count)
                on_step(LocalStep(index=i, total=total, timestep=int(t), latent=latent, step_s=now - last, x0=x0))
            if cancel is not None and cancel.is_set() and i + 1 < total:
                raise PipelineCancelled(f"cancelled after step {i + 1} of {total}")
            last = time.perf_counter()
            return {}

        if cancel is not None and cancel.is_set():
            raise PipelineCancelled(f"cancelled before step 1 of {total}")
        if init_image is None:
            inputs = {"height": height, "width": width}
        else:
            inputs = {
                "image": resize_init_image(init_image, self.vae_scale_factor, width, height),
                "strength": strength,
            }
        with torch.no_grad():
            latents = pipe(
                prompt=prompt,
                # empty: no negative prompt (SDXL then uses zeros where its folder says so; SD encodes "")
                negative_prompt=negative_prompt or None,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(count)],
                num_images_per_prompt=count,
                output_type="latent",
                callback_on_step_end=callback,
                **inputs,
            ).images
            t = time.perf_counter()
            images = [self.decode(latents[i : i + 1]) for i in range(count)]
        return LocalOutput(
            latent=_latent(latents, count), image=images[0], decode_s=time.perf_counter() - t, images=images
        )

    def _img2img(self):
        """diffusers' img2img pipeline on the loaded components (no second copy of the weights)."""
        if self._img2img_pipe is None:
            from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline

            cls = StableDiffusionXLImg2ImgPipeline if self.xl else StableDiffusionImg2ImgPipeline
            self._img2img_pipe = cls(**self.pipe.components)
            self._img2img_pipe.set_progress_bar_config(disable=True)
        return self._img2img_pipe

    def decode_latent(self, latent: np.ndarray) -> Image.Image:
        """One image's (C, h, w) latent as the pipeline decodes it (what a preview of it shows)."""
        return self.decode(torch.from_numpy(np.asarray(latent, dtype=np.float32)[None]).to(self.pipe.vae.device))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> Image.Image:
        """Exactly the pipeline's own decode and post-processing of one image."""
        vae = self.pipe.vae
        image = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type="pil", do_denormalize=[True])[0]


def _watch_scheduler_steps(scheduler) -> list:
    """Keeps what each ``scheduler.step(model_output, timestep, sample)`` call gets (the guided noise estimate and
    the latent before the step) for the step's preview; the call itself is unchanged."""
    seen: list = []
    step = scheduler.step

    # wraps: pipelines read step's signature to decide whether to pass the generator (ancestral samplers draw from
    # it); without the original signature they would not, and the noise would come from torch's global generator
    @functools.wraps(step)
    def watched(model_output, timestep, sample, *args, **kwargs):
        seen[:] = [(model_output.detach(), sample.detach())]
        return step(model_output, timestep, sample, *args, **kwargs)

    scheduler.step = watched
    return seen


def _latent(latents: torch.Tensor, count: int) -> np.ndarray:
    """float64 (C, h, w) of one image, (count, C, h, w) of several: the split client's shapes."""
    out = latents.double().cpu().numpy()
    return out[0] if count == 1 else out
