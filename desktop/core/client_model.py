"""What the client runs locally: tokenizer + text encoder, the UNet head (and, in a U-shaped split, the tail), the
VAE decoder. Never the whole UNet: only the client's layers are read from the weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors import safe_open

from hediff.common import models
from hediff.common.lora import apply_loras, parse_loras, weights_digest
from hediff.common.split import UNetHead, UNetHeadTail, UShapedKept, is_u_shaped, mix_guidance
from hediff.desktop.core.preview import PreviewRenderer


def load_vae_decoder(model_path: Path, device: torch.device, dtype: torch.dtype) -> AutoencoderKL:
    """An AutoencoderKL with only post_quant_conv and the decoder loaded; the encoder is dropped unread."""
    vae_dir = Path(model_path) / "vae"
    config = json.loads((vae_dir / "config.json").read_text())
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(config)
    del vae.encoder
    vae.quant_conv = None
    weights = vae_dir / "diffusion_pytorch_model.safetensors"
    if not weights.exists():
        raise models.ModelFolderError(f"{weights} is missing: the VAE decoder weights are needed on the client")
    wanted = set(vae.state_dict())
    with safe_open(str(weights), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys() if k in wanted}  # noqa: SIM118 (safe_open is not a dict)
    missing = wanted - state.keys()
    if missing:
        raise models.ModelFolderError(f"{weights} lacks decoder tensors, e.g. {sorted(missing)[:3]}")
    vae.load_state_dict(state, assign=True)
    vae = vae.to(device=device)
    if dtype != torch.float32:
        vae = vae.to(dtype=dtype)
    return vae.eval()


class ClientModel:
    def __init__(self, model_path: Path, split: str, device: str = "cpu", lora: tuple[str, ...] = ()):
        """``lora``: ``DIR[:SCALE]`` entries folded into the text encoder and the client's UNet layers (the
        server must run the same ones: the weights digest says whether it does)."""
        self.path = Path(model_path)
        models.validate_model_folder(self.path)
        self.device = torch.device(device)
        self.dtype = torch.float32
        self.split = split
        self.u_shaped = is_u_shaped(split)
        self.lora = tuple(lora)
        loras = parse_loras(self.lora)
        self.weights_digest = weights_digest(self.path, loras)
        self.tokenizer = models.load_tokenizer(self.path)
        self.text_encoder = models.load_text_encoder(self.path, device=self.device, dtype=self.dtype)
        self.xl = models.model_family(self.path) == "sdxl"
        if self.xl:  # SDXL: a second tokenizer and text encoder, whose projection is the pooled embedding
            self.tokenizer_2 = models.load_tokenizer(self.path, "tokenizer_2")
            self.text_encoder_2 = models.load_text_encoder_2(self.path, device=self.device, dtype=self.dtype)
            self.zeros_for_empty = models.force_zeros_for_empty_prompt(self.path)
        part = UNetHeadTail if self.u_shaped else UNetHead
        if loras:
            # a LoRA spans the whole UNet: apply it to the whole UNet once, keep the client's layers of it
            unet = models.load_unet(self.path, device=self.device, dtype=self.dtype)
            encoder_2 = {"text_encoder_2": self.text_encoder_2} if self.xl else {}
            apply_loras(loras, unet=unet, text_encoder=self.text_encoder, xl=self.xl, **encoder_2)
            self.head = part.from_unet(unet, split).eval()
            del unet
        else:
            self.head = part.from_pretrained(self.path, split, device=self.device, dtype=self.dtype)
        self.vae = load_vae_decoder(self.path, self.device, self.dtype)
        self.vae_scale_factor = models.vae_scale_factor(self.path)
        self.scheduler_config = models.load_scheduler_config(self.path)
        unet_config = models.load_unet_config(self.path)
        self.latent_channels = int(unet_config["in_channels"])
        self.preview = PreviewRenderer.for_model(
            self.path, self.decode, self.latent_channels, self.vae_scale_factor, self.vae.config.block_out_channels
        )
        self.recommended = models.recommended_settings(self.path)
        self.native_size = int(unet_config["sample_size"]) * self.vae_scale_factor
        self._vae_encoder: AutoencoderKL | None = None  # img2img only

    @torch.no_grad()
    def encode_prompt(self, prompt: str, negative_prompt: str = "") -> tuple[np.ndarray, np.ndarray]:
        embeds = self.encode(prompt, negative_prompt)
        return embeds["cond"], embeds["uncond"]

    @torch.no_grad()
    def encode(self, prompt: str, negative_prompt: str = "") -> dict[str, np.ndarray]:
        """The prompt embeddings the session opens with: ``cond`` and ``uncond`` (1, tokens, D), and for SDXL the
        pooled ``cond_pooled`` and ``uncond_pooled`` (1, P), each as the model's diffusers pipeline makes them."""
        if not self.xl:
            cond, uncond = models.encode_prompt(self.tokenizer, self.text_encoder, prompt, negative_prompt)
            return {"cond": cond.float().cpu().numpy(), "uncond": uncond.float().cpu().numpy()}
        out = models.encode_prompt_xl(
            (self.tokenizer, self.tokenizer_2),
            (self.text_encoder, self.text_encoder_2),
            prompt,
            negative_prompt,
            self.zeros_for_empty,
        )
        names = ("cond", "uncond", "cond_pooled", "uncond_pooled")
        return {name: t.float().cpu().numpy() for name, t in zip(names, out, strict=True)}

    @torch.no_grad()
    def run_head(self, model_input: np.ndarray, timestep: int, dtype: str) -> dict[str, np.ndarray]:
        """The head on one latent (C, H, W) or a session's images (N, C, H, W) in one batch."""
        x = torch.from_numpy(_batch(model_input)).to(self.device, self.dtype)
        out = self.head(x, timestep)
        np_dtype = np.float16 if dtype == "float16" else np.float32
        return {k: v.float().cpu().numpy().astype(np_dtype) for k, v in out.items()}

    @torch.no_grad()
    def run_u_head(
        self, model_input: np.ndarray, timestep, embeddings: np.ndarray, dtype: str, added_cond: dict | None = None
    ) -> tuple[dict[str, np.ndarray], UShapedKept]:
        """U-shaped split: what goes to the server (``h``, guidance batch) and what stays for the tail. Several
        images run once per guidance branch, in diffusers' order (``cat([latents] * 2)``)."""
        x = torch.from_numpy(_batch(model_input)).to(self.device, self.dtype)
        ehs = torch.from_numpy(embeddings).to(self.device, self.dtype)
        if 1 < x.shape[0] < ehs.shape[0]:
            x = x.repeat(ehs.shape[0] // x.shape[0], 1, 1, 1)
        if added_cond is not None:  # SDXL: numpy rows per batch entry
            added_cond = {k: torch.from_numpy(v).to(self.device, self.dtype) for k, v in added_cond.items()}
        sent, kept = self.head.head(x, timestep, ehs, added_cond)
        np_dtype = np.float16 if dtype == "float16" else np.float32
        return {k: v.float().cpu().numpy().astype(np_dtype) for k, v in sent.items()}, kept

    @torch.no_grad()
    def run_u_tail(
        self, hidden: np.ndarray, kept: UShapedKept, embeddings: np.ndarray, guidance: float, images: int = 1
    ) -> np.ndarray:
        """U-shaped split: the guided noise prediction (float64) of ``images`` images from the server's hidden
        state."""
        ehs = torch.from_numpy(embeddings).to(self.device, self.dtype)
        h = torch.from_numpy(np.array(hidden, dtype=np.float32)).to(self.device, self.dtype)
        return mix_guidance(self.head.tail(h, kept, ehs), guidance, images)

    @torch.no_grad()
    def encode_image(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """img2img: the picture's latent, sampled from the VAE encoder's distribution with ``generator`` and
        scaled, exactly as StableDiffusionImg2ImgPipeline does (float32). The encoder loads on first use: a
        text-to-image client never reads it."""
        if self._vae_encoder is None:
            self._vae_encoder = AutoencoderKL.from_pretrained(
                self.path, subfolder="vae", **models.diffusers_load_kwargs()
            ).to(self.device)  # float32, as the client's other models
            self._vae_encoder.eval()
        vae = self._vae_encoder
        latents = vae.encode(image.to(self.device, self.dtype)).latent_dist.sample(generator)
        return vae.config.scaling_factor * latents

    @torch.no_grad()
    def decode(self, latent: np.ndarray) -> Image.Image:
        """Exactly StableDiffusionPipeline's decode + postprocess for one image."""
        z = torch.from_numpy(np.asarray(latent, dtype=np.float32)[None]).to(self.device, self.dtype)
        image = self.vae.decode(z / self.vae.config.scaling_factor, return_dict=False)[0]
        image = (image / 2 + 0.5).clamp(0, 1)
        arr = image.cpu().permute(0, 2, 3, 1).float().numpy()[0]
        return Image.fromarray((arr * 255).round().astype("uint8"))


def _batch(latent: np.ndarray) -> np.ndarray:
    """float32 (B, C, H, W): one image's latent gets its batch axis, a batch of images keeps its own."""
    x = np.asarray(latent, dtype=np.float32)
    return x if x.ndim == 4 else x[None]
