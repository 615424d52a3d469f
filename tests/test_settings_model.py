"""The one settings model (common.settings): its rules, its serialisations, the limits derived from a model and
a server, and that the wire header, the stored settings and the PNG metadata go through it."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from PIL import Image

from hediff.common import protocol
from hediff.common import settings as gs
from hediff.common.settings import SCHEDULER_NAMES, GenerationSettings, SettingsError, SizeLimits


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("guidance", math.nan, "guidance must be a finite number in [0, 50], got nan"),
        ("guidance", math.inf, "guidance must be a finite number in [0, 50], got inf"),
        ("steps", 0, "steps must be an integer in [1, 1000], got 0"),
        ("steps", True, "steps must be an integer in [1, 1000], got True"),
        ("steps", "5", "steps must be an integer in [1, 1000], got '5'"),
        ("width", 4096, "width must be a multiple of 8 in [0, 2048] (0: the model's native size), got 4096"),
        ("height", 30, "height must be a multiple of 8 in [0, 2048] (0: the model's native size), got 30"),
        ("seed", -1, f"seed must be an integer in [0, {gs.SEED_MAX}], got -1"),
        ("tau", 1.5, "tau must be a finite number in [0, 1], got 1.5"),
        ("scheduler", "lms", f"scheduler must be one of {', '.join(SCHEDULER_NAMES)}, got 'lms'"),
        ("encryption", "partial", "encryption must be one of full, min-distortion, random-mask, none, got 'partial'"),
        ("split", "u4", "split must be one of conv_in, down0.resnet0, u1, u2, u3, got 'u4'"),
    ],
)
def test_a_bad_value_names_the_field_and_what_is_allowed(field, value, message):
    with pytest.raises(SettingsError) as info:
        GenerationSettings(prompt="x", **{field: value})
    assert str(info.value) == message
    assert info.value.field == field
    assert info.value.for_option().startswith(f"--{field.replace('_', '-')} must be ")


def test_rules_across_fields_and_unknown_fields():
    with pytest.raises(SettingsError, match="encryption 'random-mask' only applies to the paper's splits"):
        GenerationSettings(split="u1", encryption="random-mask")
    assert GenerationSettings(split="u1", encryption="none").split == "u1"
    with pytest.raises(TypeError, match="unknown setting 'sampler'; the settings are: prompt, negative_prompt"):
        GenerationSettings(sampler="ddim")
    base = GenerationSettings(prompt="x")
    with pytest.raises(SettingsError, match="steps must be"):  # replace validates too
        dataclasses.replace(base, steps=0)
    assert dataclasses.replace(base, steps=3).steps == 3 and base.steps == gs.DEFAULT_STEPS
    with pytest.raises(SettingsError, match="the prompt is empty"):
        GenerationSettings(prompt="  ").validate()


def test_the_vocabularies_are_the_ones_the_implementations_use():
    from hediff.common import he, schedulers, selection, split

    assert schedulers.SCHEDULER_NAMES is gs.SCHEDULER_NAMES
    assert split.SPLIT_POINTS is gs.SPLIT_POINTS and split.DEFAULT_SPLIT == gs.DEFAULT_SPLIT == "conv_in"
    assert tuple(he.PRESETS) == gs.HE_PRESET_NAMES and he.DEFAULT_PRESET == gs.DEFAULT_HE_PRESET
    assert protocol.ENCRYPTION_CHOICES == tuple(gs.Encryption) == ("full", "min-distortion", "random-mask", "none")
    assert selection.select_mask(np.zeros((4, 8, 8)), gs.Encryption.FULL) is None
    with pytest.raises(ValueError, match="selects no index set"):
        selection.select_mask(np.zeros((4, 8, 8)), gs.Encryption.NONE)
    for name in ("width", "height"):  # the GUI form, the CLI and the API read their defaults here
        assert gs.default(name) == 0


def test_stored_settings_round_trip_and_bad_stored_values_are_reported(tmp_path):
    from hediff.desktop.core.settings import Settings, params_from_dict

    params = GenerationSettings(
        prompt="p", steps=9, guidance=2.5, width=48, scheduler="euler", split="u1", encryption="none"
    )
    data = json.loads(json.dumps(params.to_dict()))
    assert GenerationSettings.from_dict(data) == params
    assert "prompt" not in params.to_dict(include_prompt=False)

    (tmp_path / "settings.json").write_text(json.dumps({"params": {"steps": 0, "guidance": 2.0}}))
    loaded = Settings.load(tmp_path)
    assert loaded.params == {} and "steps must be an integer in [1, 1000], got 0" in loaded.problem
    (tmp_path / "settings.json").write_text(json.dumps({"params": {"sampler": "ddim"}}))
    assert "unknown setting 'sampler'" in Settings.load(tmp_path).problem
    (tmp_path / "settings.json").write_text(json.dumps({"params": {"guidance": 2.0}}))
    loaded = Settings.load(tmp_path)
    assert loaded.problem is None and params_from_dict(loaded.params).guidance == 2.0


def test_png_metadata_round_trips_through_the_model(tmp_path):
    from hediff.desktop.core.engine import GenerationResult

    params = GenerationSettings(
        prompt="a red circle", negative_prompt="blurry", steps=4, guidance=3.0, seed=7, width=32, height=40,
        scheduler="ddim", encryption="random-mask", mask_fraction=0.5, he_preset="paper", activation_dtype="float16",
    )  # fmt: skip
    image = Image.new("RGB", (32, 40), (10, 20, 30))
    result = GenerationResult(params=params, image=image, latent=np.zeros((4, 5, 4)), encrypted_fractions=[0.5])
    result.save(tmp_path / "a.png")
    text = Image.open(tmp_path / "a.png").text
    assert "hediff:prompt" not in text and "red circle" not in json.dumps(text)
    assert GenerationSettings.from_text(text) == dataclasses.replace(params, prompt="", negative_prompt="")
    assert text["hediff:mean_encrypted_fraction"] == "0.5000"
    result.save(tmp_path / "b.png", include_prompt=True)
    assert GenerationSettings.from_text(Image.open(tmp_path / "b.png").text) == params
    with pytest.raises(SettingsError, match="steps must be an integer in \\[1, 1000\\], got 'many'"):
        GenerationSettings.from_text({"hediff:steps": "many"})


def test_size_limits_come_from_the_model_config_and_the_server(tiny_model_dir, tmp_path):
    limits = SizeLimits.from_model_folder(tiny_model_dir)
    assert (limits.native_side, limits.max_side, limits.multiple) == (32, 64, 8)  # 2x the native 32 px
    assert SizeLimits.from_model_folder(tiny_model_dir, server_max_side=40).max_side == 40
    assert SizeLimits.for_model(512).max_side == 1024 and SizeLimits.for_model(1024).max_side == gs.MAX_SIDE
    limits.check(GenerationSettings(width=64, height=0))
    with pytest.raises(SettingsError) as info:
        limits.check(GenerationSettings(width=72))
    assert info.value.for_option() == (
        "--width must be a multiple of 8 in [8, 64] for this model (0: the model's native size), got 72"
    )
    with pytest.raises(SettingsError, match="steps must be an integer in \\[1, 10\\] on this server, got 20"):
        SizeLimits.for_model(32, max_steps=10).check(GenerationSettings())
    with pytest.raises(SettingsError, match="has no readable UNet/VAE config"):
        SizeLimits.from_model_folder(tmp_path)


def test_the_server_advertises_its_limits_and_refuses_what_exceeds_them(backend, server_model):
    from hediff.backend.engine import Limits
    from hediff.desktop.core.backend_client import BackendClient
    from tests.test_ushape import _open

    with BackendClient(backend.url, backend.token) as client:
        advertised = SizeLimits.from_capabilities(client.capabilities())
    assert advertised == server_model.size_limits(Limits()) == SizeLimits(32, 64, 500, 8)

    def open_session(**meta):
        return _open(backend, server_model, split="conv_in", **meta)

    refused = {
        "width": (dict(width=72), "'width' must be at most 64 for this model (2x its native 32 px), got 72"),
        "height": (dict(height=4096), "'height' must be an integer in [8, 2048], got 4096"),
        "guidance": (dict(guidance=math.nan), "'guidance' must be a finite number in [0, 50], got nan"),
        "steps": (dict(steps=501), "'steps' must be an integer in [1, 500] on this server, got 501"),
        "scheduler": (dict(scheduler="lms"), f"'scheduler' must be one of {', '.join(SCHEDULER_NAMES)}, got 'lms'"),
        "activation_dtype": (dict(activation_dtype=1), "'activation_dtype' must be one of float32, float16, got 1"),
    }
    for meta, message in refused.values():
        r = open_session(**meta)
        assert r.status_code == 400 and r.json()["detail"] == message, r.text
    assert open_session(width=64, height=64).status_code == 201


def test_the_wire_header_is_the_settings_models_serialisation():
    header = protocol.SessionSettings(
        scheduler="ddim", steps=2, guidance=7.5, height=32, width=32, split="conv_in", encryption="full",
        he_preset="fast", activation_dtype="float16", plan_digest="ab" * 32, weights_digest="cd" * 32,
    )  # fmt: skip
    meta = protocol.decode_frame(protocol.Frame(meta=header.to_meta()).encode()).meta
    assert protocol.SessionSettings.from_meta(meta) == header
    with pytest.raises(protocol.ProtocolError, match="'steps' is missing: it must be an integer in \\[1, 1000\\]"):
        protocol.SessionSettings.from_meta({k: v for k, v in meta.items() if k != "steps"})
    with pytest.raises(protocol.ProtocolError, match="'he_preset' must be one of fast, paper for an encrypted"):
        protocol.SessionSettings.from_meta({**meta, "he_preset": None})
    with pytest.raises(protocol.ProtocolError, match="'split' must be one of conv_in on this server"):
        protocol.SessionSettings.from_meta({**meta, "split": "u1", "encryption": "none"}, splits=("conv_in",))
    with pytest.raises(protocol.ProtocolError, match="'weights_digest' must be the 64-character hex SHA-256"):
        protocol.SessionSettings.from_meta({**meta, "weights_digest": "not hex"})
