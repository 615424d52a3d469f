"""The settings model behind the entry points: the CLI's options and early checks, the Python API's keywords,
and the desktop form's ranges."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from hediff.common import protocol
from hediff.common import settings as gs
from hediff.common.settings import GenerationSettings, SettingsError

PROMPT = "a red circle"

# runs the CLI in a fresh interpreter and reports whether torch (and so any model) was ever imported
_PROBE = """
import json, sys
from hediff.desktop.cli import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "torch": "torch" in sys.modules, "diffusers": "diffusers" in sys.modules}))
"""


def _cli_probe(*args: str) -> tuple[dict, str]:
    done = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, timeout=300)
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["--width", "4096"], "--width must be a multiple of 8 in [0, 2048] (0: the model's native size), got 4096"),
        (["--width", "72"], "--width must be a multiple of 8 in [8, 64] for this model (0: the model's native size), "
                            "got 72"),
        (["--guidance", "nan"], "--guidance must be a finite number in [0, 50], got nan"),
        (["--steps", "0"], "--steps must be an integer in [1, 1000], got 0"),
        (["--plaintext", "--encryption", "full"],
         "--plaintext means --encryption none, but --encryption full was given"),
        (["--token", "t"], "--token is for --server; --local-backend makes its own"),
    ],
)  # fmt: skip
def test_cli_refuses_bad_settings_before_loading_anything(tiny_model_dir, args, message):
    """Exit 2 with one line naming the option and the allowed range, without importing torch (so no model
    weights can have been read): the size limit comes from the model folder's config alone."""
    report, err = _cli_probe("generate", "--local-backend", "--model", str(tiny_model_dir), "--prompt", "x", *args)
    assert report == {"rc": 2, "torch": False, "diffusers": False}
    assert err.strip().splitlines() == [f"hediff: error: {message}"]


def test_cli_refuses_an_unwritable_out_path_before_loading_anything(tiny_model_dir, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    for out, message in (
        (tmp_path / "file" / "img.png", f"--out {str(tmp_path / 'file' / 'img.png')!r} cannot be written"),
        (tmp_path, f"--out {str(tmp_path)!r} is a folder"),
        (tmp_path / "img.jpg", "--out must be a .png file"),
    ):
        report, err = _cli_probe("generate", "--local-backend", "--model", str(tiny_model_dir), "--prompt", "x",
                                 "--out", str(out))  # fmt: skip
        assert report["rc"] == 2 and not report["torch"] and message in err, err


def test_cli_checks_the_servers_advertised_limits_before_loading(tiny_model_dir, backend):
    report, err = _cli_probe("generate", "--accept-not-private", "--server", backend.url, "--token", backend.token,
                             "--model", str(tiny_model_dir), "--prompt", "x", "--steps", "600")  # fmt: skip
    assert report == {"rc": 2, "torch": False, "diffusers": False}
    assert err.strip() == "hediff: error: --steps must be an integer in [1, 500] on this server, got 600"


def test_cli_options_are_the_settings_fields():
    from hediff.desktop.cli import build_parser

    generate = build_parser()._subparsers._group_actions[0].choices["generate"]
    actions = {a.dest: a for a in generate._actions}
    for name in GenerationSettings.__pydantic_fields__:
        action = actions[name]
        assert action.option_strings == ["--" + name.replace("_", "-")]
        assert action.choices == gs.choices(name)
        assert gs.help_text(name) in action.help and gs.allowed(name) in action.help


def _steps(backend) -> list[protocol.Frame]:
    return [protocol.decode_frame(body) for path, body in backend.recorded if path.endswith("/steps")]


def _opened(backend) -> list[dict]:
    return [protocol.decode_frame(body).meta for path, body in backend.recorded if path.endswith("/sessions")]


def test_cli_flags_plaintext_activation_dtype_embed_prompt_he_preset(tiny_model_dir, backend, tmp_path, capsys):
    """Each flag by its effect: what went on the wire, what the PNG holds, how far the latent moved."""
    from hediff.desktop.cli import main

    base = [
        "generate",
        "--accept-not-private",
        "--server",
        backend.url,
        "--token",
        backend.token,
        "--model",
        str(tiny_model_dir),
    ]
    base += ["--prompt", PROMPT, "--steps", "2", "--scheduler", "ddim", "--quiet"]
    backend.recorded.clear()
    rc = main([*base, "--out", str(tmp_path / "ref.png"), "--latents-out", str(tmp_path / "ref.npy")])
    assert rc == 0, capsys.readouterr().err
    assert all(f.blobs and "latent" not in f.tensors for f in _steps(backend))  # encrypted by default
    assert _opened(backend)[-1]["he_preset"] == "fast"

    backend.recorded.clear()
    args = ["--plaintext", "--activation-dtype", "float16", "--embed-prompt"]
    rc = main([*base, *args, "--out", str(tmp_path / "p.png"), "--latents-out", str(tmp_path / "p.npy")])
    assert rc == 0, capsys.readouterr().err
    steps = _steps(backend)
    assert len(steps) == 2 and all(not f.blobs and f.tensors["latent"].dtype == np.float64 for f in steps)
    assert all(f.tensors["h"].dtype == np.float16 for f in steps)
    assert _opened(backend)[-1]["encryption"] == "none" and _opened(backend)[-1]["activation_dtype"] == "float16"
    text = Image.open(tmp_path / "p.png").text
    assert text["hediff:prompt"] == PROMPT and text["hediff:encryption"] == "none"
    assert text["hediff:activation_dtype"] == "float16"
    assert "hediff:prompt" not in Image.open(tmp_path / "ref.png").text
    moved = np.abs(np.load(tmp_path / "p.npy") - np.load(tmp_path / "ref.npy")).max()
    assert 0 < moved < 2e-2  # fp16 activations: close to the fp32 run, not identical

    backend.recorded.clear()
    rc = main([*base, "--he-preset", "paper", "--out", str(tmp_path / "h.png")])
    assert rc == 0, capsys.readouterr().err
    assert _opened(backend)[-1]["he_preset"] == "paper"
    assert Image.open(tmp_path / "h.png").text["hediff:he_preset"] == "paper"


# --- the Python API ---------------------------------------------------------------------------------------------


def test_api_applies_every_keyword_and_refuses_unknown_or_conflicting_ones(tiny_model_dir, backend, capfd):
    from hediff.desktop.core.api import HEDiffusion

    with pytest.raises(ValueError, match="local_backend=True starts its own backend"):
        HEDiffusion(tiny_model_dir, local_backend=True, token="hdt_x")
    with HEDiffusion(tiny_model_dir, server=backend.url, token=backend.token, accept_not_private=True) as hd:
        with pytest.raises(TypeError, match="unknown setting 'sampler'"):
            hd.generate(PROMPT, sampler="ddim")
        with pytest.raises(TypeError, match="takes a prompt or GenerationSettings"):
            hd.generate(42)
        with pytest.raises(SettingsError, match="width must be a multiple of 8 in \\[8, 64\\] for this model"):
            hd.generate(PROMPT, width=128)
        capfd.readouterr()
        backend.recorded.clear()
        given = GenerationSettings(prompt=PROMPT, steps=2, seed=1, scheduler="ddim")
        result = hd.generate(given, steps=3, seed=5, encryption="none")
        assert (result.params.steps, result.params.seed, result.params.encryption) == (3, 5, "none")
        assert len(_steps(backend)) == 3 and not any(f.blobs for f in _steps(backend))
        same = hd.generate(PROMPT, steps=3, seed=5, encryption="none", scheduler="ddim")
        assert np.array_equal(result.latent, same.latent)  # the overrides really were the settings used
        # the split is given once, with the settings: the client's models for it load on demand
        u = hd.generate(PROMPT, steps=2, scheduler="ddim", split="u1", encryption="none")
        assert u.params.split == "u1" and _opened(backend)[-1]["split"] == "u1"
    # no loading bars or library chatter from loading the models (other tests' servers may log here)
    err = capfd.readouterr().err
    assert "it/s]" not in err and "Loading" not in err
    import diffusers
    import transformers

    for library in (transformers, diffusers):
        assert library.utils.logging.get_verbosity() == library.utils.logging.ERROR
        assert not library.utils.logging.is_progress_bar_enabled()


def test_api_public_names_are_documented():
    import hediff
    from hediff.desktop.core import api

    assert hediff.__version__ and hediff.HEDiffusion is api.HEDiffusion
    for name in api.__all__:
        obj = getattr(api, name)
        if name != "__version__":
            assert obj.__doc__ and obj.__doc__.strip(), name
    for name, member in vars(api.HEDiffusion).items():
        if not name.startswith("_"):
            assert getattr(member, "__doc__", None) or getattr(member.fget, "__doc__", None), name


# --- the desktop form -------------------------------------------------------------------------------------------


def test_form_ranges_and_choices_are_the_models(qtbot, tiny_model_dir):
    from hediff.desktop.ui.params_form import ParamsForm

    form = ParamsForm()
    qtbot.addWidget(form)
    for name, spin in (
        ("steps", form.steps_spin),
        ("guidance", form.guidance_spin),
        ("seed", form.seed_spin),
        ("width", form.width_spin),
        ("height", form.height_spin),
        ("tau", form.tau_spin),
        ("mask_fraction", form.fraction_spin),
    ):
        assert (spin.minimum(), spin.maximum()) == gs.bounds(name), name
        assert spin.value() == gs.default(name), name
    combos = {"scheduler": form.scheduler_combo, "split": form.split_combo}
    for name, combo in combos.items():
        assert tuple(combo.itemText(i) for i in range(combo.count())) == gs.choices(name)
    for name, combo in {"encryption": form.encryption_combo, "he_preset": form.preset_combo}.items():
        assert tuple(combo.itemData(i) for i in range(combo.count())) == gs.choices(name)
    form.width_spin.setValue(4096)
    assert form.width_spin.value() == gs.MAX_SIDE  # the form cannot hold what every server refuses
    form.width_spin.setValue(36)
    assert form.width_spin.value() == 40  # nor a size that is not a multiple of 8
    form.set_model(str(tiny_model_dir))  # its config caps the size at twice its native 32 px
    form.width_spin.setValue(4096)
    assert form.width_spin.value() == 64 and form.height_spin.maximum() == 64


def test_form_stores_and_loads_through_the_model(qtbot):
    from hediff.desktop.ui.params_form import ParamsForm

    form = ParamsForm()
    qtbot.addWidget(form)
    wanted = GenerationSettings(prompt="p", steps=9, guidance=2.5, seed=4, width=40, encryption="random-mask",
                                mask_fraction=0.5, he_preset="paper", activation_dtype="float16")  # fmt: skip
    form.load_dict(wanted.to_dict())
    assert form.params() == wanted
    assert form.to_dict() == wanted.to_dict(include_prompt=False)
    form.load_dict({"steps": 0, "guidance": 3.0, "bogus": 1})  # refused values are skipped, the rest applies
    assert (form.params().steps, form.params().guidance) == (9, 3.0)
