"""LoRAs on top of a model: parsing ``DIR[:SCALE]``, applying them with diffusers' own LoRA loading (peft), and
the digest of the weights in use that client and server compare.

The client applies a LoRA to its text encoder and UNet layers, the server to its UNet body, at the same scale;
the session's weights digest (:func:`weights_digest`) covers the UNet, every LoRA's tensors and its scale, so a
server with another LoRA or scale refuses the session before the first step instead of making another image.
Applying is diffusers' ``load_lora_weights`` + ``set_adapters`` on a pipeline made of the given components, then
``fuse_lora`` and ``unload_lora_weights``: the modules are plain torch layers again with the LoRA folded in, so
the split's head and body run them like any other weights.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hediff.common.errors import UsageError

__all__ = ["Lora", "LoraError", "apply_loras", "parse_lora", "parse_loras", "weights_digest"]

#: the file diffusers' save_lora_weights writes and load_lora_weights looks for first
DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


class LoraError(UsageError):
    """A LoRA that cannot be used; the text names it and says why."""


@dataclass(frozen=True)
class Lora:
    """One LoRA: its safetensors file and the scale it is applied at."""

    file: Path
    scale: float = 1.0

    def describe(self) -> str:
        return f"{self.file}:{self.scale:g}"


def parse_lora(text: str) -> tuple[str, float]:
    """``DIR[:SCALE]`` -> (DIR, SCALE); the scale is 1 when absent. Checks the form only (no file access), so
    settings can validate it cheaply. A path that itself holds a colon keeps it (``C:/x`` is a path)."""
    if not isinstance(text, str) or not text.strip():
        raise LoraError(f"a LoRA must be given as DIR[:SCALE], got {text!r}")
    path, sep, tail = text.rpartition(":")
    if sep:
        try:
            scale = float(tail)
        except ValueError:
            return text, 1.0  # no scale: the colon belongs to the path
        if not math.isfinite(scale):
            raise LoraError(f"the LoRA scale in {text!r} must be a finite number")
        if not path:
            raise LoraError(f"a LoRA must be given as DIR[:SCALE], got {text!r}")
        return path, scale
    return text, 1.0


def parse_loras(entries: Iterable[str]) -> tuple[Lora, ...]:
    """The LoRAs ``DIR[:SCALE]`` entries name, each resolved to the safetensors file diffusers would load."""
    return tuple(Lora(_weight_file(Path(path)), scale) for path, scale in map(parse_lora, entries))


def _weight_file(path: Path) -> Path:
    if path.is_file():
        if path.suffix != ".safetensors":
            raise LoraError(f"the LoRA {str(path)!r} is not a .safetensors file")
        return path
    if not path.is_dir():
        raise LoraError(f"the LoRA {str(path)!r} does not exist (give its folder or its .safetensors file)")
    if (path / DEFAULT_WEIGHT_NAME).is_file():
        return path / DEFAULT_WEIGHT_NAME
    files = sorted(path.glob("*.safetensors"))
    if len(files) != 1:
        found = ", ".join(f.name for f in files) or "none"
        raise LoraError(
            f"the LoRA folder {str(path)!r} must hold {DEFAULT_WEIGHT_NAME} or exactly one .safetensors file "
            f"(found: {found}); give the file itself"
        )
    return files[0]


def weights_digest(model_path: Path, loras: Sequence[Lora] = ()) -> str:
    """The digest of the UNet weights in use: the model's UNet digest alone without LoRAs (so it stays what it
    always was), else a digest of it, each LoRA's tensors and each scale, in order (order matters to no sum, but
    a different list is a different setting to say so about)."""
    from hediff.common.models import ModelFolderError, _tensor_digests, unet_weights_digest

    base = unet_weights_digest(model_path)
    if not loras:
        return base
    parts: list[Any] = [base]
    for lora in loras:
        try:
            tensors = _tensor_digests(lora.file)
        except ModelFolderError as e:
            raise LoraError(f"the LoRA {str(lora.file)!r} cannot be read: {e}") from None
        parts.append([sorted(tensors.items()), repr(float(lora.scale))])
    return hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode()).hexdigest()


def apply_loras(loras: Sequence[Lora], *, unet=None, text_encoder=None, text_encoder_2=None, xl: bool = False) -> None:
    """Fold ``loras`` into the given modules in place with diffusers' own loading (the parts of a LoRA for a
    module that is not given are skipped, as diffusers skips them for a pipeline without it). ``xl``: an SDXL
    model (its LoRA loader, and ``text_encoder_2``)."""
    if not loras:
        return
    try:
        import peft  # noqa: F401  (diffusers' LoRA loading needs it; say so before diffusers' own message)
    except ImportError:
        raise LoraError("LoRAs need the 'peft' package: pip install peft") from None
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if xl:
        pipe = StableDiffusionXLPipeline(
            vae=None,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=None,
            tokenizer_2=None,
            unet=unet,
            scheduler=None,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=None,
            text_encoder=text_encoder,
            tokenizer=None,
            unet=unet,
            scheduler=None,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    modules = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2 if xl else None}
    modules = {k: m for k, m in modules.items() if m is not None}
    names = [f"lora{i}" for i in range(len(loras))]
    for name, lora in zip(names, loras, strict=True):
        try:
            # load_lora_weights' own steps, for the given modules only (it wants every module of a pipeline)
            extra = {"unet_config": unet.config} if xl and unet is not None else {}
            state_dict, alphas, metadata = pipe.lora_state_dict(
                str(lora.file.parent), weight_name=lora.file.name, return_lora_metadata=True, **extra
            )
            if not all("lora" in key for key in state_dict):
                raise ValueError("not a LoRA checkpoint: every tensor name must contain 'lora'")
            common = {"network_alphas": alphas, "adapter_name": name, "metadata": metadata, "_pipeline": pipe}
            for component, module in modules.items():
                if component == "unet":
                    pipe.load_lora_into_unet(state_dict, unet=module, **common)
                else:
                    pipe.load_lora_into_text_encoder(state_dict, text_encoder=module, prefix=component, **common)
        except (ValueError, KeyError, OSError, RuntimeError) as e:
            raise LoraError(f"the LoRA {str(lora.file)!r} does not fit this model: {e}") from None
    pipe.set_adapters(names, adapter_weights=[lora.scale for lora in loras])
    pipe.fuse_lora(components=list(modules), adapter_names=names)
    pipe.unload_lora_weights()
