"""Private on this device: the whole generation in this process, no server, no HE, nothing sent anywhere.

The same interface as the split client (:class:`~hediff.desktop.core.engine.Generator`): ``generate(params,
on_step, cancel)`` returns a :class:`GenerationResult` and reports a :class:`StepUpdate` per step, so the CLI,
the Python API and the app drive both alike. Every step's update says that nothing left the machine.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from hediff.common.errors import UsageError
from hediff.common.img2img import load_init_image, prepare_init_image
from hediff.common.local_pipeline import LocalPipeline, LocalStep, PipelineCancelled
from hediff.desktop.core.engine import (
    TIMING_KEYS,
    GenerationCancelled,
    GenerationParams,
    GenerationResult,
    StepUpdate,
)
from hediff.desktop.core.preview import PreviewRenderer

#: What the result and the UI show where a split generation shows its server's URL.
ON_DEVICE_LOCATION = "this device"


class OnDeviceGenerator:
    """The whole pipeline of one model folder, loaded once, generating in process."""

    def __init__(self, model_path: Path, device: str = "cpu", lora: tuple[str, ...] = ()):
        self.lora = tuple(lora)
        self.pipeline = LocalPipeline(model_path, device=device, lora=self.lora)
        self.preview = PreviewRenderer.for_model(
            Path(model_path),
            self.pipeline.decode_latent,
            self.pipeline.latent_channels,
            self.pipeline.vae_scale_factor,
            self.pipeline.pipe.vae.config.block_out_channels,
        )
        self.native_size = self.pipeline.native_size

    def generate(
        self,
        params: GenerationParams,
        on_step: Callable[[StepUpdate], None] | None = None,
        cancel: threading.Event | None = None,
        key=None,
    ) -> GenerationResult:
        """Run one generation on this device. ``key`` is accepted for interface parity and must be None:
        nothing is encrypted here."""
        if key is not None:
            raise UsageError("a generation on this device encrypts nothing: do not pass a key")
        params.validate()
        if tuple(params.lora) != self.lora:
            raise UsageError(f"this model was loaded with LoRAs {list(self.lora)}, not {list(params.lora)}")
        init_image = load_init_image(params.init_image) if params.init_image else None
        if init_image is not None:  # the picture's size, as the split client records it
            size = prepare_init_image(init_image, self.pipeline.vae_scale_factor, params.width, params.height).shape
            params = dataclasses.replace(params, height=int(size[2]), width=int(size[3]))
        native = self.native_size
        # nothing is encrypted here: the record says so
        params = dataclasses.replace(
            params, width=params.width or native, height=params.height or native, encryption="none"
        )
        result = GenerationResult(
            params=params, image=None, latent=None, server_url=ON_DEVICE_LOCATION, mode="on-device"
        )  # type: ignore[arg-type]
        t_start = time.perf_counter()
        loop_start = t_start

        def report(step: LocalStep) -> None:
            nonlocal loop_start
            if step.index == 0:
                loop_start = time.perf_counter() - step.step_s
            timings = dict.fromkeys(TIMING_KEYS, 0.0)
            timings["head"] = step.step_s  # all UNet work ran here
            result.step_timings.append(timings)
            result.bytes_sent.append(0)
            result.bytes_received.append(0)
            if on_step is None:
                return
            done = step.index + 1
            elapsed = time.perf_counter() - loop_start
            on_step(
                StepUpdate(
                    index=step.index,
                    total=step.total,
                    timestep=step.timestep,
                    latent=step.latent,
                    # the final image this step predicts (x0), of the first image when there are several
                    preview=self.preview(_first(step.x0 if step.x0 is not None else step.latent)),
                    timings=timings,
                    bytes_sent=0,
                    bytes_received=0,
                    encrypted_fraction=0.0,
                    elapsed_s=elapsed,
                    eta_s=elapsed / done * (step.total - done),
                    sent=[],
                    key_fingerprint=None,
                )
            )

        try:
            out = self.pipeline.generate(
                prompt=params.prompt,
                negative_prompt=params.negative_prompt,
                steps=params.steps,
                guidance=params.guidance,
                seed=params.seed,
                width=params.width,
                height=params.height,
                scheduler=params.scheduler,
                on_step=report,
                cancel=cancel,
                init_image=init_image,
                strength=params.strength,
                count=params.count,
            )
        except PipelineCancelled as e:
            raise GenerationCancelled(str(e)) from None
        result.latent = out.latent
        result.image = out.image
        result.images = out.images
        result.decode_s = out.decode_s
        result.setup_s = loop_start - t_start
        result.total_s = time.perf_counter() - t_start
        return result


def _first(latent: np.ndarray) -> np.ndarray:
    return latent[0] if latent.ndim == 4 else latent
