"""Architecture of the embedded model: Stable Diffusion 1.x classes and layout, sized for 128x128 shapes.

Same diffusers/transformers classes as SD 1.x (AutoencoderKL, UNet2DConditionModel with cross-attention,
CLIPTextModel + CLIPTokenizer, the SD 1.x PNDM scheduler config), so the split, loading and parity code paths
are exactly the ones a real SD folder takes. Differences are sizes only: 128x128 images, a VAE with SD's scale
factor 8 (latents 4x16x16), three UNet resolutions (so the U-shaped `u2` split exists), a 2-layer text encoder
over a word-level vocabulary.
"""

from __future__ import annotations

from typing import Any

VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    # Four levels: scale factor 8, as SD's. Narrow at full resolution, where the VAE spends most of its time.
    "block_out_channels": [16, 32, 64, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    # 4 groups: with one channel per group the last norm removes each image's mean colour (measured: the VAE
    # collapses to a constant output).
    "norm_num_groups": 4,
    "sample_size": 128,
}

UNET_CONFIG: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [48, 96, 96],
    "layers_per_block": 1,
    # Cross-attention at 8x8 and 4x4 only: attention at 16x16 would double the training cost on 2 cores.
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 64,
    # diffusers' attention_head_dim is the number of heads here: 4 heads of 24 channels.
    "attention_head_dim": 4,
    "norm_num_groups": 16,
}

TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 256,
    "projection_dim": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
}


def build_components(vocab: dict[str, int]):
    """Freshly initialised (vae, unet, text_encoder); seed the global RNG before calling."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = AutoencoderKL(**VAE_CONFIG)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    text_config = CLIPTextConfig(
        vocab_size=len(vocab),
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
        **TEXT_CONFIG,
    )
    return vae, unet, CLIPTextModel(text_config)


def parameter_count(module) -> int:
    return sum(p.numel() for p in module.parameters())
