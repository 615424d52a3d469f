"""The client's session loop: one round trip per denoising step, the latent only ever leaving encrypted.

In a U-shaped split the latent does not leave at all: the client runs the first and last UNet blocks, the
guidance and the scheduler step; the server gets the first blocks' output and returns the last blocks' input.

Qt-free: the CLI, the Python API and the desktop UI all drive ``Generator.generate``.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from hediff.common import he, protocol, split
from hediff.common.latent import EncryptedLatent, decrypt_latent, encrypt_latent, pack_mask
from hediff.common.schedulers import apply_step, build_plan, client_finish
from hediff.common.selection import new_mask_seed, random_mask, select_mask
from hediff.common.settings import GenerationSettings
from hediff.desktop.core.backend_client import BackendClient, BackendError, BackendProtocolError
from hediff.desktop.core.client_model import ClientModel
from hediff.desktop.core.preview import latent_preview

# "head" is all UNet work on this machine: in a U-shaped split it includes the tail, guidance and scheduler step
TIMING_KEYS = ("head", "select", "encrypt", "upload", "server_body", "server_he", "download", "decrypt")


class GenerationCancelled(Exception):
    pass


# the settings model under the name the engine has always used; one definition in common.settings
GenerationParams = GenerationSettings


@dataclass
class StepUpdate:
    index: int
    total: int
    timestep: int
    latent: np.ndarray  # decrypted x_{i+1}
    preview: Image.Image
    timings: dict[str, float]
    bytes_sent: int
    bytes_received: int
    encrypted_fraction: float
    elapsed_s: float
    eta_s: float
    sent: list[dict] = field(default_factory=list)  # what this step's request carried: name, kind, shape, bytes
    key_fingerprint: str | None = None


@dataclass
class GenerationResult:
    params: GenerationParams
    image: Image.Image
    latent: np.ndarray
    step_timings: list[dict[str, float]] = field(default_factory=list)
    bytes_sent: list[int] = field(default_factory=list)
    bytes_received: list[int] = field(default_factory=list)
    encrypted_fractions: list[float] = field(default_factory=list)
    setup_s: float = 0.0
    decode_s: float = 0.0
    total_s: float = 0.0
    server_url: str = ""
    key_fingerprint: str | None = None

    def timing_totals(self) -> dict[str, float]:
        return {k: float(sum(t.get(k, 0.0) for t in self.step_timings)) for k in TIMING_KEYS}

    def save(self, path, include_prompt: bool = False) -> None:
        """The image as PNG with the generation parameters in text chunks (the prompts only if asked)."""
        from pathlib import Path

        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        for k, v in self.metadata(include_prompt).items():
            info.add_text(k, v)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.image.save(path, pnginfo=info)

    def metadata(self, include_prompt: bool = False) -> dict[str, str]:
        """Generation parameters for PNG text chunks; the prompts only when the user asks for them."""
        meta = self.params.to_text(include_prompt)
        meta["hediff:mean_encrypted_fraction"] = (
            f"{np.mean(self.encrypted_fractions) if self.encrypted_fractions else 0:.4f}"
        )
        return meta


def describe_frame(frame: protocol.Frame) -> list[dict]:
    """What a request carries, for showing the user exactly what left the machine."""
    items = [
        {"name": k, "kind": "tensor", "dtype": str(v.dtype), "shape": list(v.shape), "bytes": int(v.nbytes)}
        for k, v in frame.tensors.items()
    ]
    items += [{"name": k, "kind": "ciphertext", "bytes": len(v)} for k, v in frame.blobs.items()]
    return items


def initial_noise(shape: tuple[int, ...], seed: int, init_noise_sigma: float) -> np.ndarray:
    """x_T exactly as diffusers' pipeline draws it: randn on a CPU generator seeded with ``seed``."""
    generator = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn((1, *shape), generator=generator, dtype=torch.float32)
    return (noise * init_noise_sigma)[0].numpy().astype(np.float64)


class Generator:
    def __init__(self, model: ClientModel, client: BackendClient):
        self.model = model
        self.client = client

    def generate(
        self,
        params: GenerationParams,
        on_step: Callable[[StepUpdate], None] | None = None,
        cancel: threading.Event | None = None,
        key: he.ClientKey | None = None,
    ) -> GenerationResult:
        """Run one generation. ``key``: a stored device key to use; by default a fresh key per generation."""
        params.validate()
        native = self.model.native_size
        params = dataclasses.replace(params, width=params.width or native, height=params.height or native)
        if params.split != self.model.split:
            raise ValueError(f"this client model was loaded for split {self.model.split!r}, not {params.split!r}")
        u_shaped = split.is_u_shaped(params.split)
        if u_shaped:  # nothing to encrypt: the latent never leaves; record what actually happened
            params = dataclasses.replace(params, encryption="none")
        t_start = time.perf_counter()
        plan = build_plan(params.scheduler, self.model.scheduler_config, params.steps)
        cond, uncond = self.model.encode_prompt(params.prompt, params.negative_prompt)
        if params.encryption == "none":
            key = None
        elif key is None:
            key = he.RotatingKey(params.he_preset)  # fresh keys per generation, each retired before its bound
        elif key.preset.name != params.he_preset:
            raise ValueError(
                f"the given key is for preset {key.preset.name!r}, the generation asks for {params.he_preset!r}"
            )
        settings = protocol.SessionSettings(
            scheduler=params.scheduler,
            steps=params.steps,
            guidance=params.guidance,
            height=params.height,
            width=params.width,
            split=params.split,
            encryption=params.encryption,
            he_preset=params.he_preset if key else None,
            activation_dtype=params.activation_dtype,
            plan_digest=plan.digest(),
        )
        open_frame = protocol.Frame(meta=settings.to_meta(), tensors={"cond": cond, "uncond": uncond})
        # the prompt batch the UNet runs on, in diffusers' order (negative first); guidance only when > 1
        embeds = np.concatenate([uncond, cond]) if params.guidance > 1.0 else cond
        if key is not None:
            open_frame.blobs["context"] = key.evaluation_context()
        opened = self.client.open_session(open_frame)
        session_id = opened.get("session_id")
        if not isinstance(session_id, str) or opened.get("plan_digest") != plan.digest():
            raise BackendProtocolError(f"{self.client.url} answered the session request inconsistently")
        latent_shape = tuple(opened.get("latent_shape", ()))
        expected_shape = (
            self.model.latent_channels,
            params.height // self.model.vae_scale_factor,
            params.width // self.model.vae_scale_factor,
        )
        if latent_shape != expected_shape:
            raise BackendProtocolError(
                f"{self.client.url} expects latents of shape {latent_shape}, this client's model makes "
                f"{expected_shape}; use the same model on both sides"
            )

        result = GenerationResult(params=params, image=None, latent=None, server_url=self.client.url)  # type: ignore[arg-type]
        result.key_fingerprint = key.fingerprint if key else None
        x = initial_noise(latent_shape, params.seed, plan.init_noise_sigma)
        history = {0: x}
        keep = max(plan.client_history_needed(), plan.latent_history_needed())  # latents terms and pivot masks
        masks: dict[int, np.ndarray | None] = {}  # step -> index set the server holds for that step's latent
        eps_history: dict[int, np.ndarray] = {}  # U-shaped: the guided noise predictions, computed here
        # drawn once from a fresh secret seed: the same index set every step, independent of the latent
        fixed_mask = (
            random_mask(latent_shape, params.mask_fraction, new_mask_seed())
            if params.encryption == "random-mask"
            else None
        )
        hidden_shape = (
            split.return_shape(self.model.head.unet_config, params.split, (len(embeds), *latent_shape))
            if u_shaped
            else None
        )
        n_cts = key.preset.ciphertexts_for(int(np.prod(latent_shape))) if key else 0
        if key:
            key.prepare(n_cts)
        result.setup_s = time.perf_counter() - t_start
        loop_start = time.perf_counter()
        try:
            for step in plan.steps:
                if cancel is not None and cancel.is_set():
                    raise GenerationCancelled(f"cancelled before step {step.index + 1} of {len(plan.steps)}")
                x = history[step.index]
                timings = dict.fromkeys(TIMING_KEYS, 0.0)
                t = time.perf_counter()
                kept = None
                if u_shaped:
                    activations, kept = self.model.run_u_head(
                        step.input_scale * x, step.timestep, embeds, params.activation_dtype
                    )
                else:
                    activations = self.model.run_head(step.input_scale * x, step.timestep, params.activation_dtype)
                timings["head"] = time.perf_counter() - t

                frame = protocol.Frame(meta={"step": step.index}, tensors=dict(activations))
                package = None
                if u_shaped:
                    pass  # the latent stays here: the activations are all that travel
                elif key is None:
                    frame.tensors["latent"] = x
                else:
                    t = time.perf_counter()
                    if fixed_mask is not None:
                        mask = fixed_mask
                    else:
                        mask = select_mask(x, params.encryption, params.tau)
                    timings["select"] = time.perf_counter() - t
                    t = time.perf_counter()
                    package = encrypt_latent(x, mask, key)
                    for i, ct in enumerate(package.ciphertexts):
                        frame.blobs[f"ct{i}"] = ct.serialize()
                    if mask is not None:
                        frame.tensors["mask"] = pack_mask(mask)
                        frame.tensors["remainder"] = package.remainder
                    timings["encrypt"] = time.perf_counter() - t
                    result.encrypted_fractions.append(package.encrypted_fraction)
                    masks[step.index] = mask

                # fresh encryptions of zero for the next step are made while the server works
                refill = threading.Thread(target=key.prepare, args=(n_cts,), daemon=True) if key else None
                exchange = self.client.step(session_id, frame, on_uploaded=refill.start if refill else None)
                server = exchange.frame.meta.get("timings", {}) if isinstance(exchange.frame.meta, dict) else {}
                timings["upload"] = exchange.upload_s
                timings["download"] = exchange.download_s
                timings["server_body"] = float(server.get("server_body_s", 0.0))
                timings["server_he"] = float(server.get("server_he_s", 0.0))
                if refill is not None and refill.is_alive():
                    refill.join()

                t = time.perf_counter()
                if u_shaped:
                    hidden = self._read_hidden(exchange.frame, step, hidden_shape, params.activation_dtype)
                    eps_history[step.index] = self.model.run_u_tail(hidden, kept, embeds, params.guidance)
                    history[step.index + 1] = apply_step(step, history, eps_history)
                    timings["head"] += time.perf_counter() - t
                    for k in [k for k in eps_history if k <= step.index - plan.eps_history_needed()]:
                        del eps_history[k]
                else:
                    y = self._read_answer(exchange.frame, step, latent_shape, key, masks.get(step.pivot))
                    history[step.index + 1] = client_finish(
                        step, y, history, key.preset.server_multiplies if key else False
                    )
                    timings["decrypt"] = time.perf_counter() - t
                for k in [k for k in history if k < step.index + 1 - keep]:
                    del history[k]
                    masks.pop(k, None)

                result.step_timings.append(timings)
                result.bytes_sent.append(exchange.bytes_sent)
                result.bytes_received.append(exchange.bytes_received)
                if on_step is not None:
                    done = step.index + 1
                    elapsed = time.perf_counter() - loop_start
                    on_step(
                        StepUpdate(
                            index=step.index,
                            total=len(plan.steps),
                            timestep=step.timestep,
                            latent=history[done],
                            preview=latent_preview(
                                history[done], self.model.preview_map, upscale=self.model.vae_scale_factor
                            )
                            if history[done].shape[0] == 4
                            else Image.new("RGB", (params.width, params.height)),
                            timings=timings,
                            bytes_sent=exchange.bytes_sent,
                            bytes_received=exchange.bytes_received,
                            encrypted_fraction=result.encrypted_fractions[-1] if key else 0.0,
                            elapsed_s=elapsed,
                            eta_s=elapsed / done * (len(plan.steps) - done),
                            sent=describe_frame(frame),
                            key_fingerprint=result.key_fingerprint,
                        )
                    )
        finally:
            try:
                self.client.close_session(session_id)
            except BackendError:  # the session expires on its own; closing is a courtesy
                pass

        result.latent = history[len(plan.steps)]
        t = time.perf_counter()
        result.image = self.model.decode(result.latent)
        result.decode_s = time.perf_counter() - t
        result.total_s = time.perf_counter() - t_start
        return result

    def _read_hidden(self, answer: protocol.Frame, step, shape, dtype: str) -> np.ndarray:
        """U-shaped split: the server's hidden state for this step."""
        try:
            if answer.meta.get("step") != step.index:
                raise protocol.ProtocolError(f"answer is for step {answer.meta.get('step')!r}, expected {step.index}")
            return protocol.require_tensor(answer, split.RETURN_NAME, shape, (dtype,))
        except protocol.ProtocolError as e:
            raise BackendProtocolError(f"{self.client.url} sent an unusable step answer: {e}") from None

    def _read_answer(
        self, answer: protocol.Frame, step, latent_shape, key: he.ClientKey | None, pivot_mask
    ) -> np.ndarray:
        """The server's y for this step's pivot, decrypted and merged."""
        try:
            if answer.meta.get("step") != step.index or answer.meta.get("pivot") != step.pivot:
                raise protocol.ProtocolError(f"answer is for step {answer.meta.get('step')!r}, expected {step.index}")
            if key is None:
                return protocol.require_tensor(answer, "latent", latent_shape, ("float64",)).astype(np.float64)
            n_enc = int(np.prod(latent_shape)) if pivot_mask is None else int(pivot_mask.sum())
            blobs = protocol.collect_ciphertexts(answer, key.preset.ciphertexts_for(n_enc))
            remainder = np.zeros(0)
            if pivot_mask is not None:
                remainder = protocol.require_tensor(answer, "remainder", (int((~pivot_mask).sum()),), ("float64",))
            latent = EncryptedLatent(
                shape=latent_shape, mask=pivot_mask, ciphertexts=key.deserialize(blobs), remainder=remainder
            )
            return decrypt_latent(latent, key)
        except (protocol.ProtocolError, he.HEError) as e:
            raise BackendProtocolError(f"{self.client.url} sent an unusable step answer: {e}") from None
