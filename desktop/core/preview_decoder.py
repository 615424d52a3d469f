"""A tiny latent-to-RGB decoder for per-step previews (TAESD-style), shipped in a model folder beside its VAE.

The full VAE decoder of a 128 px model costs several times a UNet step on a CPU; this one is a few hundred KB of
plain convolutions that draws the picture a latent holds, sharp enough to read shapes and colours, in a few ms.
``python -m training.train`` trains it against the images the VAE was trained on and writes ``preview_decoder/``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from hediff.common.errors import ModelError

PREVIEW_DECODER_DIR = "preview_decoder"


class PreviewDecoderError(ModelError, ValueError):
    """A model folder's preview decoder is unreadable or does not fit the model."""


class _Block(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x):
        return torch.relu(x + self.conv(x))


class TinyDecoder(nn.Module):
    """Scaled latent (N, C, h, w) -> RGB in [-1, 1] (N, 3, h*2^k, w*2^k); k = len(channels) - 1 upsamplings,
    narrowing as the resolution grows so most of the work stays at low resolution."""

    def __init__(self, latent_channels: int = 4, channels=(64, 48, 32, 16)):
        super().__init__()
        self.config = {"latent_channels": latent_channels, "channels": list(channels)}
        layers: list[nn.Module] = [nn.Conv2d(latent_channels, channels[0], 3, padding=1), nn.ReLU()]
        for i, width in enumerate(channels):
            if i:
                layers += [
                    nn.Upsample(scale_factor=2, mode="nearest"),
                    nn.Conv2d(channels[i - 1], width, 3, padding=1),
                    nn.ReLU(),
                ]
            if i < len(channels) - 1:
                layers.append(_Block(width))
        layers.append(nn.Conv2d(channels[-1], 3, 3, padding=1))
        self.net = nn.Sequential(*layers)

    @property
    def scale_factor(self) -> int:
        return 2 ** (len(self.config["channels"]) - 1)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.net(latent)

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.config, indent=2) + "\n", encoding="utf-8")
        # fp16 on disk halves the file; the preview is 8-bit anyway.
        save_file({k: v.half().contiguous() for k, v in self.state_dict().items()}, folder / "model.safetensors")

    @torch.no_grad()
    def to_image(self, latent: np.ndarray) -> Image.Image:
        """One (C, h, w) scaled latent as a PIL image."""
        x = torch.as_tensor(np.asarray(latent, dtype=np.float32))[None]
        rgb = self(x)[0].clamp(-1, 1).add(1).mul(127.5).round().byte().permute(1, 2, 0).numpy()
        return Image.fromarray(rgb)


def load_preview_decoder(model_dir: Path, latent_channels: int, vae_scale_factor: int) -> TinyDecoder | None:
    """The folder's preview decoder, or None when it ships none."""
    folder = Path(model_dir) / PREVIEW_DECODER_DIR
    if not folder.is_dir():
        return None
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        decoder = TinyDecoder(int(config["latent_channels"]), tuple(int(c) for c in config["channels"]))
        decoder.load_state_dict({k: v.float() for k, v in load_file(folder / "model.safetensors").items()})
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as exc:
        raise PreviewDecoderError(
            f"{folder} is not a valid preview decoder ({exc}); delete it to preview without"
        ) from exc
    if decoder.config["latent_channels"] != latent_channels or decoder.scale_factor != vae_scale_factor:
        raise PreviewDecoderError(
            f"{folder} decodes {decoder.config['latent_channels']}-channel latents {decoder.scale_factor}x, but the "
            f"model's VAE has {latent_channels} channels and scale factor {vae_scale_factor}"
        )
    return decoder.eval()
