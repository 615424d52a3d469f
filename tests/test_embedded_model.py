"""The shipped embedded model: complete, small, loads offline, follows held-out prompts, encrypted == plaintext."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hediff.common.models import (
    EMBEDDED_MODEL_DIR,
    REPO_ROOT,
    recommended_settings,
    resolve_model,
    validate_model_folder,
)
from hediff.desktop.core.preview import SD1_PREVIEW_MAP, latent_preview, load_preview_map
from hediff.desktop.core.preview_decoder import load_preview_decoder
from training.checker import check, check_relation
from training.evaluate import psnr
from training.shapes import held_out_relation_scenes, held_out_scenes

STEPS = 20
# What the model folder recommends (hediff.json) and so what the CLI, the API and the app use by default.
GUIDANCE = 2.0


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    p = StableDiffusionPipeline.from_pretrained(
        EMBEDDED_MODEL_DIR, safety_checker=None, requires_safety_checker=False, local_files_only=True
    )
    p.set_progress_bar_config(disable=True)
    return p


def _generate(pipe, prompts, seeds, output_type="np"):
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(prompts, num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=gens, output_type=output_type)


def _u8(images) -> list[np.ndarray]:
    return list((np.clip(images, 0, 1) * 255).round().astype(np.uint8))


def test_embedded_folder_is_complete_small_and_documented():
    validate_model_folder(EMBEDDED_MODEL_DIR)
    assert resolve_model("embedded") == EMBEDDED_MODEL_DIR
    weights = sum(p.stat().st_size for p in EMBEDDED_MODEL_DIR.rglob("*.safetensors"))
    assert weights <= 30 * 1024 * 1024
    assert not list(EMBEDDED_MODEL_DIR.rglob("*.bin"))
    record = json.loads((EMBEDDED_MODEL_DIR / "training.json").read_text())
    assert record["training_seconds"] <= 90 * 60 and record["torch_threads"] == 2
    assert load_preview_decoder(EMBEDDED_MODEL_DIR, 4, 8) is not None
    decoder_bytes = sum(p.stat().st_size for p in (EMBEDDED_MODEL_DIR / "preview_decoder").iterdir())
    assert decoder_bytes < 1024 * 1024  # a few hundred KB
    card = (EMBEDDED_MODEL_DIR / "README.md").read_text()
    for needle in ("Data", "Architecture", "Parameters", "Training time", "Held-out adherence", "relation", "PSNR"):
        assert needle in card, needle
    assert "⟨" not in card  # no placeholder left


def test_the_model_recommends_the_guidance_it_was_evaluated_at(tiny_model_dir):
    from hediff.desktop.core.api import HEDiffusion

    assert recommended_settings(EMBEDDED_MODEL_DIR) == {"guidance": GUIDANCE, "steps": STEPS}
    evaluation = json.loads((REPO_ROOT / "bench" / "results" / "embedded-eval.json").read_text())
    assert evaluation["guidance"] == GUIDANCE and evaluation["steps"] == STEPS
    with HEDiffusion("embedded", local_backend=True) as hd:
        assert (hd.settings("a red circle").guidance, hd.settings("a red circle").steps) == (GUIDANCE, STEPS)
        explicit = hd.settings("a red circle", guidance=4.0)
        assert (explicit.guidance, explicit.steps) == (4.0, STEPS)
    # a model without a recommendation keeps SD's defaults
    with HEDiffusion(tiny_model_dir, local_backend=True) as hd:
        assert (hd.settings("a red circle").guidance, hd.settings("a red circle").steps) == (7.5, 20)


def test_embedded_model_follows_held_out_prompts(pipe):
    # Every 30th held-out one-shape scene (all 8 unseen colour/shape pairs, every position, both sizes, 8 of the 11
    # backgrounds) and every 16th held-out relation scene (all 4 unseen colour pairs, every relation).
    scenes = held_out_scenes()[::30]
    images = _u8(_generate(pipe, [s.caption() for s in scenes], [1000 + 30 * i for i in range(len(scenes))]).images)
    verdicts = [check(img, s) for img, s in zip(images, scenes)]
    # Measured on these 8: colour, background and position 8, shape 7
    assert sum(v.colour for v in verdicts) >= 7, [v.reading for v in verdicts]
    assert sum(v.background for v in verdicts) >= 7, [v.reading for v in verdicts]
    assert sum(v.position for v in verdicts) >= 7, [v.reading for v in verdicts]
    assert sum(v.shape for v in verdicts) >= 6, [v.reading for v in verdicts]
    pairs = held_out_relation_scenes()[::16]
    offset = len(held_out_scenes())
    seeds = [1000 + offset + 16 * i for i in range(len(pairs))]  # the evaluation's seeds for these prompts
    images = _u8(_generate(pipe, [s.caption() for s in pairs], seeds).images)
    verdicts = [check_relation(img, s) for img, s in zip(images, pairs)]
    # Measured: 3 of these 8 (45% of the evaluation's 128): relations are this model's weak spot (model card)
    assert sum(v.relation for v in verdicts) >= 2, [v.readings for v in verdicts]


def test_encrypted_generation_matches_diffusers_and_the_prompt(pipe):
    from hediff.desktop.core.api import HEDiffusion

    scene = held_out_scenes()[7]
    seed = 1007
    plain = _u8(_generate(pipe, [scene.caption()], [seed]).images)[0]
    with HEDiffusion("embedded", local_backend=True) as hd:
        result = hd.generate(scene.caption(), steps=STEPS, guidance=GUIDANCE, seed=seed, scheduler="plms")
    encrypted = np.asarray(result.image.convert("RGB"))
    assert result.encrypted_fractions and min(result.encrypted_fractions) == 1.0
    assert psnr(plain, encrypted) >= 35.0
    assert check(encrypted, scene).colour == check(plain, scene).colour


def test_fitted_preview_map_beats_the_sd1_factors(pipe):
    pm = load_preview_map(EMBEDDED_MODEL_DIR)
    assert pm.source.endswith("preview.json") and pm.factors.shape == (4, 3)
    scenes = held_out_scenes()[::60]
    out = _generate(pipe, [s.caption() for s in scenes], list(range(len(scenes))), output_type="latent").images
    decoded = pipe.vae.decode(out / pipe.vae.config.scaling_factor).sample
    target = torch.nn.functional.avg_pool2d(decoded.clamp(-1, 1), 8)
    target = ((target + 1) * 127.5).round().permute(0, 2, 3, 1).detach().numpy().astype(np.uint8)
    ours = [np.asarray(latent_preview(lat.numpy(), pm)) for lat in out]
    sd1 = [np.asarray(latent_preview(lat.numpy(), SD1_PREVIEW_MAP)) for lat in out]
    ours_db = np.mean([psnr(a, b) for a, b in zip(ours, target)])
    sd1_db = np.mean([psnr(a, b) for a, b in zip(sd1, target)])
    # Measured: 11.3 dB against 2.8 dB with the SD 1.x factors (a linear map of a non-linear decoder: coarse).
    assert ours_db >= 10.0 and ours_db > sd1_db + 6.0, (ours_db, sd1_db)


def test_the_preview_decoder_draws_what_the_vae_draws(pipe):
    tiny = load_preview_decoder(EMBEDDED_MODEL_DIR, 4, 8)
    scenes = held_out_scenes()[3::40]
    out = _generate(pipe, [s.caption() for s in scenes], list(range(len(scenes))), output_type="latent").images
    with torch.no_grad():
        full = _u8(((pipe.vae.decode(out / pipe.vae.config.scaling_factor).sample + 1) / 2).permute(0, 2, 3, 1).numpy())
    quick = [np.asarray(tiny.to_image(lat.numpy())) for lat in out]
    values = [psnr(a, b) for a, b in zip(full, quick)]
    # Measured: 30.5 dB mean on these 6 (the evaluation's 368: 29.8 dB)
    assert np.mean(values) >= 27.0, values
    for a, b, scene in zip(full, quick, scenes):  # what the preview shows is what the image will show
        va, vb = check(a, scene).reading, check(b, scene).reading
        assert (va.colour, va.background, va.position) == (vb.colour, vb.background, vb.position), (va, vb)
