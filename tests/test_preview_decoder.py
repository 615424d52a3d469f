"""The tiny preview decoder a model folder may ship: saved small, loaded checked, preferred for previews."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from hediff.desktop.core.preview import SD1_PREVIEW_MAP, PreviewRenderer
from hediff.desktop.core.preview_decoder import (
    PREVIEW_DECODER_DIR,
    PreviewDecoderError,
    TinyDecoder,
    load_preview_decoder,
)


def _decoder(seed: int = 0) -> TinyDecoder:
    torch.manual_seed(seed)
    return TinyDecoder().eval()


def test_it_decodes_a_16x16_latent_to_128_px_and_round_trips_through_a_model_folder(tmp_path):
    decoder = _decoder()
    assert decoder.scale_factor == 8
    latent = np.random.default_rng(0).standard_normal((4, 16, 16)).astype(np.float32)
    image = decoder.to_image(latent)
    assert image.size == (128, 128) and image.mode == "RGB"
    decoder.save(tmp_path / PREVIEW_DECODER_DIR)
    weights = (tmp_path / PREVIEW_DECODER_DIR / "model.safetensors").stat().st_size
    params = sum(p.numel() for p in decoder.parameters())
    assert weights < 2 * params + 4096  # fp16 on disk: a few hundred KB
    loaded = load_preview_decoder(tmp_path, 4, 8)
    # fp16 weights: the same picture to within a level or two of 8 bits
    diff = np.abs(np.asarray(loaded.to_image(latent), dtype=int) - np.asarray(image, dtype=int))
    assert diff.max() <= 3 and diff.mean() < 0.5


def test_a_folder_without_one_has_none_and_a_bad_one_is_a_clear_error(tmp_path):
    assert load_preview_decoder(tmp_path, 4, 8) is None
    _decoder().save(tmp_path / PREVIEW_DECODER_DIR)
    with pytest.raises(PreviewDecoderError, match="scale factor 4"):
        load_preview_decoder(tmp_path, 4, 4)
    with pytest.raises(PreviewDecoderError, match="has 16 channels"):
        load_preview_decoder(tmp_path, 16, 8)
    (tmp_path / PREVIEW_DECODER_DIR / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(PreviewDecoderError, match="not a valid preview decoder.*delete it"):
        load_preview_decoder(tmp_path, 4, 8)
    (tmp_path / PREVIEW_DECODER_DIR / "config.json").write_text(json.dumps({"channels": [8]}))
    with pytest.raises(PreviewDecoderError, match="not a valid preview decoder"):
        load_preview_decoder(tmp_path, 4, 8)


def test_previews_use_the_preview_decoder_before_the_vae(tmp_path):
    decoded = []

    def vae(latent):
        decoded.append(latent.shape)
        return Image.new("RGB", (128, 128), (255, 0, 0))

    latent = np.random.default_rng(1).standard_normal((4, 16, 16)).astype(np.float32)
    decoder = _decoder()
    decoder.save(tmp_path / PREVIEW_DECODER_DIR)
    shipped = PreviewRenderer.for_model(tmp_path, vae, 4, 8, [16, 32, 64, 64])
    assert shipped.tiny_decoder is not None and not shipped.uses_vae((16, 16))
    assert np.array_equal(np.asarray(shipped(latent)), np.asarray(shipped.tiny_decoder.to_image(latent)))
    assert decoded == []
    # without one, a cheap VAE decodes (here: a 64 px image through a 3-level VAE)
    (tmp_path / "plain").mkdir()
    plain = PreviewRenderer.for_model(tmp_path / "plain", vae, 4, 4, [16, 32, 64])
    assert plain.tiny_decoder is None and plain.preview_map is SD1_PREVIEW_MAP
    assert plain(latent).getpixel((0, 0)) == (255, 0, 0) and decoded == [(4, 16, 16)]
