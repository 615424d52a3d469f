"""LoRAs through the encrypted split and a real loopback backend: diffusers' own LoRA loading folds them into the
client's text encoder and UNet layers and the server's body at the same scale, and the result equals diffusers'
pipeline with ``load_lora_weights`` + ``set_adapters``. A server with another LoRA or scale refuses the session
before the first step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from hediff.backend.engine import ServerModel
from hediff.common.lora import LoraError, parse_lora, parse_loras, weights_digest
from hediff.common.models import unet_weights_digest
from hediff.common.schedulers import make_scheduler
from hediff.common.settings import GenerationSettings, SettingsError
from hediff.desktop.core.backend_client import BackendClient, BackendError
from hediff.desktop.core.client_model import ClientModel
from hediff.desktop.core.engine import Generator
from tests.conftest import start_backend
from tests.test_e2e import NEGATIVE, PROMPT, SIZE, params

STEPS = 4


def _random_lora(model_dir: Path, out: Path, seed: int) -> Path:
    """A LoRA with random (non-zero) weights on the UNet's attention and conv_in and the text encoder's
    attention, saved with diffusers' own save_lora_weights."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    torch.manual_seed(seed)
    unet_targets = ["to_q", "to_k", "to_v", "to_out.0", "conv_in"]
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=unet_targets))
    text_targets = ["q_proj", "k_proj", "v_proj", "out_proj"]
    pipe.text_encoder.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=text_targets))
    StableDiffusionPipeline.save_lora_weights(
        out,
        unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
    )
    return out


@pytest.fixture(scope="module")
def loras(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("loras")
    return _random_lora(tiny_model_dir, root / "a", seed=1), _random_lora(tiny_model_dir, root / "b", seed=2)


@pytest.fixture(scope="module")
def lora_entries(loras) -> tuple[str, ...]:
    return (f"{loras[0]}:0.8", f"{loras[1]}:-0.4")


@pytest.fixture(scope="module")
def lora_backend(tiny_model_dir, lora_entries):
    server = ServerModel(tiny_model_dir, "tiny-lora", device="cpu", dtype="float32", lora=lora_entries)
    running, info = start_backend(server)
    yield info
    running.stop()


_refs: dict = {}


def reference(model_dir, entries: tuple[str, ...], scheduler: str, seed: int) -> np.ndarray:
    """diffusers' pipeline with the LoRAs loaded its own way (unfused adapters at their scales)."""
    key = (str(model_dir), entries, scheduler, seed)
    if key not in _refs:
        pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        names = []
        for i, entry in enumerate(entries):
            path, scale = parse_lora(entry)
            pipe.load_lora_weights(path, adapter_name=f"l{i}")
            names.append((f"l{i}", scale))
        if names:
            pipe.set_adapters([n for n, _ in names], adapter_weights=[s for _, s in names])
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
        latents = pipe(
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            num_inference_steps=STEPS,
            guidance_scale=7.5,
            height=SIZE,
            width=SIZE,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="latent",
        ).images
        _refs[key] = latents[0].double().numpy()
    return _refs[key]


_clients: dict = {}


def _client(model_dir, split: str, lora: tuple[str, ...]) -> ClientModel:
    key = (split, lora)
    if key not in _clients:
        _clients[key] = ClientModel(model_dir, split, lora=lora)
    return _clients[key]


@pytest.mark.parametrize(
    ("split", "scheduler", "encryption"),
    [
        ("conv_in", "ddim", "full"),
        ("conv_in", "ddim", "none"),
        ("down0.resnet0", "euler-a", "full"),
        ("down0.resnet0", "euler-a", "none"),
        ("u1", "unipc", "none"),  # the LoRA in the client's attention blocks; a U-shaped split encrypts nothing
    ],
)
def test_loras_match_diffusers_through_the_split(
    tiny_model_dir, lora_entries, lora_backend, split, scheduler, encryption
):
    ref = reference(tiny_model_dir, lora_entries, scheduler, seed=3)
    with BackendClient(lora_backend.url, lora_backend.token) as client:
        result = Generator(_client(tiny_model_dir, split, lora_entries), client).generate(
            params(scheduler=scheduler, steps=STEPS, seed=3, split=split, encryption=encryption, lora=lora_entries)
        )
    diff = np.abs(result.latent - ref).max()
    assert diff <= 1e-3, f"{split}/{scheduler}/{encryption}: max abs latent difference {diff:.2e}"
    # the LoRAs changed the image: the same seed without them is far away
    plain = reference(tiny_model_dir, (), scheduler, seed=3)
    assert np.abs(result.latent - plain).max() > 0.05


def test_another_lora_scale_on_the_server_is_refused_before_the_first_step(
    tiny_model_dir, loras, lora_entries, lora_backend
):
    other_scale = (f"{loras[0]}:0.8", f"{loras[1]}:-0.3")
    lora_backend.recorded.clear()
    for lora in (other_scale, lora_entries[:1], ()):
        with BackendClient(lora_backend.url, lora_backend.token) as client:
            generator = Generator(_client(tiny_model_dir, "conv_in", lora), client)
            with pytest.raises(BackendError, match=r"with 2 LoRA\(s\)\): load .* the same LoRAs at the same scales"):
                generator.generate(params(steps=STEPS, lora=lora))
    assert not [p for p, _ in lora_backend.recorded if p.endswith("/steps")]  # refused at session open


def test_a_lora_client_is_refused_by_a_server_without_it(tiny_model_dir, lora_entries, backend):
    with BackendClient(backend.url, backend.token) as client:
        generator = Generator(_client(tiny_model_dir, "conv_in", lora_entries), client)
        with pytest.raises(BackendError, match=r"are not the server's.*with 0 LoRA\(s\)"):
            generator.generate(params(steps=STEPS, lora=lora_entries))


def test_the_digest_covers_each_lora_and_its_scale(tiny_model_dir, loras):
    base = unet_weights_digest(tiny_model_dir)
    assert weights_digest(tiny_model_dir) == base  # no LoRA: the UNet's digest, as before
    digests = {
        weights_digest(tiny_model_dir, parse_loras(entries))
        for entries in [
            [str(loras[0])],
            [f"{loras[0]}:1.0"],  # the same as scale 1 written out
            [f"{loras[0]}:0.5"],
            [str(loras[1])],
            [str(loras[0]), str(loras[1])],
        ]
    }
    assert len(digests) == 4 and base not in digests


def test_on_device_loras_are_diffusers_loras(tiny_model_dir, lora_entries):
    from hediff.desktop.core.on_device import OnDeviceGenerator

    result = OnDeviceGenerator(tiny_model_dir, lora=lora_entries).generate(
        params(scheduler="ddim", steps=STEPS, seed=3, lora=lora_entries)
    )
    assert np.abs(result.latent - reference(tiny_model_dir, lora_entries, "ddim", seed=3)).max() <= 1e-5


def test_lora_mistakes_are_named(tiny_model_dir, tmp_path, loras):
    with pytest.raises(SettingsError, match=r"lora must be a list of DIR\[:SCALE\]"):
        GenerationSettings(prompt="p", lora=(f"{loras[0]}:nan",))
    with pytest.raises(LoraError, match="does not exist"):
        parse_loras([str(tmp_path / "nowhere")])
    (tmp_path / "two").mkdir()
    for name in ("x.safetensors", "y.safetensors"):
        (tmp_path / "two" / name).write_bytes(b"")
    with pytest.raises(LoraError, match="exactly one .safetensors file"):
        parse_loras([str(tmp_path / "two")])
    assert parse_lora("C:/loras/x") == ("C:/loras/x", 1.0)  # a colon in a path is not a scale
    assert parse_lora("/loras/x:0.25") == ("/loras/x", 0.25)
    # the settings keep LoRAs through every stored form
    s = GenerationSettings(prompt="p", lora=(f"{loras[0]}:0.5",))
    assert (
        GenerationSettings.from_text(s.to_text(include_prompt=True)) == GenerationSettings.from_dict(s.to_dict()) == s
    )


def test_the_cli_takes_repeated_loras(tiny_model_dir, lora_entries, tmp_path, capsys):
    from hediff.desktop.cli import main

    base = ["generate", "--local-backend", "--model", str(tiny_model_dir), "--prompt", PROMPT, "--quiet"]
    base += ["--negative-prompt", NEGATIVE, "--steps", str(STEPS), "--scheduler", "ddim", "--seed", "3"]
    base += ["--width", str(SIZE), "--height", str(SIZE)]
    npy = tmp_path / "lat.npy"
    loras = [arg for entry in lora_entries for arg in ("--lora", entry)]
    rc = main([*base, *loras, "--out", str(tmp_path / "l.png"), "--latents-out", str(npy)])
    assert rc == 0, capsys.readouterr().err
    assert np.abs(np.load(npy)[0] - reference(tiny_model_dir, lora_entries, "ddim", seed=3)).max() <= 1e-3


def test_serve_takes_repeated_loras_and_a_confidential_generation_refuses_them(tmp_path, capsys):
    from hediff.desktop.cli import build_parser, main

    args = build_parser().parse_args(["serve", "--lora", "/l/a:0.5", "--lora", "/l/b"])
    assert args.lora == ["/l/a:0.5", "/l/b"]
    base = ["generate", "--confidential", "--server", "https://gpu-box:8470", "--token", "t", "--prompt", "p"]
    for extra, option in ((["--lora", "/l/a"], "--lora"), (["--count", "2"], "--count")):
        assert main([*base, *extra]) == 2
        assert f"{option} is not supported with --confidential yet" in capsys.readouterr().err
