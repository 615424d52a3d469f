"""Stable Diffusion 1.x / 2.x model folders: resolving, validating, loading, the UNet weight digest, and tiny
test models.

A *model folder* is a diffusers-format Stable Diffusion 1.x or 2.x directory (a ``StableDiffusionPipeline``;
SD 2.x differs only in configs: v-prediction, linear projections, upcast attention, a wider text encoder)::

    model_index.json
    unet/{config.json, diffusion_pytorch_model.safetensors}
    vae/{config.json, diffusion_pytorch_model.safetensors}
    text_encoder/{config.json, model.safetensors}
    tokenizer/{vocab.json, merges.txt | tokenizer.json, ...}
    scheduler/scheduler_config.json

Only safetensors weights are supported (never pickle ``.bin`` / ``.ckpt`` files).

``build_tiny_model`` writes a small randomly initialised but complete SD 1.x folder that loads offline
with ``StableDiffusionPipeline.from_pretrained``; it is for tests only. ``resolve_model("embedded")`` never
falls back to it: an install without the shipped model is an error, not a generator of noise.

This module must stay importable without any GUI or web framework.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch

from hediff.common.errors import ModelError

__all__ = [
    "EMBEDDED_MODEL_DIR",
    "REPO_ROOT",
    "SD15_SCHEDULER_CONFIG",
    "SD15_UNET_CONFIG",
    "ModelFolderError",
    "ModelNotFoundError",
    "CLIP_TOKENIZER_CONFIG",
    "build_tiny_model",
    "build_tiny_sd2_model",
    "build_tiny_sdxl_model",
    "count_prompt_tokens",
    "encode_prompt",
    "load_scheduler_config",
    "load_text_encoder",
    "load_tokenizer",
    "load_unet",
    "load_unet_config",
    "load_vae",
    "model_family",
    "prompt_is_truncated",
    "prompt_token_count",
    "resolve_model",
    "tiny_clip_vocab",
    "unet_weight_files",
    "vae_scale_factor",
    "unet_weights_digest",
    "validate_model_folder",
    "write_clip_tokenizer",
    "diffusers_load_kwargs",
]

#: The folder that holds common/ and assets/: the repository in a source checkout or an editable install,
#: ``site-packages/hediff`` in an installed wheel (pyproject.toml maps the package ``hediff.assets`` to assets/).
#: Only source-tree tools (training, bench, tests) may treat it as the repository.
REPO_ROOT = Path(__file__).resolve().parents[1]
EMBEDDED_MODEL_DIR = REPO_ROOT / "assets" / "embedded"
#: Optional file in a model folder: the generation settings its makers measured to work best.
RECOMMENDED_SETTINGS_FILE = "hediff.json"

#: UNet config of Stable Diffusion 1.5 (``unet/config.json`` of runwayml/stable-diffusion-v1-5, minus the
#: ``_class_name``/``_diffusers_version`` bookkeeping keys). ``UNet2DConditionModel.from_config(...)`` of it has
#: ~860M parameters (3.4 GB in fp32).
SD15_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
}

#: The SD 1.x scheduler config (PNDM, as shipped with SD 1.4/1.5).
SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "prediction_type": "epsilon",
    "trained_betas": None,
}

# Files snapshot_download fetches for a hub model: configs, safetensors weights and tokenizer files only.
_HUB_ALLOW_PATTERNS = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.safetensors.index.json",
    "unet/diffusion_pytorch_model-*-of-*.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder/model.safetensors.index.json",
    "text_encoder/model-*-of-*.safetensors",
    "tokenizer/*.json",
    "tokenizer/*.txt",
    RECOMMENDED_SETTINGS_FILE,
]

_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

_FIX_HINT = (
    "Point to a complete Stable Diffusion 1.x model folder in diffusers format with safetensors weights "
    "(e.g. re-download it with resolve_model('<org>/<name>') or "
    "huggingface_hub.snapshot_download), or use 'embedded'."
)


class ModelFolderError(ModelError, ValueError):
    """A model folder is missing a file or has an unreadable/corrupt one."""


class ModelNotFoundError(ModelError, FileNotFoundError):
    """A model spec could not be resolved to a local folder (no such directory, hub offline, unknown repo)."""


# --------------------------------------------------------------------------------------------------------
# Tiny model
# --------------------------------------------------------------------------------------------------------


def tiny_clip_vocab() -> dict[str, int]:
    """Char-level CLIP vocabulary: 256 byte chars, the same with '</w>', then the two special tokens (514)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}


def _tiny_unet_config() -> dict[str, Any]:
    return {
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": 32,
        # diffusers' (mis-named) attention_head_dim = number of heads: 4 heads of 8 (block 0) / 16 channels.
        "attention_head_dim": 4,
        "norm_num_groups": 8,
    }


def _tiny_sd2_unet_config() -> dict[str, Any]:
    """The tiny UNet with SD 2.x's differences: per-block head counts, linear projections in the transformers,
    attention upcast to float32, and a wider text embedding (SD 2.x: 1024 instead of 768)."""
    return {
        **_tiny_unet_config(),
        "cross_attention_dim": 48,
        "attention_head_dim": [2, 4],  # a list, as SD 2.x's [5, 10, 20, 20]: heads per down block
        "use_linear_projection": True,
        "upcast_attention": True,
    }


#: The SD 2.x (768 px, v-prediction) scheduler config: DDIM, as shipped with stabilityai/stable-diffusion-2-1.
SD2_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "prediction_type": "v_prediction",
    "trained_betas": None,
}


#: tokenizer_config.json of a CLIP tokenizer folder with SD 1.x settings.
CLIP_TOKENIZER_CONFIG: dict[str, Any] = {
    "tokenizer_class": "CLIPTokenizer",
    "model_max_length": 77,
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
    "do_lower_case": True,
    "clean_up_tokenization_spaces": False,
}


def write_clip_tokenizer(tok_dir: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """Write ``vocab.json`` + ``merges.txt`` + ``tokenizer_config.json``, the files transformers 4 and 5 load."""
    tok_dir = Path(tok_dir)
    tok_dir.mkdir(parents=True, exist_ok=True)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (tok_dir / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(CLIP_TOKENIZER_CONFIG, indent=2), encoding="utf-8")


def _write_tiny_tokenizer(tok_dir: Path, pad_token: str = "<|endoftext|>") -> None:
    write_clip_tokenizer(tok_dir, tiny_clip_vocab(), [])
    if pad_token != CLIP_TOKENIZER_CONFIG["pad_token"]:  # SD 2.x pads with "!"
        config = {**CLIP_TOKENIZER_CONFIG, "pad_token": pad_token}
        (Path(tok_dir) / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def _tiny_vae(**overrides):
    """The test models' two-level VAE (random weights from the caller's seed)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        **overrides,
    )


def build_tiny_model(path: Path, seed: int = 0) -> Path:
    """Write a tiny, complete, randomly initialised Stable Diffusion 1.x diffusers folder to ``path``.

    Deterministic given ``seed`` (``torch.manual_seed`` before each component). Loadable offline with
    ``StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)``.
    Sizes: UNet (32, 64) channels / sample_size 16, VAE scale factor 2 (32x32 px <-> 4x16x16 latents),
    CLIP text encoder with hidden size 32 and a 514-entry char-level vocabulary. Takes well under a second.

    Weight scale: with diffusers' default initialisation this UNet already predicts noise with std ~0.3
    (checked over timesteps 1..999), so no rescaling is applied; split/parity tests therefore compare
    values of order 0.1-1 rather than near-zero outputs. Decoded images are random-looking (untrained).
    """
    from diffusers import PNDMScheduler

    # from_config keeps "clip_sample" (not a PNDM argument, but present in the real SD 1.x scheduler_config.json).
    scheduler = PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    return _build_tiny(path, seed, _tiny_unet_config(), {"hidden_size": 32, "hidden_act": "quick_gelu"}, scheduler)


def build_tiny_sd2_model(path: Path, seed: int = 0) -> Path:
    """Like :func:`build_tiny_model`, an SD 2.x-style folder: v-prediction (DDIM, SD 2.1's scheduler config),
    ``use_linear_projection``, ``upcast_attention``, per-block ``attention_head_dim``, a CLIP text encoder with
    ``hidden_act="gelu"`` and hidden size 48, and SD 2.x's ``"!"`` padding token."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(SD2_SCHEDULER_CONFIG)
    text = {"hidden_size": 48, "hidden_act": "gelu"}
    return _build_tiny(path, seed, _tiny_sd2_unet_config(), text, scheduler, pad_token="!")


def _build_tiny(
    path: Path,
    seed: int,
    unet_config: dict[str, Any],
    text_config: dict[str, Any],
    scheduler: Any,
    pad_token: str = "<|endoftext|>",
) -> Path:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    # fork_rng: building must not disturb the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config)

        torch.manual_seed(seed + 1)
        vae = _tiny_vae()

        torch.manual_seed(seed + 2)
        vocab = tiny_clip_vocab()
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(vocab),
                intermediate_size=37,
                projection_dim=text_config["hidden_size"],
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=CLIP_TOKENIZER_CONFIG["model_max_length"],
                bos_token_id=vocab["<|startoftext|>"],
                eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=vocab[pad_token],
                **text_config,
            )
        )

        # The tokenizer is loaded from written vocab/merges files, proving that from-file loading works.
        with tempfile.TemporaryDirectory(prefix="hediff-tok-") as tmp:
            _write_tiny_tokenizer(Path(tmp), pad_token)
            tokenizer = CLIPTokenizer.from_pretrained(tmp, local_files_only=True)

    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    # transformers 5 saves tokenizer.json + a tokenizer_config.json with load-time noise ("is_local", ...)
    # and no vocab.json. Rewrite the plain files so the folder also loads with transformers 4's
    # vocab/merges-based CLIPTokenizer; tokenizer.json (same tokenizer, serialised) is kept.
    _write_tiny_tokenizer(path / "tokenizer", pad_token)
    return path


#: SDXL base 1.0's scheduler config (Euler, leading spacing)
SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "interpolation_type": "linear",
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
    "clip_sample": False,
}


def build_tiny_sdxl_model(path: Path, seed: int = 0) -> Path:
    """A tiny, random StableDiffusionXLPipeline folder with SDXL's features: two text encoders (a CLIPTextModel
    and a CLIPTextModelWithProjection whose projection is the pooled embedding, 32 + 32 = 64-wide token
    embeddings), ``addition_embed_type="text_time"`` (pooled embedding + six time ids as added conditioning),
    SDXL's block layout (a plain first down block, more transformer layers deeper), linear projections,
    per-block heads, the 0.13025 VAE scaling and SDXL's Euler scheduler config. Same sizes otherwise as
    :func:`build_tiny_model` (32 px <-> 4x16x16). Deterministic given ``seed``."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    time_dim, pooled_dim = 8, 32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=[32, 64],
            layers_per_block=1,
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
            transformer_layers_per_block=[1, 2],
            cross_attention_dim=64,
            attention_head_dim=[2, 4],
            use_linear_projection=True,
            norm_num_groups=8,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=6 * time_dim + pooled_dim,
        )
        torch.manual_seed(seed + 1)
        vae = _tiny_vae(scaling_factor=0.13025, force_upcast=True)  # SDXL's VAE settings
        vocab = tiny_clip_vocab()
        encoders = []
        for i, (cls, act) in enumerate(((CLIPTextModel, "quick_gelu"), (CLIPTextModelWithProjection, "gelu"))):
            torch.manual_seed(seed + 2 + i)
            config = CLIPTextConfig(
                vocab_size=len(vocab),
                hidden_size=32,
                intermediate_size=37,
                projection_dim=pooled_dim,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=CLIP_TOKENIZER_CONFIG["model_max_length"],
                hidden_act=act,
                bos_token_id=vocab["<|startoftext|>"],
                eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=vocab["<|endoftext|>" if i == 0 else "!"],
            )
            encoders.append(cls(config).eval())
        tokenizers = []
        for pad in ("<|endoftext|>", "!"):  # SDXL's second tokenizer pads with "!"
            with tempfile.TemporaryDirectory(prefix="hediff-tok-") as tmp:
                _write_tiny_tokenizer(Path(tmp), pad)
                tokenizers.append(CLIPTokenizer.from_pretrained(tmp, local_files_only=True))
    pipe = StableDiffusionXLPipeline(
        vae=vae.eval(),
        text_encoder=encoders[0],
        text_encoder_2=encoders[1],
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        unet=unet.eval(),
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG),
        force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    _write_tiny_tokenizer(path / "tokenizer")
    _write_tiny_tokenizer(path / "tokenizer_2", "!")
    return path


# --------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------


def _read_json(path: Path, what: str, folder: Path) -> dict:
    rel = path.relative_to(folder)
    if not path.is_file():
        raise ModelFolderError(f"Model folder {folder} is missing {rel} ({what}). {_FIX_HINT}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFolderError(
            f"Model folder {folder}: {rel} ({what}) is unreadable or not valid JSON ({exc}). {_FIX_HINT}"
        ) from exc
    if not isinstance(data, dict):
        raise ModelFolderError(f"Model folder {folder}: {rel} ({what}) is not a JSON object. {_FIX_HINT}")
    return data


def _check_safetensors(path: Path, folder: Path, what: str) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = list(f.keys())
    except Exception as exc:  # safetensors raises SafetensorError / OSError for corrupt headers
        raise ModelFolderError(
            f"Model folder {folder}: {path.relative_to(folder)} ({what}) is not a readable safetensors file "
            f"({exc}). {_FIX_HINT}"
        ) from exc
    if not keys:
        raise ModelFolderError(
            f"Model folder {folder}: {path.relative_to(folder)} ({what}) contains no tensors. {_FIX_HINT}"
        )


def _weight_files(folder: Path, sub: str, stem: str, what: str) -> list[Path]:
    """Return the safetensors files of a component (single file or sharded with an index)."""
    comp = folder / sub
    single = comp / f"{stem}.safetensors"
    if single.is_file():
        return [single]
    index = comp / f"{stem}.safetensors.index.json"
    if index.is_file():
        data = _read_json(index, f"{what} shard index", folder)
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelFolderError(f"Model folder {folder}: {index.relative_to(folder)} has no weight_map.")
        files = sorted({comp / name for name in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise ModelFolderError(
                    f"Model folder {folder} is missing {f.relative_to(folder)} ({what} shard). {_FIX_HINT}"
                )
        return files
    other = sorted(p.name for p in comp.glob(f"{stem}*")) if comp.is_dir() else []
    extra = ""
    if other:
        extra = (
            f" Found {', '.join(other)} instead: only non-variant safetensors weights are supported "
            "(convert .bin/.ckpt weights with diffusers and save with safe_serialization=True)."
        )
    raise ModelFolderError(f"Model folder {folder} is missing {sub}/{stem}.safetensors ({what}).{extra} {_FIX_HINT}")


def unet_weight_files(path: Path) -> list[Path]:
    """The UNet safetensors file(s) of a model folder (one file, or the shards listed in the index)."""
    path = Path(path)
    return _weight_files(path, "unet", "diffusion_pytorch_model", "UNet weights")


# (resolved file, size, mtime_ns) -> {tensor name: sha256 of its dtype, shape and bytes}
_TENSOR_DIGESTS: dict[tuple[str, int, int], dict[str, str]] = {}
_HASH_CHUNK = 16 << 20


def _tensor_digests(file: Path) -> dict[str, str]:
    """Per-tensor SHA-256 of a safetensors file (header metadata excluded), computed once per (size, mtime)."""
    stat = file.stat()
    key = (str(file.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _TENSOR_DIGESTS:
        return _TENSOR_DIGESTS[key]
    out: dict[str, str] = {}
    with open(file, "rb") as f:
        try:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > stat.st_size - 8:
                raise ValueError(f"header length {header_len} exceeds the file")
            header = json.loads(f.read(header_len))
            entries = {k: v for k, v in header.items() if k != "__metadata__"}
            for name in sorted(entries):
                begin, end = (int(x) for x in entries[name]["data_offsets"])
                if not 0 <= begin <= end <= stat.st_size - 8 - header_len:
                    raise ValueError(f"tensor {name!r} lies outside the file")
                h = hashlib.sha256(json.dumps([entries[name]["dtype"], entries[name]["shape"]]).encode())
                f.seek(8 + header_len + begin)
                left = end - begin
                while left:
                    chunk = f.read(min(left, _HASH_CHUNK))
                    if not chunk:
                        raise ValueError(f"tensor {name!r} is truncated")
                    h.update(chunk)
                    left -= len(chunk)
                out[name] = h.hexdigest()
        except (ValueError, KeyError, TypeError, struct.error) as exc:
            raise ModelFolderError(f"{file} is not a readable safetensors file ({exc}). {_FIX_HINT}") from None
    _TENSOR_DIGESTS[key] = out
    return out


def unet_weights_digest(path: Path) -> str:
    """SHA-256 (hex) of the UNet weights of a model folder: every tensor's name, dtype, shape and bytes, in name
    order, however the files are sharded and whatever their header metadata. A client and a server compare it at
    session open so a different fine-tune on the other side is an error, not a silently different image. Cached by
    file (size, mtime): after the first call per process it costs a ``stat`` per file."""
    combined = hashlib.sha256()
    tensors: dict[str, str] = {}
    for file in unet_weight_files(Path(path)):
        tensors.update(_tensor_digests(file))
    for name in sorted(tensors):
        combined.update(f"{name}\0{tensors[name]}\n".encode())
    return combined.hexdigest()


#: the diffusers pipeline classes a model folder may hold (model_index.json's _class_name)
SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


def model_family(path: Path) -> str:
    """``"sd1"`` or ``"sd2"`` for a StableDiffusionPipeline folder, from its configs: SD 2.x's UNets use linear
    projections and 1024-wide text embeddings (its 768 px models also predict v, which the scheduler config says);
    ``"sdxl"`` for a StableDiffusionXLPipeline folder (two text encoders, pooled text embeddings and time ids as
    added conditioning). Any other pipeline class is a ``ModelFolderError`` naming the class."""
    folder = Path(path)
    cls = _read_json(folder / "model_index.json", "pipeline index", folder).get("_class_name")
    if cls not in SUPPORTED_PIPELINES:
        raise ModelFolderError(
            f"Model folder {folder} holds a {cls!r} (model_index.json); only {', '.join(SUPPORTED_PIPELINES)} "
            "folders (Stable Diffusion 1.x, 2.x and XL) can run here. Choose an SD 1.x, 2.x or XL model."
        )
    if cls == "StableDiffusionXLPipeline":
        return "sdxl"
    unet = _read_json(folder / "unet" / "config.json", "UNet config", folder)
    return "sd2" if unet.get("use_linear_projection") or unet.get("cross_attention_dim") == 1024 else "sd1"


def validate_model_folder(path: Path) -> None:
    """Check that ``path`` is a complete SD 1.x diffusers folder; raise ``ModelFolderError`` otherwise.

    Reads the JSON configs and the safetensors headers (cheap: no tensor data is loaded).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ModelFolderError(f"Model folder {folder} does not exist or is not a directory. {_FIX_HINT}")
    _read_json(folder / "model_index.json", "pipeline index", folder)
    xl = model_family(folder) == "sdxl"  # another pipeline class is refused here, naming it
    encoders = ("text_encoder", "text_encoder_2") if xl else ("text_encoder",)
    for sub, what in (("unet", "UNet config"), ("vae", "VAE config"), *((e, f"{e} config") for e in encoders)):
        _read_json(folder / sub / "config.json", what, folder)
    for sub, stem, what in (
        ("unet", "diffusion_pytorch_model", "UNet weights"),
        ("vae", "diffusion_pytorch_model", "VAE weights"),
        *((e, "model", f"{e} weights") for e in encoders),
    ):
        for f in _weight_files(folder, sub, stem, what):
            _check_safetensors(f, folder, what)
    for name in ("tokenizer", "tokenizer_2") if xl else ("tokenizer",):
        tok = folder / name
        has_bpe_files = (tok / "vocab.json").is_file() and (tok / "merges.txt").is_file()
        if not has_bpe_files and not (tok / "tokenizer.json").is_file():
            raise ModelFolderError(
                f"Model folder {folder} is missing {name}/vocab.json + {name}/merges.txt "
                f"(or {name}/tokenizer.json) (CLIP tokenizer). {_FIX_HINT}"
            )
        if has_bpe_files:
            _read_json(tok / "vocab.json", "tokenizer vocabulary", folder)
    _read_json(folder / "scheduler" / "scheduler_config.json", "scheduler config", folder)


# --------------------------------------------------------------------------------------------------------
# Resolving a model spec to a folder
# --------------------------------------------------------------------------------------------------------


def _hub_offline() -> bool:
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except (ImportError, AttributeError):  # pragma: no cover - very old huggingface_hub
        return False


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = _hub_offline()
    try:
        folder = snapshot_download(repo_id, allow_patterns=_HUB_ALLOW_PATTERNS, local_files_only=offline)
    except Exception as exc:
        # GatedRepoError subclasses RepositoryNotFoundError; the hub's errors are checked before the generic case
        if offline or isinstance(exc, (LocalEntryNotFoundError, OfflineModeIsEnabled, IncompleteSnapshotError)):
            reason = (
                "the Hugging Face hub cannot be reached (offline mode or no network) and the model is not in "
                "the local Hugging Face cache"
            )
        elif isinstance(exc, (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError)):
            reason = "the repository does not exist, is private/gated (log in and accept its licence), or "
            reason += "has no such revision"
        else:
            reason = f"download failed ({type(exc).__name__}: {exc})"
        raise ModelNotFoundError(
            f"Model {repo_id!r} could not be obtained from the Hugging Face hub: {reason}. Download it on a "
            "machine with network access and pass the local folder path instead, or use 'embedded'."
        ) from exc
    folder = Path(folder)
    try:
        validate_model_folder(folder)
    except ModelFolderError as exc:
        raise ModelNotFoundError(
            f"Model {repo_id!r} was downloaded to {folder} but is not a usable SD 1.x diffusers model: {exc}"
        ) from exc
    return folder


def _embedded_model() -> Path:
    if not (EMBEDDED_MODEL_DIR / "model_index.json").is_file():
        raise ModelNotFoundError(
            f"The embedded model is not installed: {EMBEDDED_MODEL_DIR} holds no model. It ships inside the "
            "he-diffusion wheel and in the repository's assets/embedded folder; reinstall the package "
            "(pip install --force-reinstall he-diffusion), or run from a checkout of the repository, or pass "
            "--model with a Stable Diffusion 1.x model folder or hub id."
        )
    validate_model_folder(EMBEDDED_MODEL_DIR)
    return EMBEDDED_MODEL_DIR


def resolve_model(spec: str) -> Path:
    """Turn a model spec into a validated local model folder.

    * ``"embedded"``: the model shipped in ``assets/embedded`` (package data of the wheel);
      ``ModelNotFoundError`` if this install lacks it. Never a randomly initialised stand-in.
    * an existing directory: validated and returned (resolved).
    * ``"org/name"``: downloaded (configs, safetensors, tokenizer files only) with
      ``huggingface_hub.snapshot_download``; ``ModelNotFoundError`` when offline / unknown.

    Raises ``ModelFolderError`` for an incomplete folder and ``ModelNotFoundError`` for anything else.
    """
    spec = str(spec).strip()
    if not spec:
        raise ModelNotFoundError("Empty model spec: pass 'embedded', a model folder path or a hub id 'org/name'.")
    if spec == "embedded":
        return _embedded_model()
    local = Path(spec).expanduser()
    if local.is_dir():
        validate_model_folder(local)
        return local.resolve()
    if local.exists():
        raise ModelFolderError(f"{spec} is a file, not a model folder. {_FIX_HINT}")
    looks_like_path = spec.startswith((".", "/", "~")) or "\\" in spec
    if _HUB_ID_RE.match(spec) and not looks_like_path:
        return _download_from_hub(spec)
    raise ModelNotFoundError(
        f"Model {spec!r} not found: it is not an existing directory, 'embedded', or a hub id of the form 'org/name'."
    )


# --------------------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------------------


def _component_dir(path: Path, sub: str) -> Path:
    comp = Path(path) / sub
    if not comp.is_dir():
        raise ModelFolderError(f"Model folder {path} is missing the {sub}/ folder. {_FIX_HINT}")
    return comp


def diffusers_load_kwargs() -> dict[str, Any]:
    """What every ``from_pretrained`` of a model folder here passes: offline, safetensors only."""
    kwargs: dict[str, Any] = {"local_files_only": True, "use_safetensors": True}
    try:
        import accelerate  # noqa: F401
    except ImportError:
        # Without accelerate diffusers warns on every load that it falls back to this anyway.
        kwargs["low_cpu_mem_usage"] = False
    return kwargs


def load_unet_config(path: Path) -> dict:
    """The raw ``unet/config.json`` dict."""
    path = Path(path)
    return _read_json(path / "unet" / "config.json", "UNet config", path)


def load_scheduler_config(path: Path) -> dict:
    """The raw ``scheduler/scheduler_config.json`` dict."""
    path = Path(path)
    return _read_json(path / "scheduler" / "scheduler_config.json", "scheduler config", path)


def vae_scale_factor(path: Path) -> int:
    """Pixels per latent element along each side, computed as ``StableDiffusionPipeline`` does."""
    path = Path(path)
    config = _read_json(path / "vae" / "config.json", "VAE config", path)
    return 2 ** (len(config["block_out_channels"]) - 1)


def prompt_token_count(path: Path) -> int:
    """Tokens per prompt embedding (77 for SD 1.x): the text encoder's position table, which the tokenizer pads
    and truncates to."""
    path = Path(path)
    config = _read_json(path / "text_encoder" / "config.json", "text encoder config", path)
    return int(config["max_position_embeddings"])


_RECOMMENDED_RANGES: dict[str, tuple[type, float, float]] = {"guidance": (float, 0.0, 50.0), "steps": (int, 1, 1000)}


def recommended_settings(path: Path) -> dict[str, float | int]:
    """``{"guidance": ..., "steps": ...}`` from the folder's ``hediff.json`` (``{"recommended": {...}}``); empty
    when there is none. Small models want far less guidance than SD's usual 7.5 (the embedded model's colours
    collapse at 7.5), so the CLI, the API and the app take their defaults from here."""
    path = Path(path)
    file = path / RECOMMENDED_SETTINGS_FILE
    if not file.is_file():
        return {}
    data = _read_json(file, "recommended generation settings", path).get("recommended", {})
    if not isinstance(data, dict):
        raise ModelFolderError(f"Model folder {path}: {RECOMMENDED_SETTINGS_FILE} 'recommended' is not an object")
    out: dict[str, float | int] = {}
    for name, value in data.items():
        if name not in _RECOMMENDED_RANGES:
            continue  # settings a newer version understands
        kind, lo, hi = _RECOMMENDED_RANGES[name]
        ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok_type or (kind is int and value != int(value)) or not (lo <= value <= hi) or value != value:
            raise ModelFolderError(
                f"Model folder {path}: {RECOMMENDED_SETTINGS_FILE} recommends {name}={value!r}; "
                f"it must be a {kind.__name__} in [{lo:g}, {hi:g}]"
            )
        out[name] = kind(value)
    return out


from hediff.common.settings import SD_GUIDANCE  # noqa: E402  (the settings own the defaults)


def guidance_for(path: Path, explicit: float | None = None) -> float:
    """``explicit`` when given, else the folder's recommended guidance, else SD's usual 7.5."""
    if explicit is not None:
        return float(explicit)
    return float(recommended_settings(path).get("guidance", SD_GUIDANCE))


def recommended_settings_for(spec: str) -> dict[str, float | int]:
    """Recommended settings of a model spec without resolving it (no download, no build): for form defaults.
    Hub ids and unreadable files give {}; loading the model reports the problem."""
    folder = EMBEDDED_MODEL_DIR if spec == "embedded" else Path(spec).expanduser()
    try:
        return recommended_settings(folder) if folder.is_dir() else {}
    except ModelFolderError:
        return {}


def load_unet(path: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The full ``UNet2DConditionModel`` (server side), in eval mode."""
    from diffusers import UNet2DConditionModel

    comp = _component_dir(path, "unet")
    unet = UNet2DConditionModel.from_pretrained(comp, torch_dtype=dtype, **diffusers_load_kwargs())
    return unet.to(device=device).eval()


def load_vae(path: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The ``AutoencoderKL``, in eval mode."""
    from diffusers import AutoencoderKL

    comp = _component_dir(path, "vae")
    vae = AutoencoderKL.from_pretrained(comp, torch_dtype=dtype, **diffusers_load_kwargs())
    return vae.to(device=device).eval()


def load_text_encoder(path: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The ``CLIPTextModel``, in eval mode."""
    from transformers import CLIPTextModel

    comp = _component_dir(path, "text_encoder")
    # transformers 5 takes ``dtype=`` (``torch_dtype=`` is deprecated); casting afterwards works on 4.x and 5.x.
    model = CLIPTextModel.from_pretrained(comp, local_files_only=True, use_safetensors=True)
    return model.to(device=device, dtype=dtype).eval()


def load_tokenizer(path: Path, sub: str = "tokenizer"):
    """The ``CLIPTokenizer`` (in transformers 5 this is the tokenizers-backed ("fast") implementation);
    ``sub="tokenizer_2"``: SDXL's second one."""
    from transformers import CLIPTokenizer

    comp = _component_dir(path, sub)
    return CLIPTokenizer.from_pretrained(comp, local_files_only=True)


def load_text_encoder_2(path: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """SDXL's second text encoder, a ``CLIPTextModelWithProjection`` (its projection is the pooled embedding)."""
    from transformers import CLIPTextModelWithProjection

    comp = _component_dir(path, "text_encoder_2")
    model = CLIPTextModelWithProjection.from_pretrained(comp, local_files_only=True, use_safetensors=True)
    return model.to(device=device, dtype=dtype).eval()


def force_zeros_for_empty_prompt(path: Path) -> bool:
    """SDXL: whether an absent negative prompt is all-zero embeddings (model_index.json, as the pipeline reads it)."""
    path = Path(path)
    return bool(_read_json(path / "model_index.json", "pipeline index", path).get("force_zeros_for_empty_prompt", True))


def add_time_ids(height: int, width: int) -> list[float]:
    """SDXL's micro-conditioning for a generation at ``height`` x ``width``: original size, crop (0, 0) and target
    size, as StableDiffusionXLPipeline makes them by default."""
    return [float(height), float(width), 0.0, 0.0, float(height), float(width)]


# --------------------------------------------------------------------------------------------------------
# Prompt encoding
# --------------------------------------------------------------------------------------------------------


def _encode_one(tokenizer, text_encoder, text: str) -> torch.Tensor:
    device = text_encoder.device
    inputs = tokenizer(
        [text],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    if getattr(text_encoder.config, "use_attention_mask", False):
        attention_mask = inputs.attention_mask.to(device)
    else:
        attention_mask = None
    with torch.no_grad():
        embeds = text_encoder(inputs.input_ids.to(device), attention_mask=attention_mask)[0]
    return embeds.to(dtype=text_encoder.dtype, device=device)


def encode_prompt(tokenizer, text_encoder, prompt: str, negative_prompt: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(cond, uncond)`` text embeddings, each ``(1, 77, D)``, exactly as
    ``StableDiffusionPipeline.encode_prompt(prompt, device, 1, True, negative_prompt)`` computes them
    (max-length padding, truncation to ``tokenizer.model_max_length``, no clip skip, the text encoder's
    dtype/device). For classifier-free guidance the UNet batch is ``torch.cat([uncond, cond])``.

    Prompts longer than the tokenizer's limit are silently truncated (like the pipeline); use
    :func:`prompt_is_truncated` / :func:`count_prompt_tokens` to warn the user.
    """
    if not isinstance(prompt, str) or not isinstance(negative_prompt, str):
        raise TypeError("prompt and negative_prompt must be strings")
    cond = _encode_one(tokenizer, text_encoder, prompt)
    uncond = _encode_one(tokenizer, text_encoder, negative_prompt)
    return cond, uncond


def encode_prompt_xl(
    tokenizers, text_encoders, prompt: str, negative_prompt: str = "", zeros_for_empty: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(cond, uncond, cond_pooled, uncond_pooled)`` exactly as ``StableDiffusionXLPipeline.encode_prompt``
    makes them with guidance: each encoder's penultimate hidden states side by side, the second encoder's
    projection as the pooled embedding. An empty negative prompt is the pipeline's absent one: zeros when
    ``zeros_for_empty`` (the folder's ``force_zeros_for_empty_prompt``)."""
    if not isinstance(prompt, str) or not isinstance(negative_prompt, str):
        raise TypeError("prompt and negative_prompt must be strings")

    def encode(text: str) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, pooled = [], None
        for tokenizer, text_encoder in zip(tokenizers, text_encoders, strict=True):
            ids = tokenizer(
                [text],
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            with torch.no_grad():
                out = text_encoder(ids.to(text_encoder.device), output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        dtype = text_encoders[-1].dtype
        return torch.concat(hidden, dim=-1).to(dtype=dtype), pooled

    cond, cond_pooled = encode(prompt)
    if not negative_prompt and zeros_for_empty:
        return cond, torch.zeros_like(cond), cond_pooled, torch.zeros_like(cond_pooled)
    uncond, uncond_pooled = encode(negative_prompt)
    return cond, uncond, cond_pooled, uncond_pooled


def count_prompt_tokens(tokenizer, prompt: str) -> int:
    """Number of tokens of ``prompt`` including the start/end tokens, before truncation."""
    return len(tokenizer(prompt, truncation=False)["input_ids"])


def prompt_is_truncated(tokenizer, prompt: str) -> bool:
    """Whether ``encode_prompt`` drops part of ``prompt`` (more than ``tokenizer.model_max_length`` tokens)."""
    return count_prompt_tokens(tokenizer, prompt) > tokenizer.model_max_length
