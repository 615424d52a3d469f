"""Model folders (common.models): tiny model, resolving, validation, loaders, prompt encoding."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hediff.common import models
from hediff.common.models import ModelFolderError, ModelNotFoundError


@pytest.fixture(scope="module")
def tiny_pipe(tiny_model_dir: Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_model_dir, safety_checker=None, requires_safety_checker=False, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def model_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A writable copy of the tiny model (about 6 MB)."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "copy"))


# ---------------------------------------------------------------------------------------------------
# Tiny model
# ---------------------------------------------------------------------------------------------------


def test_tiny_model_layout_and_configs(tiny_model_dir):
    models.validate_model_folder(tiny_model_dir)
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert index["scheduler"] == ["diffusers", "PNDMScheduler"]
    assert (tiny_model_dir / "tokenizer" / "merges.txt").read_text().strip() == "#version: 0.2"
    assert len(json.loads((tiny_model_dir / "tokenizer" / "vocab.json").read_text())) == 514
    assert not list(tiny_model_dir.rglob("*.bin"))

    unet_cfg = models.load_unet_config(tiny_model_dir)
    assert unet_cfg["block_out_channels"] == [32, 64]
    assert unet_cfg["sample_size"] == 16 and unet_cfg["cross_attention_dim"] == 32
    sched = models.load_scheduler_config(tiny_model_dir)
    assert sched["_class_name"] == "PNDMScheduler"
    for key, value in models.SD15_SCHEDULER_CONFIG.items():
        assert sched[key] == value, key


def test_build_is_deterministic(tiny_model_dir, tmp_path):
    state = torch.random.get_rng_state()
    again = models.build_tiny_model(tmp_path / "again", seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)  # caller's RNG untouched
    other = models.build_tiny_model(tmp_path / "other", seed=1)
    for rel in (
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    ):
        assert (again / rel).read_bytes() == (tiny_model_dir / rel).read_bytes(), rel
        assert (other / rel).read_bytes() != (tiny_model_dir / rel).read_bytes(), rel


def test_tokenizer(tiny_model_dir, tmp_path):
    from transformers import CLIPTokenizer

    tok = models.load_tokenizer(tiny_model_dir)
    assert isinstance(tok, CLIPTokenizer)
    assert tok.model_max_length == 77
    assert tok.pad_token == "<|endoftext|>" and tok.bos_token == "<|startoftext|>"
    vocab = json.loads((tiny_model_dir / "tokenizer" / "vocab.json").read_text())
    tokens = [
        "<|startoftext|>",
        *["a</w>", "r", "e", "d</w>", "c", "i", "r", "c", "l", "e</w>"],
        "<|endoftext|>",
    ]
    expected = [vocab[t] for t in tokens]
    assert tok("a red circle").input_ids == expected
    padded = tok("a red circle", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(padded) == 77 and padded[: len(expected)] == expected
    assert set(padded[len(expected) :]) == {vocab["<|endoftext|>"]}
    assert tok("A  Red\tcircle").input_ids == expected  # lower-cased, whitespace-normalised like CLIP

    # The plain vocab.json + merges.txt files (without tokenizer.json) give the same tokenizer.
    plain = tmp_path / "tok"
    plain.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / "tokenizer" / name, plain / name)
    tok2 = CLIPTokenizer.from_pretrained(plain, local_files_only=True)
    assert tok2("a red circle").input_ids == expected


def test_pipeline_runs_offline(tiny_pipe):
    assert tiny_pipe.vae_scale_factor == 2
    images = tiny_pipe(
        "a red circle", num_inference_steps=2, height=32, width=32, generator=torch.Generator().manual_seed(0)
    ).images
    assert images[0].size == (32, 32)
    latents = tiny_pipe(
        "a red circle",
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).images
    assert latents.shape == (1, 4, 16, 16)
    assert torch.isfinite(latents).all()


def test_vae_scale_factor(tiny_model_dir):
    vae = models.load_vae(tiny_model_dir)
    with torch.no_grad():
        lat = vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mean
        img = vae.decode(lat).sample
    assert lat.shape == (1, 4, 16, 16)
    assert img.shape == (1, 3, 32, 32)


def test_loaders(tiny_model_dir):
    unet = models.load_unet(tiny_model_dir)
    assert type(unet).__name__ == "UNet2DConditionModel" and not unet.training
    assert unet.dtype == torch.float32 and unet.device.type == "cpu"
    te = models.load_text_encoder(tiny_model_dir, dtype=torch.bfloat16)
    assert te.dtype == torch.bfloat16 and not te.training
    vae = models.load_vae(tiny_model_dir, dtype=torch.bfloat16)
    assert vae.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------------
# Prompt encoding
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "negative"), [("a red circle", ""), ("a blue square", "blurry, ugly"), ("x" * 120, "")]
)
def test_encode_prompt_matches_pipeline(tiny_pipe, tiny_model_dir, prompt, negative):
    tok = models.load_tokenizer(tiny_model_dir)
    te = models.load_text_encoder(tiny_model_dir)
    cond, uncond = models.encode_prompt(tok, te, prompt, negative)
    ref_cond, ref_uncond = tiny_pipe.encode_prompt(prompt, torch.device("cpu"), 1, True, negative_prompt=negative)
    assert cond.shape == uncond.shape == (1, 77, 32)
    assert cond.dtype == torch.float32
    assert torch.equal(cond, ref_cond)
    assert torch.equal(uncond, ref_uncond)


def test_prompt_truncation_report(tiny_model_dir):
    tok = models.load_tokenizer(tiny_model_dir)
    assert models.count_prompt_tokens(tok, "a red circle") == 12  # char-level + start/end tokens
    assert not models.prompt_is_truncated(tok, "a red circle")
    assert not models.prompt_is_truncated(tok, "x" * 75)  # 77 tokens: fits exactly
    assert models.count_prompt_tokens(tok, "x" * 76) == 78
    assert models.prompt_is_truncated(tok, "x" * 76)


# ---------------------------------------------------------------------------------------------------
# resolve_model
# ---------------------------------------------------------------------------------------------------


@pytest.fixture
def no_embedded_assets(monkeypatch, tmp_path) -> Path:
    """An install without the shipped model: assets/embedded is missing, whatever is committed there."""
    missing = tmp_path / "no-assets"
    monkeypatch.setattr(models, "EMBEDDED_MODEL_DIR", missing)
    return missing


def test_embedded_without_the_shipped_model_is_an_error_not_a_random_model(no_embedded_assets, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(ModelNotFoundError) as info:
        models.resolve_model("embedded")
    msg = str(info.value)
    assert "embedded model is not installed" in msg and str(no_embedded_assets) in msg
    assert "reinstall" in msg and "assets/embedded" in msg and "--model" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing built or cached anywhere


def test_cli_generate_without_the_shipped_model_says_how_to_get_it(no_embedded_assets, capsys):
    from hediff.desktop.cli import main

    rc = main(["generate", "--local-backend", "--model", "embedded", "--prompt", "a red circle", "--quiet"])
    assert rc == 5  # EXIT_MODEL
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hediff: error: The embedded model is not installed")


def test_partially_installed_embedded_model_names_the_missing_file(tiny_model_dir, tmp_path, monkeypatch):
    partial = Path(shutil.copytree(tiny_model_dir, tmp_path / "embedded"))
    (partial / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    monkeypatch.setattr(models, "EMBEDDED_MODEL_DIR", partial)
    with pytest.raises(ModelFolderError, match=r"missing unet/diffusion_pytorch_model\.safetensors"):
        models.resolve_model("embedded")


def test_resolve_embedded_is_the_shipped_folder(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(models, "EMBEDDED_MODEL_DIR", tiny_model_dir)
    assert models.resolve_model("embedded") == tiny_model_dir


def test_resolve_existing_directory(tiny_model_dir, model_copy, monkeypatch):
    assert models.resolve_model(str(tiny_model_dir)) == tiny_model_dir.resolve()
    monkeypatch.chdir(model_copy.parent)
    assert models.resolve_model("copy") == model_copy.resolve()  # relative path wins over a hub id
    (model_copy / "vae" / "config.json").unlink()
    with pytest.raises(ModelFolderError, match=r"vae/config\.json"):
        models.resolve_model(str(model_copy))


def test_resolve_missing_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not found"):
        models.resolve_model(str(tmp_path / "nope"))
    with pytest.raises(ModelNotFoundError, match="not found"):
        models.resolve_model("./nope/nothing")


def test_resolve_hub_id_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as info:
        models.resolve_model("hediff-tests/definitely-not-a-model")
    msg = str(info.value)
    assert "hediff-tests/definitely-not-a-model" in msg
    assert "offline" in msg and "local folder" in msg


# ---------------------------------------------------------------------------------------------------
# validate_model_folder
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rel",
    [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "scheduler/scheduler_config.json",
    ],
)
def test_validate_missing_file(model_copy, rel):
    (model_copy / rel).unlink()
    with pytest.raises(ModelFolderError, match=rel.replace(".", r"\.")) as info:
        models.validate_model_folder(model_copy)
    assert "missing" in str(info.value)


def test_validate_missing_tokenizer(model_copy):
    shutil.rmtree(model_copy / "tokenizer")
    with pytest.raises(ModelFolderError, match=r"tokenizer/vocab\.json"):
        models.validate_model_folder(model_copy)


def test_validate_corrupt_files(model_copy):
    weights = model_copy / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelFolderError, match=r"unet/diffusion_pytorch_model\.safetensors.*not a readable"):
        models.validate_model_folder(model_copy)


def test_validate_corrupt_json(model_copy):
    (model_copy / "unet" / "config.json").write_text("{ nope")
    with pytest.raises(ModelFolderError, match=r"unet/config\.json.*not valid JSON"):
        models.validate_model_folder(model_copy)


def test_validate_bin_weights_only(model_copy):
    weights = model_copy / "text_encoder" / "model.safetensors"
    weights.rename(weights.with_name("pytorch_model.bin"))
    (model_copy / "text_encoder" / "model.bin").write_bytes(b"")
    with pytest.raises(ModelFolderError, match=r"text_encoder/model\.safetensors.*model\.bin.*safetensors"):
        models.validate_model_folder(model_copy)


def test_validate_not_a_directory(tmp_path):
    with pytest.raises(ModelFolderError, match="not a directory"):
        models.validate_model_folder(tmp_path / "absent")
    assert issubclass(ModelFolderError, ValueError)


# ---------------------------------------------------------------------------------------------------
# Misc
# ---------------------------------------------------------------------------------------------------


def test_recommended_settings(model_copy):
    assert models.recommended_settings(model_copy) == {}  # no hediff.json: the callers' own defaults
    file = model_copy / models.RECOMMENDED_SETTINGS_FILE
    file.write_text(json.dumps({"recommended": {"guidance": 2, "steps": 25, "future_knob": "x"}}))
    got = models.recommended_settings(model_copy)
    assert got == {"guidance": 2.0, "steps": 25} and isinstance(got["guidance"], float)
    assert models.recommended_settings_for(str(model_copy)) == got
    assert models.guidance_for(model_copy) == 2.0 and models.guidance_for(model_copy, 4.0) == 4.0
    file.unlink()
    assert models.guidance_for(model_copy) == models.SD_GUIDANCE == 7.5


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ('{"recommended": [2]}', "'recommended' is not an object"),
        ('{"recommended": {"guidance": "high"}}', "guidance='high'"),
        ('{"recommended": {"guidance": 99}}', r"float in \[0, 50\]"),
        ('{"recommended": {"guidance": true}}', "guidance=True"),
        ('{"recommended": {"guidance": NaN}}', "guidance=nan"),
        ('{"recommended": {"steps": 2.5}}', r"int in \[1, 1000\]"),
        ('{"recommended": {"steps": 0}}', "steps=0"),
    ],
)
def test_bad_recommended_settings_name_the_file(model_copy, content, message):
    (model_copy / models.RECOMMENDED_SETTINGS_FILE).write_text(content)
    with pytest.raises(ModelFolderError, match=message) as info:
        models.recommended_settings(model_copy)
    assert "hediff.json" in str(info.value)
    # form defaults must not fail on it: loading the model reports the problem
    assert models.recommended_settings_for(str(model_copy)) == {}


def test_recommended_settings_for_unresolved_specs(tmp_path):
    assert models.recommended_settings_for("someone/some-model") == {}  # a hub id: never downloaded for this
    assert models.recommended_settings_for(str(tmp_path / "missing")) == {}


def test_sd15_unet_config_on_meta():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(models.SD15_UNET_CONFIG)
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    assert unet.config.cross_attention_dim == 768 and unet.config.sample_size == 64


def test_common_imports_no_gui_or_web_framework():
    code = (
        "import sys, common.models, common.split\n"
        "bad = {'fastapi', 'starlette', 'uvicorn', 'flask', 'PySide6', 'PySide2', 'PyQt5', 'PyQt6', 'gradio'}\n"
        "print(sorted(bad & {m.split('.')[0] for m in sys.modules}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_vae_scale_factor_and_prompt_tokens_match_the_pipeline(tiny_model_dir, tiny_pipe):
    assert models.vae_scale_factor(tiny_model_dir) == tiny_pipe.vae_scale_factor == 2
    assert models.prompt_token_count(tiny_model_dir) == tiny_pipe.tokenizer.model_max_length == 77
    assert models.vae_scale_factor(models.EMBEDDED_MODEL_DIR) == 8  # the shipped model: 3 VAE downsamplings, as SD
