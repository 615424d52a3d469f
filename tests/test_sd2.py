"""SD 2.x (v-prediction, linear projections, upcast attention, per-block head counts, a wider gelu text encoder)
through the encrypted split and a real loopback backend, checked against diffusers' StableDiffusionPipeline."""

from __future__ import annotations

import numpy as np
import pytest
from diffusers import StableDiffusionPipeline

from hediff.backend.engine import ServerModel
from hediff.desktop.core.backend_client import BackendClient
from hediff.desktop.core.client_model import ClientModel
from hediff.desktop.core.engine import Generator
from tests.conftest import start_backend
from tests.test_e2e import params, reference

STEPS = 4


@pytest.fixture(scope="module")
def sd2_pipe(tiny_sd2_model_dir):
    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_sd2_model_dir, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd2_served(tiny_sd2_model_dir):
    """The SD 2.x server model and a loopback backend running it."""
    server = ServerModel(tiny_sd2_model_dir, "tiny-sd2", device="cpu", dtype="float32")
    running, info = start_backend(server)
    yield server, info
    running.stop()


@pytest.fixture(scope="module")
def sd2_backend(sd2_served):
    return sd2_served[1]


_clients: dict[str, ClientModel] = {}


def _generate(model_dir, backend, **kw):
    key = f"{model_dir}:{kw['split']}"
    if key not in _clients:
        _clients[key] = ClientModel(model_dir, kw["split"])
    with BackendClient(backend.url, backend.token) as client:
        return Generator(_clients[key], client).generate(params(steps=STEPS, **kw))


def test_the_tiny_sd2_model_has_sd2s_features(sd2_pipe, sd2_served, server_model):
    sd2_server = sd2_served[0]
    unet = sd2_pipe.unet.config
    assert sd2_pipe.scheduler.config.prediction_type == "v_prediction"
    assert unet.use_linear_projection and unet.upcast_attention and list(unet.attention_head_dim) == [2, 4]
    assert sd2_pipe.text_encoder.config.hidden_act == "gelu" and unet.cross_attention_dim == 48
    assert sd2_pipe.tokenizer.pad_token == "!"
    assert sd2_server.splits == server_model.splits  # every split the SD 1.x test model runs
    assert sd2_server.cross_attention_dim == 48


@pytest.mark.parametrize("encryption", ["full", "min-distortion"])
@pytest.mark.parametrize(
    ("split", "scheduler"),
    [
        ("conv_in", "ddim"),  # SD 2.1's own scheduler
        ("conv_in", "euler-a"),
        ("conv_in", "dpmpp-2m"),
        ("conv_in", "heun"),
        ("down0.resnet0", "unipc"),
        ("down0.resnet0", "ddpm"),
    ],
)
def test_sd2_matches_diffusers_through_the_paper_split(
    sd2_pipe, tiny_sd2_model_dir, sd2_backend, split, scheduler, encryption
):
    ref_latent, _ = reference(sd2_pipe, scheduler, steps=STEPS, seed=1)
    result = _generate(
        tiny_sd2_model_dir, sd2_backend, split=split, scheduler=scheduler, encryption=encryption, tau=0.1, seed=1
    )
    diff = np.abs(result.latent - ref_latent).max()
    assert diff <= 1e-3, f"{split}/{scheduler}/{encryption}: max abs latent difference {diff:.2e}"
    assert result.latent.shape == (4, 16, 16)


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp-2m-sde", "lcm"])
def test_sd2_matches_diffusers_through_the_u_shaped_split(sd2_pipe, tiny_sd2_model_dir, sd2_backend, scheduler):
    ref_latent, _ = reference(sd2_pipe, scheduler, steps=STEPS, seed=2)
    result = _generate(tiny_sd2_model_dir, sd2_backend, split="u1", scheduler=scheduler, seed=2)
    diff = np.abs(result.latent - ref_latent).max()
    assert diff <= 1e-3, f"u1/{scheduler}: max abs latent difference {diff:.2e}"


def test_an_epsilon_client_is_refused_by_a_v_prediction_server(tiny_model_dir, sd2_backend):
    """An SD 1.x client (epsilon) on an SD 2.x server (v-prediction) would compute a different step: the server
    refuses the session before any step, naming the cause."""
    from hediff.desktop.core.backend_client import BackendError

    with pytest.raises(BackendError, match="step plan differs from the server's"):
        _generate(tiny_model_dir, sd2_backend, split="conv_in", scheduler="ddim")


def test_the_model_family_comes_from_the_folder(tiny_model_dir, tiny_sd2_model_dir, tiny_sdxl_model_dir, tmp_path):
    import json
    import shutil

    from hediff.common.models import ModelFolderError, model_family, validate_model_folder

    assert model_family(tiny_model_dir) == "sd1" and model_family(tiny_sd2_model_dir) == "sd2"
    assert model_family(tiny_sdxl_model_dir) == "sdxl"
    sd3 = tmp_path / "sd3"
    shutil.copytree(tiny_model_dir, sd3)
    index = json.loads((sd3 / "model_index.json").read_text())
    (sd3 / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusion3Pipeline"}))
    for check in (model_family, validate_model_folder):
        with pytest.raises(ModelFolderError, match="holds a 'StableDiffusion3Pipeline'.*Choose an SD 1.x, 2.x or XL"):
            check(sd3)
    # an SDXL folder without its second text encoder is named as such
    xl = tmp_path / "xl"
    shutil.copytree(tiny_sdxl_model_dir, xl)
    shutil.rmtree(xl / "text_encoder_2")
    with pytest.raises(ModelFolderError, match="missing text_encoder_2/config.json"):
        validate_model_folder(xl)
