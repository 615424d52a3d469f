"""Split a diffusers ``UNet2DConditionModel`` between the client and the server.

Paper splits (:data:`PAPER_SPLITS`): the client runs a *head* (the first UNet layers), the server runs the *body*
(everything else) and gets the noise prediction::

    acts = UNetHead(...)(latent, t)                         # latent (1, 4, h, w); no prompt needed
    eps = UNetBody(...)(acts, t, torch.cat([uncond, cond]))  # (2, 4, h, w) noise predictions

* ``"conv_in"`` -- head = ``conv_in``. Activations ``{"h": conv_in(x)}``.
* ``"down0.resnet0"`` -- head = ``conv_in`` + ``down_blocks[0].resnets[0]`` (so it also holds ``time_proj`` /
  ``time_embedding``). Activations ``{"skip0": conv_in(x), "h": resnets[0](skip0, temb)}``; ``skip0`` is the
  skip connection that the last up block consumes.

Both send a linear, invertible function of the latent (``conv_in(x)``) to the server. A deeper split of the same
kind cannot avoid that, because the last up block consumes the first down block's skip connections, so they
would have to travel. U-shaped splits (:data:`U_SPLITS`) keep them: the client runs ``conv_in`` and the first
``k`` down blocks (whole blocks: resnets, cross-attentions with both guidance branches' prompt embeddings,
downsampler) *and* the last ``k`` up blocks with ``conv_norm_out``/``conv_act``/``conv_out``::

    sent, kept = UNetHeadTail(...).head(latent, t, ehs)      # sent = {"h": output of down_blocks[k-1]}
    hidden = UNetBody(..., "u1")(sent, t, ehs, latent_size=(h, w))  # the input of up_blocks[n-k]
    eps = UNetHeadTail(...).tail(hidden, kept, ehs)          # (B, 4, h, w), never leaves the client

* ``"u1"`` (``k = 1``), ``"u2"`` (``k = 2``, needs at least 3 down blocks).
* ``"u3"``: ``k`` = all down blocks, so the server runs only the mid block (3 on the embedded model, 4 on SD 1.5).
  The last down block has no downsampler, so what is sent (its output) is also a skip the client's first up
  block consumes: the client keeps it too, and the server's answer is the mid block's output.

What travels in a U-shaped split, checked against the ``res_samples`` bookkeeping of
``UNet2DConditionModel.forward``: the skips are ``conv_in(x)``, then per down block its resnet (or attention)
outputs and, except for the last block, its downsampler output. ``up_blocks[n-1-j]`` consumes
``layers_per_block[j] + 1`` of them, so the client's ``k`` up blocks consume exactly ``conv_in(x)`` and the resnet
outputs plus the first ``k - 1`` downsampler outputs of its own ``k`` down blocks. The one client-made skip that a
server up block needs is ``down_blocks[k-1]``'s downsampler output, which *is* the hidden state entering
``down_blocks[k]``. So client -> server: ``h`` (B x C_{k-1} x ceil(H/2^k) x ceil(W/2^k)) only, plus the timestep
and prompt embeddings the session already holds; server -> client: ``hidden`` (B x C_k x H/2^{k-1} x W/2^{k-1}),
the input of ``up_blocks[n-k]``. The latent, the skips and the noise prediction stay on the client.

``UNetBody.forward`` reproduces ``UNet2DConditionModel.forward`` (diffusers 0.42) from the split point on:
time embedding, the rest of the down blocks with the same ``res_samples`` bookkeeping, the mid block, the up
blocks with the ``forward_upsample_size`` logic, and (paper splits) ``conv_norm_out``/``conv_act``/``conv_out``.
Given the same inputs, head + body (+ tail) is bit-identical to the full UNet.

Batch-size caveat (paper splits): the head normally runs on a batch of 1 and the body expands the activations
to the guidance batch (2). On CPU, oneDNN convolutions and MKL GEMMs can round differently for batch 1 and
batch 2 (different kernels/blocking), so ``body(head(x))`` and ``unet(cat([x, x]))`` agree to ~1e-6, not
bit-for-bit; with the head run on the same batch as the full UNet they are bit-identical. U-shaped heads run on
the guidance batch (their cross-attention needs both prompts).

Unsupported UNet features (class/addition embeddings, ``encoder_hid_proj``, ``time_cond_proj_dim``,
ControlNet / T2I-Adapter residuals, cross-attention masks, ``cross_attention_kwargs``) raise
:class:`UnsupportedUNetError` where they are part of the config.

This module must stay importable without any GUI or web framework.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from hediff.common.errors import ModelError

__all__ = [
    "DEFAULT_SPLIT",
    "PAPER_FAMILY",
    "PAPER_SPLITS",
    "RETURN_NAME",
    "SPLIT_POINTS",
    "U_SHAPED_FAMILY",
    "U_SPLITS",
    "UNetBody",
    "UNetHead",
    "UNetHeadTail",
    "UShapedKept",
    "UnsupportedUNetError",
    "activation_names",
    "activation_shapes",
    "check_unet_config",
    "client_parameter_names",
    "head_parameter_names",
    "is_u_shaped",
    "mix_guidance",
    "return_shape",
    "split_family",
    "split_unet",
    "u_depth",
]

# the split names (and how many blocks a U-shaped split keeps on the client) are a settings vocabulary
from hediff.common.settings import DEFAULT_SPLIT, PAPER_SPLITS, SPLIT_POINTS, U_SPLITS  # noqa: E402

RETURN_NAME = "hidden"  # the server's answer in a U-shaped split: the input of the client's first up block
# How client and server share a step: the family decides the client's step strategy and the server's step.
PAPER_FAMILY = "paper"  # the latent travels (encrypted, or in plaintext as a baseline); the server returns x_{t-1}
U_SHAPED_FAMILY = "u-shaped"  # the latent stays on the client; the server returns the client tail's input

_ACTIVATION_NAMES: dict[str, tuple[str, ...]] = {
    "conv_in": ("h",),
    "down0.resnet0": ("skip0", "h"),
    "u1": ("h",),
    "u2": ("h",),
    "u3": ("h",),
}

# First-down-block types whose forward UNetBody knows how to resume after resnets[0].
_RESUMABLE_DOWN0 = ("CrossAttnDownBlock2D", "DownBlock2D")
# Block types a U-shaped client runs (their forward signatures and res_samples are the ones mirrored here).
_U_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_U_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")


class UnsupportedUNetError(ModelError, ValueError):
    """The UNet (config) uses a feature that the split does not reproduce, or is too shallow for it."""


def _check_split(split: str) -> str:
    if split not in SPLIT_POINTS:
        raise ValueError(f"Unknown split point {split!r}; choose one of {', '.join(SPLIT_POINTS)}.")
    return split


def is_u_shaped(split: str) -> bool:
    """True for the U-shaped splits, in which the latent and the noise prediction stay on the client."""
    return _check_split(split) in U_SPLITS


def split_family(split: str) -> str:
    """:data:`PAPER_FAMILY` or :data:`U_SHAPED_FAMILY`: which side keeps the latent in ``split``."""
    return U_SHAPED_FAMILY if is_u_shaped(split) else PAPER_FAMILY


def mix_guidance(noise: Tensor, guidance: float, images: int = 1) -> np.ndarray:
    """The guided noise prediction (float64) of ``images`` images from the UNet's output on the prompt batch:
    (C, H, W) for one image, (images, C, H, W) for more.

    A batch of ``2 * images`` is (unconditional x images, conditional x images), mixed in diffusers' pipeline's
    order and arithmetic so that the result is bit-identical to it; a batch of ``images`` is the conditional
    branch alone (guidance <= 1 runs no other).
    """
    if noise.shape[0] == 2 * images:
        uncond, cond = noise.chunk(2)
        noise = uncond + guidance * (cond - uncond)
    out = noise.float().cpu().numpy().astype(np.float64)
    return out[0] if images == 1 else out


def u_depth(split: str, down_blocks: int) -> int:
    """Down (and up) blocks the client runs in U-shaped ``split`` of a UNet with ``down_blocks`` down blocks."""
    if not is_u_shaped(split):
        raise ValueError(f"split {split!r} is not U-shaped; U-shaped splits are {', '.join(U_SPLITS)}")
    k = U_SPLITS[split]
    return down_blocks if k is None else k


def _sent_level(k: int, down_blocks: int) -> int:
    """Downsamplings before the sent activation: the last down block has none."""
    return min(k, down_blocks - 1)


def activation_names(split: str) -> tuple[str, ...]:
    """Names of the tensors the client sends to the server for ``split`` (in a fixed order)."""
    return _ACTIVATION_NAMES[_check_split(split)]


# --------------------------------------------------------------------------------------------------------
# Config handling
# --------------------------------------------------------------------------------------------------------


def _unet_defaults() -> dict[str, Any]:
    from diffusers import UNet2DConditionModel

    sig = inspect.signature(UNet2DConditionModel.__init__)
    return {
        name: p.default
        for name, p in sig.parameters.items()
        if name != "self" and p.default is not inspect.Parameter.empty
    }


def _full_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` completed with ``UNet2DConditionModel.__init__`` defaults (as diffusers would)."""
    full = _unet_defaults()
    full.update({k: v for k, v in dict(config).items() if not k.startswith("_")})
    full["_class_name"] = dict(config).get("_class_name", "UNet2DConditionModel")
    return full


def _strip_res(block_type: str | None) -> str | None:
    if block_type is not None and block_type.startswith("UNetRes"):
        return block_type[len("UNetRes") :]
    return block_type


def _u_problems(cfg: Mapping[str, Any], split: str) -> list[str]:
    downs = list(cfg.get("down_block_types") or [])
    ups = list(cfg.get("up_block_types") or [])
    k = u_depth(split, len(downs))
    if not downs:
        return [f"split {split!r} needs at least one down block; down_block_types is empty"]
    if U_SPLITS[split] is not None and len(downs) < k + 1:
        return [
            f"split {split!r} runs {k} down block(s) on the client and needs at least {k + 1} down blocks; "
            f"down_block_types has {len(downs)} ({', '.join(downs)})"
        ]
    problems = []
    for i in range(k):
        if _strip_res(downs[i]) not in _U_DOWN_TYPES:
            problems.append(f"down_block_types[{i}]={downs[i]!r} (the client runs one of {', '.join(_U_DOWN_TYPES)})")
    for i in range(len(ups) - k, len(ups)):
        if _strip_res(ups[i]) not in _U_UP_TYPES:
            problems.append(f"up_block_types[{i}]={ups[i]!r} (the client runs one of {', '.join(_U_UP_TYPES)})")
    return problems


def check_unet_config(config: Mapping[str, Any], split: str) -> None:
    """Raise :class:`UnsupportedUNetError` (naming the setting) if ``config`` cannot be split at ``split``."""
    _check_split(split)
    cfg = _full_config(config)
    problems: list[str] = []
    if cfg["_class_name"] != "UNet2DConditionModel":
        problems.append(f"_class_name={cfg['_class_name']!r} (only UNet2DConditionModel is supported)")
    addition = cfg.get("addition_embed_type")
    if addition == "text_time" and split == "down0.resnet0":
        problems.append(
            "addition_embed_type='text_time' (SDXL) with split 'down0.resnet0': the client's resnet would need each "
            "guidance branch's added embedding; use conv_in or a U-shaped split"
        )
    elif addition not in (None, "text_time"):
        problems.append(f"addition_embed_type={addition!r} (only SDXL's 'text_time' is supported)")
    for key, what in (
        ("class_embed_type", "class embeddings"),
        ("num_class_embeds", "class embeddings"),
        ("encoder_hid_dim_type", "encoder_hid_proj"),
        ("encoder_hid_dim", "encoder_hid_proj"),
        ("time_cond_proj_dim", "timestep_cond projection (e.g. LCM)"),
    ):
        if cfg.get(key) is not None:
            problems.append(f"{key}={cfg[key]!r} ({what})")
    if cfg.get("class_embeddings_concat"):
        problems.append("class_embeddings_concat=True (class embeddings)")
    kernel = cfg.get("conv_in_kernel", 3)
    if kernel % 2 != 1:
        problems.append(f"conv_in_kernel={kernel} (an even kernel changes the latent size)")
    if split == "down0.resnet0":
        types = list(cfg.get("down_block_types") or [])
        first = _strip_res(types[0] if types else None)
        if first not in _RESUMABLE_DOWN0:
            problems.append(
                f"down_block_types[0]={types[0] if types else None!r} (split 'down0.resnet0' needs one of "
                f"{', '.join(_RESUMABLE_DOWN0)})"
            )
    if split in U_SPLITS:
        problems += _u_problems(cfg, split)
    if problems:
        raise UnsupportedUNetError(
            f"UNet cannot be split at {split!r}: unsupported setting(s): " + "; ".join(problems) + "."
        )


def _check_unet_module(unet: nn.Module, split: str) -> None:
    from diffusers import UNet2DConditionModel

    if not isinstance(unet, UNet2DConditionModel):
        raise UnsupportedUNetError(f"Expected a diffusers UNet2DConditionModel, got {type(unet).__name__}.")
    if type(unet).forward is not UNet2DConditionModel.forward:
        raise UnsupportedUNetError(
            f"{type(unet).__name__} overrides UNet2DConditionModel.forward; the split cannot mirror it."
        )
    check_unet_config(unet.config, split)
    if split == "down0.resnet0":
        block = unet.down_blocks[0]
        if type(block).__name__ not in _RESUMABLE_DOWN0 or type(block).__module__ != _blocks_module():
            raise UnsupportedUNetError(
                f"down_blocks[0] is {type(block).__name__}; split 'down0.resnet0' needs one of "
                f"{', '.join(_RESUMABLE_DOWN0)}."
            )
    if split in U_SPLITS:
        _check_u_modules(unet, u_depth(split, len(unet.down_blocks)), split)


def _check_u_modules(unet: nn.Module, k: int, split: str) -> None:
    """The client's blocks are the mirrored types, and its up blocks consume exactly the skips it keeps."""
    downs, ups = list(unet.down_blocks), list(unet.up_blocks)
    client = [(f"down_blocks[{i}]", b, _U_DOWN_TYPES) for i, b in enumerate(downs[:k])]
    client += [(f"up_blocks[{len(ups) - k + j}]", b, _U_UP_TYPES) for j, b in enumerate(ups[-k:])]
    for where, block, allowed in client:
        if type(block).__name__ not in allowed or type(block).__module__ != _blocks_module():
            raise UnsupportedUNetError(f"{where} is {type(block).__name__}; split {split!r} needs one of {allowed}.")
    if any(b.downsamplers is None for b in downs[: _sent_level(k, len(downs))]):
        raise UnsupportedUNetError(f"split {split!r}: one of the client's down blocks has no downsampler.")
    # skips the client makes: conv_in + each block's resnet outputs + downsampler outputs; the last downsampler's
    # output is sent (a server up block consumes it) unless the client runs every down block (u3)
    made = 1 + sum(len(b.resnets) + (b.downsamplers is not None) for b in downs[:k]) - (k < len(downs))
    consumed = sum(len(b.resnets) for b in ups[-k:])
    if made != consumed:
        raise UnsupportedUNetError(
            f"split {split!r}: the client's up blocks consume {consumed} skip connections but its down blocks "
            f"keep {made}; this UNet's skips do not pair up as in Stable Diffusion."
        )


def _blocks_module() -> str:
    from diffusers.models.unets import unet_2d_blocks

    return unet_2d_blocks.__name__


def meta_unet(config: Mapping[str, Any]):
    """Build the UNet structure on the meta device (no memory, no init cost) from a config dict."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(dict(config))


def _conv_out_size(size: int, kernel: int) -> int:
    # conv_in: stride 1, padding (k - 1) // 2
    return size + 2 * ((kernel - 1) // 2) - kernel + 1


def _downsampled(size: int, padding: int) -> int:
    # Downsample2D: 3x3 conv, stride 2; padding 0 means an explicit (0, 1) pad first
    if padding == 0:
        return (size + 1 - 3) // 2 + 1
    return (size + 2 * padding - 3) // 2 + 1


def _spatial_sizes(cfg: Mapping[str, Any], latent_hw: tuple[int, int], levels: int) -> list[tuple[int, int]]:
    """Spatial size at the input of down block 0..``levels`` for a latent of spatial size ``latent_hw``."""
    k = cfg.get("conv_in_kernel", 3)
    padding = int(cfg.get("downsample_padding", 1))
    h, w = _conv_out_size(int(latent_hw[0]), k), _conv_out_size(int(latent_hw[1]), k)
    sizes = [(h, w)]
    for _ in range(levels):
        h, w = _downsampled(h, padding), _downsampled(w, padding)
        sizes.append((h, w))
    return sizes


def _check_latent_shape(cfg: Mapping[str, Any], latent_shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    if len(latent_shape) != 4:
        raise ValueError(f"latent_shape must be (B, C, H, W), got {tuple(latent_shape)}")
    b, c, h, w = (int(v) for v in latent_shape)
    if c != cfg["in_channels"]:
        raise ValueError(f"latent has {c} channels, the UNet expects in_channels={cfg['in_channels']}")
    return b, c, h, w


def activation_shapes(
    unet_config: Mapping[str, Any], split: str, latent_shape: tuple[int, ...]
) -> dict[str, tuple[int, ...]]:
    """Shapes of what the client sends for a latent of shape ``(B, C, H, W)`` (server-side validation)."""
    names = activation_names(split)
    cfg = _full_config(unet_config)
    b, _c, h, w = _check_latent_shape(cfg, latent_shape)
    if split in U_SPLITS:
        n = len(cfg["block_out_channels"])
        k = u_depth(split, n)
        level = _sent_level(k, n)
        size = _spatial_sizes(cfg, (h, w), level)[level]
        return {"h": (b, int(cfg["block_out_channels"][k - 1]), *size)}
    k = cfg.get("conv_in_kernel", 3)
    shape = (b, int(cfg["block_out_channels"][0]), _conv_out_size(h, k), _conv_out_size(w, k))
    return {name: shape for name in names}


def return_shape(unet_config: Mapping[str, Any], split: str, latent_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the server's answer :data:`RETURN_NAME` in U-shaped ``split`` (B = the guidance batch)."""
    cfg = _full_config(unet_config)
    n = len(cfg["block_out_channels"])
    k = u_depth(split, n)
    b, _c, h, w = _check_latent_shape(cfg, latent_shape)
    # u3: the mid block's output keeps the last down block's channels
    return (b, int(cfg["block_out_channels"][min(k, n - 1)]), *_spatial_sizes(cfg, (h, w), k)[k - 1])


def client_parameter_names(unet_config: Mapping[str, Any], split: str) -> list[str]:
    """UNet state-dict keys the client needs for ``split`` (the only tensors it reads from the weights)."""
    check_unet_config(unet_config, split)
    meta = meta_unet(unet_config)
    part = UNetHeadTail.from_unet(meta, split) if split in U_SPLITS else UNetHead.from_unet(meta, split)
    return list(part.state_dict().keys())


def head_parameter_names(unet_config: Mapping[str, Any], split: str) -> list[str]:
    """UNet state-dict keys the head needs for ``split`` (head and tail for U-shaped splits)."""
    return client_parameter_names(unet_config, split)


# --------------------------------------------------------------------------------------------------------
# Shared forward pieces (mirroring UNet2DConditionModel.forward)
# --------------------------------------------------------------------------------------------------------


def timestep_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    try:
        from diffusers.utils.torch_utils import maybe_adjust_dtype_for_device
    except ImportError:  # older diffusers: mps/npu have no 64-bit types
        if device.type in ("mps", "npu"):
            return torch.float32 if dtype == torch.float64 else torch.int32
        return dtype
    return maybe_adjust_dtype_for_device(dtype, device)


def _added_modules(unet) -> tuple[nn.Module, nn.Module] | None:
    """SDXL's ``(add_time_proj, add_embedding)``; None for a UNet without added conditioning."""
    if _full_config(unet.config).get("addition_embed_type") != "text_time":
        return None
    return unet.add_time_proj, unet.add_embedding


def _time_embed(
    time_proj: nn.Module,
    time_embedding: nn.Module,
    time_embed_act: nn.Module | None,
    sample: Tensor,
    timestep: Tensor | float,
    added: tuple[nn.Module, nn.Module] | None = None,
    added_cond: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """``UNet2DConditionModel.get_time_embed`` + ``time_embedding`` (+ SDXL's ``get_aug_embed`` on
    ``added_cond``'s ``text_embeds`` and ``time_ids``) + ``time_embed_act``."""
    timesteps = timestep
    if not torch.is_tensor(timesteps):
        dtype = timestep_dtype(torch.float64 if isinstance(timestep, float) else torch.int64, sample.device)
        timesteps = torch.tensor([timesteps], dtype=dtype, device=sample.device)
    elif len(timesteps.shape) == 0:
        timesteps = timesteps[None].to(sample.device)
    # broadcast to the batch dimension (ONNX/Core ML-friendly, as diffusers does)
    timesteps = timesteps.expand(sample.shape[0])
    # Timesteps returns float32 whatever the model dtype: cast like diffusers does.
    t_emb = time_proj(timesteps).to(dtype=sample.dtype)
    emb = time_embedding(t_emb, None)
    if added is not None:
        if added_cond is None or not {"text_embeds", "time_ids"} <= set(added_cond):
            raise ValueError("this UNet (addition_embed_type='text_time', SDXL) needs added_cond text_embeds, time_ids")
        add_time_proj, add_embedding = added
        text_embeds = added_cond["text_embeds"].to(device=sample.device)
        time_embeds = add_time_proj(added_cond["time_ids"].to(device=sample.device).flatten())
        time_embeds = time_embeds.reshape((text_embeds.shape[0], -1))
        emb = emb + add_embedding(torch.concat([text_embeds, time_embeds], dim=-1).to(emb.dtype))
    if time_embed_act is not None:
        emb = time_embed_act(emb)
    return emb


def _run_down(block: nn.Module, sample: Tensor, emb: Tensor, ehs: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
    if getattr(block, "has_cross_attention", False):
        return block(
            hidden_states=sample,
            temb=emb,
            encoder_hidden_states=ehs,
            attention_mask=None,
            cross_attention_kwargs=None,
            encoder_attention_mask=None,
        )
    return block(hidden_states=sample, temb=emb)


def _run_mid(block: nn.Module | None, sample: Tensor, emb: Tensor, ehs: Tensor) -> Tensor:
    if block is None:
        return sample
    if getattr(block, "has_cross_attention", False):
        return block(
            sample,
            emb,
            encoder_hidden_states=ehs,
            attention_mask=None,
            cross_attention_kwargs=None,
            encoder_attention_mask=None,
        )
    return block(sample, emb)


def _run_up(
    block: nn.Module, sample: Tensor, emb: Tensor, res: tuple[Tensor, ...], ehs: Tensor, upsample_size
) -> Tensor:
    if getattr(block, "has_cross_attention", False):
        return block(
            hidden_states=sample,
            temb=emb,
            res_hidden_states_tuple=res,
            encoder_hidden_states=ehs,
            cross_attention_kwargs=None,
            upsample_size=upsample_size,
            attention_mask=None,
            encoder_attention_mask=None,
        )
    return block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res, upsample_size=upsample_size)


def _post(conv_norm_out: nn.Module | None, conv_act: nn.Module | None, conv_out: nn.Module, sample: Tensor) -> Tensor:
    if conv_norm_out is not None:
        sample = conv_norm_out(sample)
        sample = conv_act(sample)
    return conv_out(sample)


def _needs_upsample_size(num_upsamplers: int, latent_hw) -> bool:
    # upsample size must be forwarded when the latent size is not a multiple of 2**num_upsamplers
    factor = 2**num_upsamplers
    return any(int(dim) % factor != 0 for dim in latent_hw)


# --------------------------------------------------------------------------------------------------------
# Partial loading
# --------------------------------------------------------------------------------------------------------


def _load_partial(module: nn.Module, model_path: Path, device, dtype: torch.dtype, what: str) -> tuple[str, ...]:
    """Fill a meta-device ``module`` (UNet state-dict keys) with exactly its tensors from the UNet weights."""
    from hediff.common.models import ModelFolderError, unet_weight_files

    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    tensors = _read_tensors(model_path, list(expected), unet_weight_files(model_path), ModelFolderError, what)
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ModelFolderError(
                f"Model folder {model_path}: UNet tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                f"unet/config.json implies {shape}. The weights do not match the config; re-download "
                "the model."
            )
    tensors = {
        k: (t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device=device))
        for k, t in tensors.items()
    }
    module.load_state_dict(tensors, strict=True, assign=True)
    return tuple(expected)


def _config_for(model_path: Path, split: str) -> dict:
    """``unet/config.json``, checked for ``split``; errors name the file."""
    from hediff.common.models import load_unet_config

    config = load_unet_config(model_path)
    try:
        check_unet_config(config, split)
    except UnsupportedUNetError as e:
        raise UnsupportedUNetError(f"{Path(model_path) / 'unet' / 'config.json'}: {e}") from None
    return config


def _read_tensors(
    model_path: Path, names: list[str], files: list[Path], error_cls, what: str = "the head"
) -> dict[str, Tensor]:
    """Read exactly ``names`` from the (possibly sharded) safetensors ``files``."""
    from safetensors import safe_open

    wanted = set(names)
    out: dict[str, Tensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                keys = set(f.keys())
                for name in sorted(wanted & keys):
                    out[name] = f.get_tensor(name)
        except error_cls:
            raise
        except Exception as exc:
            raise error_cls(
                f"Model folder {model_path}: cannot read {file.name} ({exc}); re-download the model."
            ) from exc
        wanted -= keys
        if not wanted:
            break
    if wanted:
        missing = sorted(wanted)
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise error_cls(
            f"Model folder {model_path}: the UNet weights ({', '.join(f.name for f in files)}) lack tensor(s) "
            f"needed by {what}: {shown}. The weights do not match unet/config.json (or use a non-diffusers key "
            "layout); re-download or convert the model to diffusers format."
        )
    return out


# --------------------------------------------------------------------------------------------------------
# Head (paper splits)
# --------------------------------------------------------------------------------------------------------


class _Down0Head(nn.Module):
    """Holds ``resnets[0]`` of the first down block, so state-dict keys match the UNet's."""

    def __init__(self, resnet0: nn.Module):
        super().__init__()
        self.resnets = nn.ModuleList([resnet0])


class UNetHead(nn.Module):
    """The client-side UNet layers up to a paper split point. Its state-dict keys are the UNet's keys."""

    split: str

    def __init__(
        self,
        split: str,
        unet_config: Mapping[str, Any],
        conv_in: nn.Module,
        time_proj: nn.Module | None = None,
        time_embedding: nn.Module | None = None,
        time_embed_act: nn.Module | None = None,
        resnet0: nn.Module | None = None,
    ):
        super().__init__()
        self.split = _check_paper_split(split)
        self.unet_config = _full_config(unet_config)
        self.center_input_sample = bool(self.unet_config.get("center_input_sample", False))
        self.conv_in = conv_in
        self.loaded_keys: tuple[str, ...] | None = None  # set by from_pretrained
        if split == "down0.resnet0":
            if time_proj is None or time_embedding is None or resnet0 is None:
                raise ValueError("split 'down0.resnet0' needs time_proj, time_embedding and resnet0")
            self.time_proj = time_proj
            self.time_embedding = time_embedding
            self.time_embed_act = time_embed_act
            self.down_blocks = nn.ModuleList([_Down0Head(resnet0)])

    @classmethod
    def from_unet(cls, unet, split: str = DEFAULT_SPLIT) -> UNetHead:
        """A head sharing ``unet``'s modules (no copies)."""
        _check_paper_split(split)
        _check_unet_module(unet, split)
        if split == "conv_in":
            return cls(split, unet.config, unet.conv_in)
        return cls(
            split,
            unet.config,
            unet.conv_in,
            time_proj=unet.time_proj,
            time_embedding=unet.time_embedding,
            time_embed_act=unet.time_embed_act,
            resnet0=unet.down_blocks[0].resnets[0],
        )

    @classmethod
    def from_pretrained(
        cls,
        model_path: Path | str,
        split: str = DEFAULT_SPLIT,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> UNetHead:
        """Load only the head: build its modules from ``unet/config.json`` and read only their tensors.

        The UNet structure is instantiated on the meta device (no memory), the head's modules are taken
        from it, and exactly :func:`head_parameter_names` tensors are read with ``safetensors.safe_open``.
        Raises ``ModelFolderError`` if a tensor is missing or has the wrong shape.
        """
        _check_paper_split(split)
        model_path = Path(model_path)
        head = cls.from_unet(meta_unet(_config_for(model_path, split)), split)
        head.loaded_keys = _load_partial(head, model_path, device, dtype, f"the head (split {split!r})")
        return head.eval()

    def forward(self, sample: Tensor, timestep: Tensor | float | None = None) -> dict[str, Tensor]:
        """Run the head on a latent ``(B, C, H, W)``; ``timestep`` is needed for ``down0.resnet0``."""
        ref = self.conv_in.weight
        sample = sample.to(device=ref.device, dtype=ref.dtype)
        if self.center_input_sample:
            sample = 2 * sample - 1.0
        if self.split == "conv_in":
            return {"h": self.conv_in(sample)}
        if timestep is None:
            raise ValueError("split 'down0.resnet0' needs the timestep (resnets[0] uses the time embedding)")
        emb = _time_embed(self.time_proj, self.time_embedding, self.time_embed_act, sample, timestep)
        skip0 = self.conv_in(sample)
        h = self.down_blocks[0].resnets[0](skip0, emb)
        return {"skip0": skip0, "h": h}

    def activation_shapes(self, latent_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        return activation_shapes(self.unet_config, self.split, latent_shape)


def _check_paper_split(split: str) -> str:
    if _check_split(split) in U_SPLITS:
        raise ValueError(f"split {split!r} is U-shaped: its client side is a UNetHeadTail, not a UNetHead")
    return split


# --------------------------------------------------------------------------------------------------------
# Head + tail (U-shaped splits)
# --------------------------------------------------------------------------------------------------------


@dataclass
class UShapedKept:
    """What the U-shaped head keeps on the client for the tail: time embedding and skip connections."""

    emb: Tensor
    skips: tuple[Tensor, ...]
    latent_hw: tuple[int, int]


class UNetHeadTail(nn.Module):
    """The client side of a U-shaped split: ``conv_in`` + the first ``k`` down blocks (head) and the last ``k``
    up blocks + ``conv_norm_out``/``conv_act``/``conv_out`` (tail). State-dict keys are the UNet's keys."""

    split: str

    def __init__(self, unet, split: str):
        super().__init__()
        self.split = split
        self.depth = u_depth(split, len(unet.down_blocks))
        self.sends_a_skip = self.depth < len(unet.down_blocks)
        self.unet_config = _full_config(unet.config)
        self.center_input_sample = bool(self.unet_config.get("center_input_sample", False))
        self.num_upsamplers = int(unet.num_upsamplers)
        n_up = len(unet.up_blocks)
        self.conv_in = unet.conv_in
        self.time_proj = unet.time_proj
        self.time_embedding = unet.time_embedding
        self.time_embed_act = unet.time_embed_act
        added = _added_modules(unet)  # SDXL: the client's blocks need the added conditioning too
        self.add_time_proj, self.add_embedding = added if added is not None else (None, None)
        self.down_blocks = nn.ModuleList(list(unet.down_blocks)[: self.depth])
        # keyed by the UNet's own indices so that state-dict keys read "up_blocks.<i>. ..."
        self.up_blocks = nn.ModuleDict({str(i): unet.up_blocks[i] for i in range(n_up - self.depth, n_up)})
        self.conv_norm_out = unet.conv_norm_out
        self.conv_act = unet.conv_act
        self.conv_out = unet.conv_out
        self.loaded_keys: tuple[str, ...] | None = None  # set by from_pretrained

    @classmethod
    def from_unet(cls, unet, split: str) -> UNetHeadTail:
        """Head and tail sharing ``unet``'s modules (no copies)."""
        _check_unet_module(unet, split)
        return cls(unet, split)

    @classmethod
    def from_pretrained(
        cls,
        model_path: Path | str,
        split: str,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> UNetHeadTail:
        """Load only the client's layers: exactly :func:`client_parameter_names` tensors are read."""
        if not is_u_shaped(split):
            raise ValueError(f"split {split!r} is not U-shaped; U-shaped splits are {', '.join(U_SPLITS)}")
        model_path = Path(model_path)
        part = cls.from_unet(meta_unet(_config_for(model_path, split)), split)
        part.loaded_keys = _load_partial(part, model_path, device, dtype, f"the client's head and tail ({split!r})")
        return part.eval()

    def head(
        self,
        sample: Tensor,
        timestep: Tensor | float,
        encoder_hidden_states: Tensor,
        added_cond: Mapping[str, Tensor] | None = None,
    ):
        """``({"h": ...}, kept)``: what goes to the server and what stays for :meth:`tail`.

        A latent of batch 1 is expanded to the guidance batch ``encoder_hidden_states.shape[0]``. ``added_cond``:
        SDXL's ``text_embeds`` and ``time_ids`` for that batch.
        """
        ref = self.conv_in.weight
        ehs = encoder_hidden_states.to(device=ref.device)
        batch = ehs.shape[0]
        sample = sample.to(device=ref.device, dtype=ref.dtype)
        if sample.shape[0] not in (1, batch):
            raise ValueError(f"latent batch {sample.shape[0]} must be 1 or the prompt batch {batch}")
        if sample.shape[0] != batch:
            sample = sample.expand(batch, -1, -1, -1)
        latent_hw = (int(sample.shape[2]), int(sample.shape[3]))
        if self.center_input_sample:
            sample = 2 * sample - 1.0
        added = None if self.add_embedding is None else (self.add_time_proj, self.add_embedding)
        emb = _time_embed(self.time_proj, self.time_embedding, self.time_embed_act, sample, timestep, added, added_cond)
        sample = self.conv_in(sample)
        res: tuple[Tensor, ...] = (sample,)
        for block in self.down_blocks:
            sample, out = _run_down(block, sample, emb, ehs)
            res += out
        # the last skip is ``sample`` itself: the last downsampler's output, sent and not kept, or (u3) the last
        # down block's output, which the client's first up block consumes as well
        skips = res[:-1] if self.sends_a_skip else res
        return {"h": sample}, UShapedKept(emb=emb, skips=skips, latent_hw=latent_hw)

    def tail(self, hidden: Tensor, kept: UShapedKept, encoder_hidden_states: Tensor) -> Tensor:
        """Noise prediction ``(B, C_out, H, W)`` from the server's ``hidden`` and the kept skips."""
        ref = self.conv_out.weight
        ehs = encoder_hidden_states.to(device=ref.device)
        sample = hidden.to(device=ref.device, dtype=ref.dtype)
        forward_upsample_size = _needs_upsample_size(self.num_upsamplers, kept.latent_hw)
        skips = kept.skips
        upsample_size = None
        blocks = list(self.up_blocks.values())
        for j, block in enumerate(blocks):
            n = len(block.resnets)
            res, skips = skips[-n:], skips[:-n]
            if j < len(blocks) - 1 and forward_upsample_size:
                upsample_size = skips[-1].shape[2:]
            sample = _run_up(block, sample, kept.emb, res, ehs, upsample_size)
        return _post(self.conv_norm_out, self.conv_act, self.conv_out, sample)

    def activation_shapes(self, latent_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        return activation_shapes(self.unet_config, self.split, latent_shape)


# --------------------------------------------------------------------------------------------------------
# Body
# --------------------------------------------------------------------------------------------------------


class UNetBody(nn.Module):
    """The server's part of the UNet for ``split`` (shares the UNet's modules).

    Paper splits: everything after the split point, returning the noise prediction. U-shaped splits: from
    ``down_blocks[k]`` to the end of ``up_blocks[n-k-1]``, returning the input of the client's first up block.
    """

    split: str

    def __init__(self, unet, split: str = DEFAULT_SPLIT):
        super().__init__()
        _check_unet_module(unet, split)
        self.split = split
        self.depth = u_depth(split, len(unet.down_blocks)) if split in U_SPLITS else 0
        self.unet_config = _full_config(unet.config)
        self.num_upsamplers = int(unet.num_upsamplers)
        self.time_proj = unet.time_proj
        self.time_embedding = unet.time_embedding
        self.time_embed_act = unet.time_embed_act
        added = _added_modules(unet)  # SDXL: pooled text embedding + time ids join the time embedding
        self.add_time_proj, self.add_embedding = added if added is not None else (None, None)
        # The whole lists are kept (shared); the blocks that run on the client are skipped in forward.
        self.down_blocks = unet.down_blocks
        self.mid_block = unet.mid_block
        self.up_blocks = unet.up_blocks
        self.conv_norm_out = unet.conv_norm_out
        self.conv_act = unet.conv_act
        self.conv_out = unet.conv_out

    @classmethod
    def from_unet(cls, unet, split: str = DEFAULT_SPLIT) -> UNetBody:
        return cls(unet, split)

    def activation_shapes(self, latent_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        return activation_shapes(self.unet_config, self.split, latent_shape)

    def _prepare(self, activations: Mapping[str, Tensor], batch: int) -> dict[str, Tensor]:
        names = activation_names(self.split)
        if not isinstance(activations, Mapping) or set(activations) != set(names):
            got = sorted(activations) if isinstance(activations, Mapping) else type(activations).__name__
            raise ValueError(f"split {self.split!r} expects activations {list(names)}, got {got}")
        ref = self.conv_out.weight
        channels = int(self.unet_config["block_out_channels"][max(self.depth - 1, 0)])
        out: dict[str, Tensor] = {}
        spatial = None
        for name in names:
            a = activations[name]
            if not torch.is_tensor(a) or a.dim() != 4:
                raise ValueError(f"activation {name!r} must be a 4-D tensor (B, C, H, W)")
            if a.shape[1] != channels:
                raise ValueError(f"activation {name!r} has {a.shape[1]} channels, expected {channels}")
            if a.shape[0] not in (1, batch):
                raise ValueError(
                    f"activation {name!r} has batch {a.shape[0]}; expected 1 or the encoder_hidden_states batch {batch}"
                )
            if spatial is None:
                spatial = tuple(a.shape[2:])
            elif tuple(a.shape[2:]) != spatial:
                raise ValueError(f"activations have different spatial sizes: {spatial} vs {tuple(a.shape[2:])}")
            a = a.to(device=ref.device, dtype=ref.dtype)
            if a.shape[0] != batch:
                a = a.expand(batch, -1, -1, -1).contiguous()
            out[name] = a
        return out

    def forward(
        self,
        activations: Mapping[str, Tensor],
        timestep: Tensor | float,
        encoder_hidden_states: Tensor,
        latent_size: tuple[int, int] | None = None,
        added_cond: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        """Noise prediction ``(B, C_out, H, W)`` with ``B = encoder_hidden_states.shape[0]`` (paper splits), or the
        input of ``up_blocks[n-k]`` (U-shaped splits, which need the latent's spatial ``latent_size``).

        Activations of batch 1 are expanded to ``B`` (one latent, both guidance branches); activations of
        batch ``B`` are used as they are.
        """
        batch = encoder_hidden_states.shape[0]
        acts = self._prepare(activations, batch)
        encoder_hidden_states = encoder_hidden_states.to(device=self.conv_out.weight.device)
        sample = acts["h"]
        if self.depth:
            if latent_size is None or len(latent_size) != 2:
                raise ValueError(f"split {self.split!r} needs latent_size=(H, W) of the client's latent")
            level = _sent_level(self.depth, len(self.down_blocks))
            expected = _spatial_sizes(self.unet_config, latent_size, level)[level]
            if tuple(sample.shape[2:]) != tuple(expected):
                raise ValueError(
                    f"activation 'h' has spatial size {tuple(sample.shape[2:])}; a {tuple(latent_size)} latent "
                    f"gives {tuple(expected)} after {self.depth} down block(s)"
                )
            latent_hw = tuple(latent_size)
        else:
            latent_hw = tuple(sample.shape[-2:])  # conv_in keeps the spatial size
        forward_upsample_size = _needs_upsample_size(self.num_upsamplers, latent_hw)
        upsample_size = None

        # 1. time (the body's sample has the full batch, so timesteps broadcast to it); SDXL adds its conditioning
        added = None if self.add_embedding is None else (self.add_time_proj, self.add_embedding)
        emb = _time_embed(self.time_proj, self.time_embedding, self.time_embed_act, sample, timestep, added, added_cond)

        # 3. down
        if self.split == "conv_in":
            down_block_res_samples: tuple[Tensor, ...] = (sample,)
            first = 0
        elif self.split == "down0.resnet0":
            down_block_res_samples = (acts["skip0"],)
            sample, res_samples = self._resume_down0(sample, emb, encoder_hidden_states)
            down_block_res_samples += res_samples
            first = 1
        else:  # U-shaped: 'h' is the last client down block's downsampler output, a skip for the server's ups
            down_block_res_samples = (sample,)
            first = self.depth
        for downsample_block in list(self.down_blocks)[first:]:
            sample, res_samples = _run_down(downsample_block, sample, emb, encoder_hidden_states)
            down_block_res_samples += res_samples

        # 4. mid
        sample = _run_mid(self.mid_block, sample, emb, encoder_hidden_states)

        # 5. up
        up_blocks = list(self.up_blocks)
        server_ups = up_blocks[: len(up_blocks) - self.depth]
        client_size = _spatial_sizes(self.unet_config, latent_hw, self.depth)[self.depth - 1] if self.depth else None
        for i, upsample_block in enumerate(server_ups):
            is_final_block = i == len(up_blocks) - 1
            res_samples = down_block_res_samples[-len(upsample_block.resnets) :]
            down_block_res_samples = down_block_res_samples[: -len(upsample_block.resnets)]
            if not is_final_block and forward_upsample_size:
                # the server's last up block upsamples to the size of the skips the client kept
                upsample_size = down_block_res_samples[-1].shape[2:] if down_block_res_samples else client_size
            sample = _run_up(upsample_block, sample, emb, res_samples, encoder_hidden_states, upsample_size)
        if self.depth:
            return sample

        # 6. post-process
        return _post(self.conv_norm_out, self.conv_act, self.conv_out, sample)

    def _resume_down0(
        self, hidden_states: Tensor, emb: Tensor, encoder_hidden_states: Tensor
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """``down_blocks[0].forward`` after ``resnets[0]`` (CrossAttnDownBlock2D / DownBlock2D)."""
        block = self.down_blocks[0]
        output_states: tuple[Tensor, ...] = ()
        if type(block).__name__ == "CrossAttnDownBlock2D":
            for i, (resnet, attn) in enumerate(zip(block.resnets, block.attentions)):
                if i > 0:
                    hidden_states = resnet(hidden_states, emb)
                hidden_states = attn(
                    hidden_states,
                    encoder_hidden_states=encoder_hidden_states,
                    cross_attention_kwargs=None,
                    attention_mask=None,
                    encoder_attention_mask=None,
                    return_dict=False,
                )[0]
                output_states = output_states + (hidden_states,)
        else:  # DownBlock2D (checked at construction)
            for i, resnet in enumerate(block.resnets):
                if i > 0:
                    hidden_states = resnet(hidden_states, emb)
                output_states = output_states + (hidden_states,)
        if block.downsamplers is not None:
            for downsampler in block.downsamplers:
                hidden_states = downsampler(hidden_states)
            output_states = output_states + (hidden_states,)
        return hidden_states, output_states


def split_unet(unet, split: str = DEFAULT_SPLIT) -> tuple[UNetHead | UNetHeadTail, UNetBody]:
    """The client part (``UNetHead``, or ``UNetHeadTail`` for U-shaped splits) and the ``UNetBody``, sharing
    ``unet``'s modules."""
    client = UNetHeadTail.from_unet(unet, split) if is_u_shaped(split) else UNetHead.from_unet(unet, split)
    return client, UNetBody.from_unet(unet, split)
