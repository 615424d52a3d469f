"""img2img's input: the user's picture, read and prepared exactly as diffusers' StableDiffusionImg2ImgPipeline
prepares it (the same resizing and scaling to [-1, 1]), so that the same seed gives the pipeline's image.

The picture is the most private input of all: it is read and encoded on the user's machine only; what leaves is
what the chosen split sends of the noised latent (common.schedulers.img2img_start_latent makes it).
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from hediff.common.errors import UsageError

__all__ = ["InitImageError", "load_init_image", "prepare_init_image", "resize_init_image"]


class InitImageError(UsageError):
    """The init image cannot be used; the text says why and what to do."""


def load_init_image(path: str | Path) -> Image.Image:
    """The picture at ``path`` as RGB (an alpha channel or a palette would give the VAE other channels)."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise InitImageError(f"the init image {str(path)!r} does not exist") from None
    except (UnidentifiedImageError, OSError) as e:
        raise InitImageError(f"the init image {str(path)!r} is not a readable picture (PNG, JPEG): {e}") from None


def prepare_init_image(image: Image.Image, vae_scale_factor: int, width: int = 0, height: int = 0) -> torch.Tensor:
    """(1, 3, H, W) float32 in [-1, 1], as the pipeline's image processor makes it: the picture's own size
    rounded down to a multiple of ``vae_scale_factor`` unless ``width``/``height`` (non-zero) ask for another."""
    from diffusers.image_processor import VaeImageProcessor

    processor = VaeImageProcessor(vae_scale_factor=vae_scale_factor)
    if min(image.size) < vae_scale_factor:
        raise InitImageError(
            f"the init image is {image.size[0]}x{image.size[1]} pixels; each side needs at least {vae_scale_factor}"
        )
    return processor.preprocess(image, height=height or None, width=width or None).to(torch.float32)


def resize_init_image(image: Image.Image, vae_scale_factor: int, width: int = 0, height: int = 0) -> Image.Image:
    """The picture at the size asked for (the pipeline then prepares it as :func:`prepare_init_image` does)."""
    from diffusers.image_processor import VaeImageProcessor

    if not (width or height):
        return image
    processor = VaeImageProcessor(vae_scale_factor=vae_scale_factor)
    height, width = processor.get_default_height_width(image, height or None, width or None)
    return processor.resize(image, height, width)
