"""Fast per-step previews: a linear latent-to-RGB map, no VAE.

A model folder may ship its own fitted map as ``preview.json`` (``{"factors": C x 3, "bias": 3}``, what
``python -m training.train`` writes for the embedded model); SD 1.x folders without one use the widely used
SD 1.x factors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from hediff.common.errors import ModelError

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
