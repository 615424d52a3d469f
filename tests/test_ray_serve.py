"""The backend on a real local Ray cluster with a real Redis, against the single-process backend.

One module fixture starts Redis, Ray and the three deployments (about 40 s here); the tests reconfigure batching
in place (Serve's user_config) rather than redeploying.
"""

from __future__ import annotations

import glob
import os
import socket
import ssl
import threading
import time
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from bench.replay import RecordingASGI, replay, step_answers
from hediff.backend.auth import TokenStore
from hediff.backend.ray_serve import (
    APP_NAME,
    RayServeConfig,
    batch_sizes,
    build_app,
    clear_metrics,
    served_sessions,
    start_ray_backend,
)
from hediff.backend.serve import check_tls_files
from hediff.common import he, protocol
from hediff.desktop.core.backend_client import BackendClient
from hediff.desktop.core.client_model import ClientModel
from hediff.desktop.core.engine import GenerationParams, Generator
from tests.test_tls import self_signed

pytestmark = pytest.mark.slow

SIZE = 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayBackend:
    def __init__(self, running, config: RayServeConfig, tokens: list[str], ca: Path):
        self.running, self.config, self.url = running, config, running.url
        self.ca = ca  # the deployment serves HTTPS with a self-signed certificate (Serve's http_options)
        self.verify = ssl.create_default_context(cafile=str(ca))
        self.tokens = tokens  # one per simulated user
        self.token = tokens[0]

    def set_batching(self, max_batch_size: int, batch_wait_s: float = 0.05) -> None:
        """Serve's in-place update: only the UNet tier's user_config changes, no replica restarts."""
        from ray import serve

        self.config = replace(self.config, max_batch_size=max_batch_size, batch_wait_s=batch_wait_s)
        serve.run(build_app(self.config), name=APP_NAME, route_prefix="/", blocking=False)
        deadline = time.monotonic() + 60
        from ray.serve import status

        while status().applications[APP_NAME].status != "RUNNING":
            assert time.monotonic() < deadline, "the batching update did not apply"
            time.sleep(0.2)


@pytest.fixture(scope="module")
def ray_backend(tiny_model_dir, redis_url, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ray-backend")
    tokens = TokenStore(path=folder / "tokens.json")
    user_tokens = [tokens.create(f"ray-tests-{i}") for i in range(8)]
    config = RayServeConfig(
        model_path=str(tiny_model_dir),
        model_id="tiny-test",
        tokens_path=str(folder / "tokens.json"),
        redis_url=redis_url,
        session_replicas=2,
        session_workers=4,
        device="cpu",
        dtype="float32",
        # CPU kernels split sums by thread count: the same count as this process's single-process backend
        torch_threads=torch.get_num_threads(),
        max_batch_size=1,  # batching off first
        batch_wait_s=0.0,
    )
    cert, key = self_signed(folder, "ray-ingress")
    running = start_ray_backend(config, port=_free_port(), num_cpus=8, tls=check_tls_files(cert, key))
    assert running.url.startswith("https://")
    backend = RayBackend(running, config, user_tokens, cert)
    yield backend
    running.stop()
    # after shutdown: no Ray process of this cluster and no ciphertext scratch file of a replica is left
    import psutil

    leftovers = [
        p.info["name"]
        for p in psutil.process_iter(["name", "cmdline"])
        if p.info["cmdline"] and any(("ray::" in c or "raylet" in c or "gcs_server" in c) for c in p.info["cmdline"])
    ]
    assert leftovers == []
    own = f"{he.SCRATCH_PREFIX}{os.getpid()}-"
    scratch = [f for f in glob.glob(os.path.join(he._scratch_dir(), he.SCRATCH_PREFIX + "*")) if own not in f]
    assert scratch == []


@pytest.fixture(scope="module")
def local(server_model):
    from hediff.backend.app import create_app
    from hediff.backend.serve import start_in_thread

    tokens, token = TokenStore.ephemeral("tests")
    recorder = RecordingASGI(create_app(server_model, tokens))
    running = start_in_thread(recorder)
    yield running.url, token, recorder
    running.stop()


def _params(**kw) -> GenerationParams:
    base = dict(
        prompt="a red circle",
        negative_prompt="blurry",
        steps=4,
        guidance=7.5,
        seed=0,
        width=SIZE,
        height=SIZE,
        scheduler="plms",
        encryption="full",
        split="conv_in",
    )
    base.update(kw)
    return GenerationParams(**base)


def _generate(model_dir, url: str, token: str, tls_ca: Path | None = None, **kw):
    params = _params(**kw)
    with BackendClient(url, token, timeout_s=120, tls_ca=tls_ca) as client:
        return Generator(ClientModel(model_dir, params.split), client).generate(params)


def _without_timings(frame: protocol.Frame) -> dict:
    meta = dict(frame.meta)
    meta.pop("timings", None)
    return meta


def _split_modes(server_model):
    modes = []
    for split_name in server_model.splits:
        if split_name.startswith("u"):
            modes.append((split_name, "none", None))
            continue
        modes += [(split_name, "none", None), (split_name, "min-distortion", "fast")]
        modes += [(split_name, "full", preset) for preset in he.PRESETS]
    return modes


def test_batching_off_every_split_and_preset_answers_bit_identically(ray_backend, local, tiny_model_dir, server_model):
    url, token, recorder = local
    modes = _split_modes(server_model)
    assert len(modes) >= 8, modes
    for split_name, encryption, preset in modes:
        recorder.exchanges.clear()
        kw = dict(split=split_name, encryption=encryption, tau=0.1)
        if preset is not None:
            kw["he_preset"] = preset
        _generate(tiny_model_dir, url, token, **kw)
        recorded = list(recorder.exchanges)
        answers = replay(ray_backend.url, ray_backend.token, recorded, verify=ray_backend.verify)
        expected = step_answers(recorded)
        assert len(answers) == len(expected) >= 4
        for step, (got, want) in enumerate(zip(answers, expected)):
            g, w = protocol.decode_frame(got), protocol.decode_frame(want)
            where = f"{split_name}/{encryption}/{preset} step {step}"
            assert _without_timings(g) == _without_timings(w), where
            assert g.blobs == w.blobs, where  # ciphertexts, byte for byte
            assert g.tensors.keys() == w.tensors.keys(), where
            for name in g.tensors:
                assert np.array_equal(g.tensors[name], w.tensors[name]), f"{where}: {name}"


def _concurrently(n: int, fn):
    results, errors = [None] * n, []

    def run(i):
        try:
            results[i] = fn(i)
        except Exception as e:  # noqa: BLE001 - reported below with its index
            errors.append((i, repr(e)))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert errors == []
    return results


def test_eight_clients_are_batched_stay_on_one_replica_and_match_the_single_process_backend(
    ray_backend, local, tiny_model_dir
):

    ray_backend.set_batching(8, batch_wait_s=0.05)
    clear_metrics(ray_backend.config.redis_url)
    url, token, recorder = local
    # plaintext sessions, so that the batched answers can be compared number by number with the single-process
    # ones for the same requests: four schedulers, U-shaped and paper splits
    recorded = []
    for i in range(4):  # replayed twice each: 8 clients
        recorder.exchanges.clear()
        scheduler = ("plms", "ddim", "euler", "dpmpp-2m")[i % 4]
        _generate(
            tiny_model_dir,
            url,
            token,
            steps=8,
            seed=i,
            encryption="none",
            scheduler=scheduler,
            split="u1" if i == 3 else "conv_in",
            count=2 if i == 2 else 1,  # two images in one session: their rows stay together in a batch
        )
        recorded.append(list(recorder.exchanges))
    recorded = recorded + recorded
    answers = _concurrently(
        8, lambda i: replay(ray_backend.url, ray_backend.tokens[i], recorded[i], verify=ray_backend.verify)
    )
    # float32 kernels round differently at another batch size; the difference is measured relative to the answer's
    # scale (Euler's latents reach sigma_max ~ 15), where 1e-5 is a few float32 ulps
    worst: dict[int, tuple[float, float]] = {}
    for i in range(8):
        expected = step_answers(recorded[i])
        assert len(answers[i]) == len(expected)
        for got, want in zip(answers[i], expected):
            g, w = protocol.decode_frame(got), protocol.decode_frame(want)
            assert _without_timings(g) == _without_timings(w) and g.tensors.keys() == w.tensors.keys()
            for name in g.tensors:
                ref = w.tensors[name].astype(np.float64)
                diff = float(np.abs(g.tensors[name].astype(np.float64) - ref).max())
                scale = max(1.0, float(np.abs(ref).max()))
                worst[i] = max(worst.get(i, (0.0, 0.0)), (diff / scale, diff))
    assert max(rel for rel, _ in worst.values()) <= 1e-5, f"client: (relative, absolute) difference {worst}"
    sizes = batch_sizes(ray_backend.config.redis_url)
    assert max(sizes) >= 2 and np.mean(sizes) > 1.2, sizes
    served = list(served_sessions(ray_backend.config.redis_url).values())
    assert len(served) == 8
    # every call of a session on one replica (which replica a session hashes to is chance: 8 sessions all on one
    # of two replicas happens once in 128 runs; the kill test below shows sessions on both and moving between them)
    assert all(len(by) == 1 for by in served), served


def _session_replica_actors():
    import ray

    found = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        name = entry["name"] if isinstance(entry, dict) else entry
        if name.startswith(f"SERVE_REPLICA::{APP_NAME}#SessionTier#"):
            found.append((name.rsplit("#", 1)[1], ray.get_actor(name, namespace="serve")))
    return found


def test_killing_a_session_replica_mid_generation_loses_no_session(ray_backend, tiny_model_dir, pipe_latents):
    import ray

    clear_metrics(ray_backend.config.redis_url)
    n, steps = 6, 16
    killed = {}

    def kill_when_running():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            served = list(served_sessions(ray_backend.config.redis_url).values())
            busy = [by for by in served if 2 <= sum(by.values()) < steps]
            if len(busy) >= 3:
                counts: dict[str, int] = {}
                for by in busy:
                    for rid in by:
                        counts[rid] = counts.get(rid, 0) + 1
                victim = max(counts, key=counts.get)
                actors = dict(_session_replica_actors())
                ray.kill(actors[victim], no_restart=True)
                killed["replica"], killed["sessions"] = victim, counts[victim]
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_when_running)
    killer.start()
    results = _concurrently(
        n,
        lambda i: _generate(
            tiny_model_dir,
            ray_backend.url,
            ray_backend.tokens[i],
            tls_ca=ray_backend.ca,
            steps=steps,
            seed=i,
            encryption="full" if i % 2 else "none",
        ),
    )
    killer.join()
    assert killed.get("sessions", 0) >= 1, "no replica was killed while it held sessions"
    for i, result in enumerate(results):
        diff = float(np.abs(result.latent - pipe_latents(i, steps)).max())
        assert diff <= 1e-3, f"session {i}: final latent differs from diffusers by {diff:.2e}"
    served = list(served_sessions(ray_backend.config.redis_url).values())
    moved = [by for by in served if killed["replica"] in by]
    assert moved and all(len(by) >= 2 for by in moved), served  # the victim's sessions went on elsewhere


@pytest.fixture(scope="module")
def pipe_latents(tiny_model_dir):
    import torch
    from diffusers import StableDiffusionPipeline

    from hediff.common.schedulers import make_scheduler

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = make_scheduler("plms", pipe.scheduler.config)
    cache = {}

    def latents(seed: int, steps: int) -> np.ndarray:
        if (seed, steps) not in cache:
            out = pipe(
                prompt="a red circle",
                negative_prompt="blurry",
                num_inference_steps=steps,
                guidance_scale=7.5,
                height=SIZE,
                width=SIZE,
                generator=torch.Generator("cpu").manual_seed(seed),
                output_type="latent",
            ).images
            cache[(seed, steps)] = out[0].double().numpy()
        return cache[(seed, steps)]

    return latents


def test_the_ingress_keeps_the_single_process_error_format_and_limits(ray_backend):
    with httpx.Client(base_url=ray_backend.url, timeout=30, verify=ray_backend.verify) as http:
        assert http.get("/v1/health").json()["status"] == "ok"
        r = http.get("/v1/capabilities")
        assert r.status_code == 401 and r.json()["error"] == "unauthorized"
        auth = {"Authorization": f"Bearer {ray_backend.token}"}
        caps = http.get("/v1/capabilities", headers=auth).json()
        assert caps["model"]["id"] == "tiny-test" and caps["model"]["device"] == "cpu"
        r = http.post("/v1/sessions", content=b"not a frame", headers={**auth, "content-type": "text/plain"})
        assert r.status_code == 415 and r.json()["error"] == "unsupported_media_type"
        r = http.post(
            "/v1/sessions/nope/steps", content=b"x", headers={**auth, "content-type": protocol.FRAME_CONTENT_TYPE}
        )
        assert r.status_code == 404 and r.json()["error"] == "session_not_found"
