"""Split a diffusers ``UNet2DConditionModel`` into a client-side *head* and a server-side *body*.

The head runs the first UNet layers on the client; the body runs everything else on the server::

    acts = UNetHead(...)(latent, t)                         # latent (1, 4, h, w); no prompt needed
    eps = UNetBody(...)(acts, t, torch.cat([uncond, cond]))  # (2, 4, h, w) noise predictions

Split points (:data:`SPLIT_POINTS`):

* ``"conv_in"`` -- head = ``conv_in``. Activations ``{"h": conv_in(x)}``.
* ``"down0.resnet0"`` -- head = ``conv_in`` + ``down_blocks[0].resnets[0]`` (so it also holds ``time_proj`` /
  ``time_embedding``). Activations ``{"skip0": conv_in(x), "h": resnets[0](skip0, temb)}``; ``skip0`` is the
  skip connection that the last up block consumes.

``UNetBody.forward`` reproduces ``UNet2DConditionModel.forward`` (diffusers 0.42) from the split point on:
time embedding, the rest of ``down_blocks[0]`` (its ``attentions[0]``, further resnets/attentions,
downsampler) and the other down blocks with the same ``res_samples`` bookkeeping, the mid block, the up
blocks with the ``forward_upsample_size`` logic, and ``conv_norm_out``/``conv_act``/``conv_out``. Given the
same inputs, head + body is bit-identical to the full UNet.

Batch-size caveat: the head normally runs on a batch of 1 and the body expands the activations to the
guidance batch (2). On CPU, oneDNN convolutions and MKL GEMMs can round differently for batch 1 and
batch 2 (different kernels/blocking), so ``body(head(x))`` and ``unet(cat([x, x]))`` agree to ~1e-6, not
bit-for-bit; with the head run on the same batch as the full UNet they are bit-identical.

Unsupported UNet features (class/addition embeddings, ``encoder_hid_proj``, ``time_cond_proj_dim``,
ControlNet / T2I-Adapter residuals, cross-attention masks, ``cross_attention_kwargs``) raise
:class:`UnsupportedUNetError` where they are part of the config.

This module must stay importable without any GUI or web framework.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "DEFAULT_SPLIT",
    "SPLIT_POINTS",
    "UNetBody",
    "UNetHead",
    "UnsupportedUNetError",
    "activation_names",
    "activation_shapes",
    "check_unet_config",
    "head_parameter_names",
    "split_unet",
]

SPLIT_POINTS: tuple[str, ...] = ("conv_in", "down0.resnet0")
DEFAULT_SPLIT = "conv_in"

_ACTIVATION_NAMES: dict[str, tuple[str, ...]] = {
    "conv_in": ("h",),
    "down0.resnet0": ("skip0", "h"),
}

# First-down-block types whose forward UNetBody knows how to resume after resnets[0].
_RESUMABLE_DOWN0 = ("CrossAttnDownBlock2D", "DownBlock2D")


class UnsupportedUNetError(ValueError):
    """The UNet (config) uses a feature that the head/body split does not reproduce."""


def _check_split(split: str) -> str:
    if split not in SPLIT_POINTS:
        raise ValueError(f"Unknown split point {split!r}; choose one of {', '.join(SPLIT_POINTS)}.")
    return split


def activation_names(split: str) -> tuple[str, ...]:
    """Names of the tensors the head sends to the body for ``split`` (in a fixed order)."""
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


def check_unet_config(config: Mapping[str, Any], split: str) -> None:
    """Raise :class:`UnsupportedUNetError` (naming the setting) if ``config`` cannot be split at ``split``."""
    _check_split(split)
    cfg = _full_config(config)
    problems: list[str] = []
    if cfg["_class_name"] != "UNet2DConditionModel":
        problems.append(f"_class_name={cfg['_class_name']!r} (only UNet2DConditionModel is supported)")
    for key, what in (
        ("class_embed_type", "class embeddings"),
        ("num_class_embeds", "class embeddings"),
        ("addition_embed_type", "additional (text/image/time) embeddings, e.g. SDXL"),
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
        first = types[0] if types else None
        if first is not None and first.startswith("UNetRes"):
            first = first[len("UNetRes") :]
        if first not in _RESUMABLE_DOWN0:
            problems.append(
                f"down_block_types[0]={types[0] if types else None!r} (split 'down0.resnet0' needs one of "
                f"{', '.join(_RESUMABLE_DOWN0)})"
            )
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


def _blocks_module() -> str:
    from diffusers.models.unets import unet_2d_blocks

    return unet_2d_blocks.__name__


def _meta_unet(config: Mapping[str, Any]):
    """Build the UNet structure on the meta device (no memory, no init cost) from a config dict."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(dict(config))


def _conv_out_size(size: int, kernel: int) -> int:
    # conv_in: stride 1, padding (k - 1) // 2
    return size + 2 * ((kernel - 1) // 2) - kernel + 1


def activation_shapes(
    unet_config: Mapping[str, Any], split: str, latent_shape: tuple[int, ...]
) -> dict[str, tuple[int, ...]]:
    """Shapes of the head's activations for a latent of shape ``(B, C, H, W)`` (server-side validation)."""
    names = activation_names(split)
    cfg = _full_config(unet_config)
    if len(latent_shape) != 4:
        raise ValueError(f"latent_shape must be (B, C, H, W), got {tuple(latent_shape)}")
    b, c, h, w = (int(v) for v in latent_shape)
    if c != cfg["in_channels"]:
        raise ValueError(f"latent has {c} channels, the UNet expects in_channels={cfg['in_channels']}")
    k = cfg.get("conv_in_kernel", 3)
    shape = (b, int(cfg["block_out_channels"][0]), _conv_out_size(h, k), _conv_out_size(w, k))
    return {name: shape for name in names}


def head_parameter_names(unet_config: Mapping[str, Any], split: str) -> list[str]:
    """UNet state-dict keys the head needs for ``split`` (the only tensors ``from_pretrained`` reads)."""
    check_unet_config(unet_config, split)
    head = UNetHead.from_unet(_meta_unet(unet_config), split)
    return list(head.state_dict().keys())


# --------------------------------------------------------------------------------------------------------
# Shared forward pieces (mirroring UNet2DConditionModel.forward)
# --------------------------------------------------------------------------------------------------------


def _timestep_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    try:
        from diffusers.utils.torch_utils import maybe_adjust_dtype_for_device
    except ImportError:  # older diffusers: mps/npu have no 64-bit types
        if device.type in ("mps", "npu"):
            return torch.float32 if dtype == torch.float64 else torch.int32
        return dtype
    return maybe_adjust_dtype_for_device(dtype, device)


def _time_embed(
    time_proj: nn.Module,
    time_embedding: nn.Module,
    time_embed_act: nn.Module | None,
    sample: Tensor,
    timestep: Tensor | float,
) -> Tensor:
    """``UNet2DConditionModel.get_time_embed`` + ``time_embedding`` + ``time_embed_act``."""
    timesteps = timestep
    if not torch.is_tensor(timesteps):
        dtype = _timestep_dtype(torch.float64 if isinstance(timestep, float) else torch.int64, sample.device)
        timesteps = torch.tensor([timesteps], dtype=dtype, device=sample.device)
    elif len(timesteps.shape) == 0:
        timesteps = timesteps[None].to(sample.device)
    # broadcast to the batch dimension (ONNX/Core ML-friendly, as diffusers does)
    timesteps = timesteps.expand(sample.shape[0])
    # Timesteps returns float32 whatever the model dtype: cast like diffusers does.
    t_emb = time_proj(timesteps).to(dtype=sample.dtype)
    emb = time_embedding(t_emb, None)
    if time_embed_act is not None:
        emb = time_embed_act(emb)
    return emb


def _params_like(module: nn.Module) -> Tensor:
    for p in module.parameters():
        return p
    raise ValueError("module has no parameters")


# --------------------------------------------------------------------------------------------------------
# Head
# --------------------------------------------------------------------------------------------------------


class _Down0Head(nn.Module):
    """Holds ``resnets[0]`` of the first down block, so state-dict keys match the UNet's."""

    def __init__(self, resnet0: nn.Module):
        super().__init__()
        self.resnets = nn.ModuleList([resnet0])


class UNetHead(nn.Module):
    """The client-side UNet layers up to the split point. Its state-dict keys are the UNet's keys."""

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
        self.split = _check_split(split)
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
        from common.models import ModelFolderError, load_unet_config, unet_weight_files

        model_path = Path(model_path)
        config = load_unet_config(model_path)
        check_unet_config(config, split)
        head = cls.from_unet(_meta_unet(config), split)
        expected = {k: tuple(v.shape) for k, v in head.state_dict().items()}
        tensors = _read_tensors(model_path, list(expected), unet_weight_files(model_path), ModelFolderError)
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
        head.load_state_dict(tensors, strict=True, assign=True)
        head.loaded_keys = tuple(expected)
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


def _read_tensors(model_path: Path, names: list[str], files: list[Path], error_cls) -> dict[str, Tensor]:
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
            f"Model folder {model_path}: the UNet weights lack tensor(s) needed by the head: {shown}. "
            "The weights do not match unet/config.json (or use a non-diffusers key layout); re-download or "
            "convert the model to diffusers format."
        )
    return out


# --------------------------------------------------------------------------------------------------------
# Body
# --------------------------------------------------------------------------------------------------------


class UNetBody(nn.Module):
    """The server-side rest of the UNet after the split point (shares the UNet's modules)."""

    split: str

    def __init__(self, unet, split: str = DEFAULT_SPLIT):
        super().__init__()
        _check_unet_module(unet, split)
        self.split = split
        self.unet_config = _full_config(unet.config)
        self.num_upsamplers = int(unet.num_upsamplers)
        self.time_proj = unet.time_proj
        self.time_embedding = unet.time_embedding
        self.time_embed_act = unet.time_embed_act
        # The whole list is kept (shared); for 'down0.resnet0' down_blocks[0].resnets[0] is not run here.
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
        channels = int(self.unet_config["block_out_channels"][0])
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
        self, activations: Mapping[str, Tensor], timestep: Tensor | float, encoder_hidden_states: Tensor
    ) -> Tensor:
        """Noise prediction ``(B, C_out, H, W)`` with ``B = encoder_hidden_states.shape[0]``.

        Activations of batch 1 are expanded to ``B`` (one latent, both guidance branches); activations of
        batch ``B`` are used as they are.
        """
        batch = encoder_hidden_states.shape[0]
        acts = self._prepare(activations, batch)
        encoder_hidden_states = encoder_hidden_states.to(device=self.conv_out.weight.device)
        sample = acts["h"]

        # upsample size must be forwarded when the latent size is not a multiple of 2**num_upsamplers
        # (conv_in keeps the spatial size, so the activations' size is the latent size).
        default_overall_up_factor = 2**self.num_upsamplers
        forward_upsample_size = any(dim % default_overall_up_factor != 0 for dim in sample.shape[-2:])
        upsample_size = None

        # 1. time (the body's sample has the full batch, so timesteps broadcast to it)
        emb = _time_embed(self.time_proj, self.time_embedding, self.time_embed_act, sample, timestep)

        # 3. down
        if self.split == "conv_in":
            down_block_res_samples: tuple[Tensor, ...] = (sample,)
            first = 0
        else:
            down_block_res_samples = (acts["skip0"],)
            sample, res_samples = self._resume_down0(sample, emb, encoder_hidden_states)
            down_block_res_samples += res_samples
            first = 1
        for downsample_block in list(self.down_blocks)[first:]:
            if getattr(downsample_block, "has_cross_attention", False):
                sample, res_samples = downsample_block(
                    hidden_states=sample,
                    temb=emb,
                    encoder_hidden_states=encoder_hidden_states,
                    attention_mask=None,
                    cross_attention_kwargs=None,
                    encoder_attention_mask=None,
                )
            else:
                sample, res_samples = downsample_block(hidden_states=sample, temb=emb)
            down_block_res_samples += res_samples

        # 4. mid
        if self.mid_block is not None:
            if getattr(self.mid_block, "has_cross_attention", False):
                sample = self.mid_block(
                    sample,
                    emb,
                    encoder_hidden_states=encoder_hidden_states,
                    attention_mask=None,
                    cross_attention_kwargs=None,
                    encoder_attention_mask=None,
                )
            else:
                sample = self.mid_block(sample, emb)

        # 5. up
        for i, upsample_block in enumerate(self.up_blocks):
            is_final_block = i == len(self.up_blocks) - 1
            res_samples = down_block_res_samples[-len(upsample_block.resnets) :]
            down_block_res_samples = down_block_res_samples[: -len(upsample_block.resnets)]
            if not is_final_block and forward_upsample_size:
                upsample_size = down_block_res_samples[-1].shape[2:]
            if getattr(upsample_block, "has_cross_attention", False):
                sample = upsample_block(
                    hidden_states=sample,
                    temb=emb,
                    res_hidden_states_tuple=res_samples,
                    encoder_hidden_states=encoder_hidden_states,
                    cross_attention_kwargs=None,
                    upsample_size=upsample_size,
                    attention_mask=None,
                    encoder_attention_mask=None,
                )
            else:
                sample = upsample_block(
                    hidden_states=sample,
                    temb=emb,
                    res_hidden_states_tuple=res_samples,
                    upsample_size=upsample_size,
                )

        # 6. post-process
        if self.conv_norm_out is not None:
            sample = self.conv_norm_out(sample)
            sample = self.conv_act(sample)
        return self.conv_out(sample)

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


def split_unet(unet, split: str = DEFAULT_SPLIT) -> tuple[UNetHead, UNetBody]:
    """``(UNetHead.from_unet(unet, split), UNetBody.from_unet(unet, split))``, sharing ``unet``'s modules."""
    return UNetHead.from_unet(unet, split), UNetBody.from_unet(unet, split)
