"""Per-step previews: the model's own tiny preview decoder where it ships one, else its VAE where that is cheap,
else a fast linear latent-to-RGB map; and the final latent each step predicts (x0), which is what a preview
should show.

A model folder may ship its own fitted map as ``preview.json`` (``{"factors": C x 3, "bias": 3}``, what
``python -m training.train`` writes for the embedded model); SD 1.x folders without one use the widely used
SD 1.x factors.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from hediff.common.errors import ModelError

if TYPE_CHECKING:
    from hediff.common.schedulers import AffinePlan, AffineStep
    from hediff.desktop.core.preview_decoder import TinyDecoder

# Widely used linear approximation of the SD 1.x VAE decoder (latent channel -> RGB in [-1, 1]).
SD1_LATENT_RGB_FACTORS = np.array(
    [
        [0.298, 0.207, 0.208],
        [0.187, 0.286, 0.173],
        [-0.158, 0.189, 0.264],
        [-0.184, -0.271, -0.473],
    ]
)


@dataclass(frozen=True)
class PreviewMap:
    factors: np.ndarray  # (C, 3)
    bias: np.ndarray  # (3,)
    source: str


SD1_PREVIEW_MAP = PreviewMap(SD1_LATENT_RGB_FACTORS, np.zeros(3), "SD 1.x factors")


class PreviewMapError(ModelError, ValueError):
    """A model folder's preview.json is unreadable or has the wrong shape."""


def load_preview_map(model_dir: Path, latent_channels: int = 4) -> PreviewMap:
    """The model's own ``preview.json`` if it has one, else the SD 1.x factors."""
    path = Path(model_dir) / "preview.json"
    if not path.is_file():
        return SD1_PREVIEW_MAP
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        factors = np.asarray(data["factors"], dtype=np.float64)
        bias = np.asarray(data.get("bias", [0.0, 0.0, 0.0]), dtype=np.float64)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PreviewMapError(f"{path} is not a valid preview map ({exc}); delete it to use the SD 1.x one") from exc
    if factors.shape != (latent_channels, 3) or bias.shape != (3,) or not np.all(np.isfinite(factors)):
        raise PreviewMapError(
            f"{path}: factors must be {latent_channels}x3 and bias 3 finite numbers, got {factors.shape}, {bias.shape}"
        )
    return PreviewMap(factors, bias, str(path))


def latent_preview(
    latent: np.ndarray, factors: np.ndarray | PreviewMap = SD1_LATENT_RGB_FACTORS, upscale: int = 1
) -> Image.Image:
    """A (C, H, W) latent as an RGB image, optionally upscaled (nearest) to the output size."""
    if isinstance(factors, PreviewMap):
        factors, bias = factors.factors, factors.bias
    else:
        bias = np.zeros(3)
    latent = np.asarray(latent, dtype=np.float64)
    if latent.ndim != 3 or latent.shape[0] != factors.shape[0]:
        raise ValueError(f"preview needs a ({factors.shape[0]}, H, W) latent, got {latent.shape}")
    rgb = np.einsum("chw,cr->hwr", latent, factors) + bias
    img = np.clip((rgb + 1.0) * 127.5, 0, 255).round().astype(np.uint8)
    if upscale > 1:
        img = img.repeat(upscale, axis=0).repeat(upscale, axis=1)
    return Image.fromarray(img)


# A VAE decode's work, in output pixels x sum of its levels' squared widths: a 64 px decode through a 3-level
# (16, 32, 64) VAE is 2.2e7 (10 ms on the project's 2-core CPU), SD 1.5's 512 px one 1.6e11 (seconds). A decode of
# at most this much runs every step (for a model without a preview decoder); more, and the linear map is used.
VAE_PREVIEW_MAX_WORK = 1e8


def vae_decode_work(latent_hw: tuple[int, int], vae_scale_factor: int, vae_block_channels) -> float:
    pixels = latent_hw[0] * latent_hw[1] * vae_scale_factor**2
    return float(pixels * sum(int(c) ** 2 for c in vae_block_channels))


class PreviewRenderer:
    """What a step's preview shows of a (C, H, W) latent: the model's tiny preview decoder if it ships one (a few
    ms at any size); else the model's own VAE decode when that is cheap (a small model or a small image: the
    picture exactly as it will decode); else the linear map."""

    def __init__(
        self,
        decode: Callable[[np.ndarray], Image.Image] | None,
        preview_map: PreviewMap,
        upscale: int,
        vae_block_channels=(),
        max_work: float = VAE_PREVIEW_MAX_WORK,
        tiny_decoder: TinyDecoder | None = None,
    ):
        self._decode, self.preview_map, self.upscale = decode, preview_map, upscale
        self.vae_block_channels, self.max_work = tuple(vae_block_channels), max_work
        self.tiny_decoder = tiny_decoder

    @classmethod
    def for_model(
        cls,
        model_dir: Path,
        decode: Callable[[np.ndarray], Image.Image],
        latent_channels: int,
        vae_scale_factor: int,
        vae_block_channels,
    ) -> PreviewRenderer:
        """The renderer of a model folder: its ``preview_decoder/`` and ``preview.json`` when it has them."""
        from hediff.desktop.core.preview_decoder import load_preview_decoder

        return cls(
            decode,
            load_preview_map(model_dir, latent_channels),
            vae_scale_factor,
            vae_block_channels,
            tiny_decoder=load_preview_decoder(model_dir, latent_channels, vae_scale_factor),
        )

    def uses_vae(self, latent_hw: tuple[int, int]) -> bool:
        if self.tiny_decoder is not None or self._decode is None or not self.vae_block_channels:
            return False
        return vae_decode_work(latent_hw, self.upscale, self.vae_block_channels) <= self.max_work

    def __call__(self, latent: np.ndarray) -> Image.Image:
        if self.tiny_decoder is not None:
            return self.tiny_decoder.to_image(latent)
        if self.uses_vae(tuple(latent.shape[-2:])):
            return self._decode(latent)
        if latent.shape[0] != self.preview_map.factors.shape[0]:  # the linear map fits its channel count only
            return Image.new("RGB", (latent.shape[-1] * self.upscale, latent.shape[-2] * self.upscale))
        return latent_preview(latent, self.preview_map, self.upscale)


class X0Estimator:
    """The final latent each step predicts, from the latents alone.

    A step is ``x_{i+1} = sum_j a_j x_j + sum_k c_k e_k``: knowing the x's (the client decrypts them) and the
    earlier noise estimates, the step's own estimate is ``e_i = (x_{i+1} - sum_j a_j x_j - sum_{k<i} c_k e_k) / c_i``,
    and ``x0 = s_i x_i + q_i e_i`` (:func:`hediff.common.schedulers.x0_coefficients`). This works for every split,
    including those where the server computes e_i and never sends it. x_t itself is mostly noise until the last
    steps; x0 shows what the picture will be after a few.
    """

    def __init__(self, plan: AffinePlan, x0_coeffs: list[tuple[float, float]]):
        self._coeffs = x0_coeffs
        self._keep = max(plan.eps_history_needed(), 1)
        self._eps: dict[int, np.ndarray] = {}

    def update(self, step: AffineStep, history: Mapping[int, np.ndarray]) -> np.ndarray | None:
        """x0 predicted at ``step``, once ``history`` holds ``x_{step.index + 1}``; None if the step has no e_i."""
        i = step.index
        c_i = step.eps_coeffs.get(i)
        rest = history[i + 1] - sum(a * history[j] for j, a in step.latent_coeffs.items())
        for k, c in step.eps_coeffs.items():
            if k != i:
                if k not in self._eps:  # an earlier step had no own estimate: this one cannot be recovered
                    return None
                rest = rest - c * self._eps[k]
        for k in [k for k in self._eps if k <= i - self._keep]:
            del self._eps[k]
        if not c_i:
            return None
        self._eps[i] = rest / c_i
        s, q = self._coeffs[i]
        return s * history[i] + q * self._eps[i]
