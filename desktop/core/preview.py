"""Fast per-step previews: a linear latent-to-RGB map, no VAE."""

from __future__ import annotations

import numpy as np
from PIL import Image

# Widely used linear approximation of the SD 1.x VAE decoder (latent channel -> RGB in [-1, 1]).
SD1_LATENT_RGB_FACTORS = np.array(
    [
        [0.298, 0.207, 0.208],
        [0.187, 0.286, 0.173],
        [-0.158, 0.189, 0.264],
        [-0.184, -0.271, -0.473],
    ]
)


def latent_preview(latent: np.ndarray, factors: np.ndarray = SD1_LATENT_RGB_FACTORS, upscale: int = 1) -> Image.Image:
    """A (C, H, W) latent as an RGB image, optionally upscaled (nearest) to the output size."""
    latent = np.asarray(latent, dtype=np.float64)
    if latent.ndim != 3 or latent.shape[0] != factors.shape[0]:
        raise ValueError(f"preview needs a ({factors.shape[0]}, H, W) latent, got {latent.shape}")
    rgb = np.einsum("chw,cr->hwr", latent, factors)
    img = np.clip((rgb + 1.0) * 127.5, 0, 255).round().astype(np.uint8)
    if upscale > 1:
        img = img.repeat(upscale, axis=0).repeat(upscale, axis=1)
    return Image.fromarray(img)
