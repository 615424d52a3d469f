"""The backend's work: open sessions, run the UNet body on both guidance branches, apply the HE update.

In a U-shaped split the server runs only the middle of the UNet and returns its hidden state; the client
finishes the UNet, the guidance and the scheduler step, so those sessions hold no latent and no HE context.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hediff.backend.limits import Limits  # noqa: F401 - re-exported: create_app and the CLI name it here
from hediff.backend.sessions import Session, SessionError, SessionStore
from hediff.common import he, models, protocol, settings, split
from hediff.common.latent import EncryptedLatent, unpack_mask, update_latent
from hediff.common.lora import apply_loras, parse_loras, weights_digest
from hediff.common.protocol import Frame, ProtocolError, SessionSettings
from hediff.common.schedulers import SCHEDULER_NAMES, build_plan, server_offset


class StepOrderError(SessionError):
    status = 409
    code = "step_out_of_order"


class SessionTooLarge(SessionError):
    """Settings the server would accept but whose steps it could never take (blob count or request size)."""

    status = 413
    code = "session_too_large"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, {', '.join(table)}")
    return table[dtype]


class ModelFacts:
    """What sessions need to know about a model, read from its folder's configs: plans, sizes, splits, digests.

    Holds no weights (the UNet is built on the meta device), so a Ray session tier on CPU knows its model without
    loading it; ``ServerModel`` adds the weights and the forward passes.
    """

    def __init__(
        self,
        model_path: Path,
        model_id: str,
        unet=None,
        device: str = "cpu",
        dtype: str = "float32",
        lora: tuple[str, ...] = (),
    ):
        """``lora``: the ``DIR[:SCALE]`` entries the server's UNet folds in (clients must name the same ones)."""
        self.model_id = model_id
        self.device_name, self.dtype_name = device, dtype  # what capabilities report: where the UNet runs
        unet = unet if unet is not None else split.meta_unet(models.load_unet_config(model_path))
        self.unet_config = unet.config
        # every split this UNet supports; the others are refused per session with the reason (a 400, not a 500)
        self.bodies: dict[str, split.UNetBody] = {}
        self.unsupported: dict[str, str] = {}
        config_file = Path(model_path) / "unet" / "config.json"
        for name in split.SPLIT_POINTS:
            try:
                self.bodies[name] = split.UNetBody.from_unet(unet, name)
            except split.UnsupportedUNetError as e:
                self.unsupported[name] = f"{config_file}: {e}"
        if not self.bodies:
            raise split.UnsupportedUNetError("; ".join(self.unsupported.values()))
        self.scheduler_config = models.load_scheduler_config(model_path)
        self.vae_scale_factor = models.vae_scale_factor(model_path)
        self.prompt_tokens = models.prompt_token_count(model_path)
        loras = parse_loras(lora)
        self.weights_digest = weights_digest(model_path, loras)
        self.lora_count = len(loras)
        self.latent_channels = int(self.unet_config.in_channels)
        self.cross_attention_dim = int(self.unet_config.cross_attention_dim)
        self.native_side = int(self.unet_config.sample_size) * self.vae_scale_factor
        # SDXL: the width of the pooled text embedding the client sends (the added conditioning's rest is the
        # six time ids the server makes from the size); None for a UNet without added conditioning
        config = self.unet_config
        self.pooled_dim = (
            int(config.projection_class_embeddings_input_dim) - 6 * int(config.addition_time_embed_dim)
            if config.get("addition_embed_type") == "text_time"
            else None
        )

    def plan(self, scheduler: str, steps: int, strength: float | None = None):
        return _cached_plan(scheduler, _freeze(self.scheduler_config), steps, strength)

    def size_limits(self, limits: Limits) -> settings.SizeLimits:
        """This model's size cap under the server's configuration (what capabilities advertise)."""
        return settings.SizeLimits.for_model(self.native_side, self.vae_scale_factor, limits.max_side, limits.max_steps)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.vae_scale_factor
        size = settings.SizeLimits.for_model(self.native_side, f)
        if height % size.multiple or width % size.multiple:
            raise ProtocolError(
                f"height and width must be multiples of {size.multiple} for this model, got {height}x{width}"
            )
        for name, side in (("height", height), ("width", width)):
            if side > size.max_side:
                raise ProtocolError(
                    f"{name!r} must be at most {size.max_side} for this model ({settings.MAX_SIDE_FACTOR}x its "
                    f"native {self.native_side} px), got {side}"
                )
        return (self.latent_channels, height // f, width // f)

    @property
    def splits(self) -> list[str]:
        return list(self.bodies)

    def activation_shapes(self, split_name: str, latent_shape, batch: int = 1) -> dict[str, tuple[int, ...]]:
        """What the client sends; a U-shaped head runs on the guidance ``batch`` (its cross-attention needs it).
        ``latent_shape`` is (C, H, W), or (N, C, H, W) for a session of N images (the head runs on all N)."""
        *images, c, h, w = latent_shape
        b = batch if split.is_u_shaped(split_name) else (images[0] if images else 1)
        shapes = split.activation_shapes(self.unet_config, split_name, (b, c, h, w))
        return {k: tuple(v) for k, v in shapes.items()}

    def capabilities(self, limits: Limits) -> dict:
        return {
            "protocol_version": protocol.PROTOCOL_VERSION,
            "model": {
                "id": self.model_id,
                "latent_channels": self.latent_channels,
                "vae_scale_factor": self.vae_scale_factor,
                "cross_attention_dim": self.cross_attention_dim,
                "device": self.device_name,
                "dtype": self.dtype_name,
                "weights_digest": self.weights_digest,
            },
            "schedulers": list(SCHEDULER_NAMES),
            "splits": self.splits,
            "unsupported_splits": dict(self.unsupported),
            "encryption": list(protocol.ENCRYPTION_CHOICES),
            "he_presets": {name: p.description for name, p in he.PRESETS.items()},
            "activation_dtypes": list(protocol.ACTIVATION_DTYPES),
            "limits": {**limits.__dict__, **self.size_limits(limits).to_dict()},
        }


@dataclass(frozen=True)
class BodyCall:
    """One session's UNet-body work for one step: what crosses from a session tier to a UNet tier (numpy only).

    ``guidance`` set: the guided noise prediction (float64) of a paper split; ``None``: a U-shaped split's hidden
    state, both guidance branches, in ``out_dtype``.
    """

    split: str
    activations: dict[str, np.ndarray]
    timestep: int | float
    embeddings: np.ndarray  # (guidance branches x images, tokens, dim) as the client sent them
    guidance: float | None = None
    latent_hw: tuple[int, int] | None = None
    out_dtype: str = "float32"
    added_cond: dict[str, np.ndarray] | None = None  # SDXL: text_embeds and time_ids, one row per embedding row
    images: int = 1  # the session's images (--count), run as one batch

    def group_key(self) -> tuple:
        """Calls with equal keys can share one forward pass (same split, shapes, timestep type and output)."""
        shapes = tuple(sorted((k, v.shape, str(v.dtype)) for k, v in self.activations.items()))
        added = tuple(sorted((k, v.shape[1:]) for k, v in (self.added_cond or {}).items()))
        return (
            added,
            self.split,
            shapes,
            self.embeddings.shape[1:],
            str(self.embeddings.dtype),
            type(self.timestep),
            self.guidance is None,
            self.latent_hw,
            self.out_dtype,
        )


class ServerModel(ModelFacts):
    """The full UNet (run from any split point on) with the facts clients must match."""

    def __init__(
        self, model_path: Path, model_id: str, device: str = "auto", dtype: str = "auto", lora: tuple[str, ...] = ()
    ):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        unet = models.load_unet(model_path, device=self.device, dtype=self.dtype)
        unet.eval()
        apply_loras(parse_loras(lora), unet=unet, xl=unet.config.get("addition_embed_type") == "text_time")
        super().__init__(model_path, model_id, unet, str(self.device), str(self.dtype).replace("torch.", ""), lora)
        self.unet = unet
        self.lock = threading.Lock()  # one forward pass at a time on this device

    def _tensors(self, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.array(v)).to(self.device, self.dtype) for k, v in arrays.items()}

    def _embeddings(self, embeddings) -> torch.Tensor:
        return torch.from_numpy(np.array(embeddings)).to(self.device, self.dtype)

    def _added(self, added_cond: dict | None) -> dict[str, torch.Tensor] | None:
        # SDXL's time ids are small integers: exact in any dtype, as the pipeline makes them in the embeddings' dtype
        return None if added_cond is None else self._tensors(added_cond)

    @torch.no_grad()
    def guided_noise(
        self,
        split_name: str,
        activations: dict[str, np.ndarray],
        timestep: int,
        embeddings,
        guidance: float,
        added_cond: dict | None = None,
    ):
        with self.lock:
            acts = self._tensors(activations)
            embeddings = self._embeddings(embeddings)
            batch = embeddings.shape[0]
            images = next(iter(acts.values())).shape[0]  # the session's images, run as one batch
            acts = {k: _tile(v, batch) for k, v in acts.items()}
            noise = self.bodies[split_name](acts, timestep, embeddings, added_cond=self._added(added_cond))
            return split.mix_guidance(noise, guidance, images)

    @torch.no_grad()
    def middle(
        self,
        split_name: str,
        activations: dict[str, np.ndarray],
        timestep: int,
        embeddings,
        latent_hw,
        dtype: str,
        added_cond: dict | None = None,
    ) -> np.ndarray:
        """U-shaped split: the hidden state entering the client's first up block, both guidance branches."""
        with self.lock:
            acts = self._tensors(activations)
            hidden = self.bodies[split_name](
                acts,
                timestep,
                self._embeddings(embeddings),
                latent_size=tuple(latent_hw),
                added_cond=self._added(added_cond),
            )
            return hidden.float().cpu().numpy().astype(np.float16 if dtype == "float16" else np.float32)

    def run(self, call: BodyCall) -> np.ndarray:
        """One session's call alone: exactly the single-process backend's computation."""
        if call.guidance is not None:
            return self.guided_noise(
                call.split, call.activations, call.timestep, call.embeddings, call.guidance, call.added_cond
            )
        return self.middle(
            call.split,
            call.activations,
            call.timestep,
            call.embeddings,
            call.latent_hw,
            call.out_dtype,
            call.added_cond,
        )

    @torch.no_grad()
    def run_batch(self, calls: list[BodyCall]) -> list[np.ndarray]:
        """Calls of different sessions in as few forward passes as their shapes allow: each session's rows (its
        guidance branches, kept together) stacked with per-row timesteps. A group of one runs ``run`` as it is, so
        an unbatched call is bit-identical to the single-process backend."""
        results: list[np.ndarray | None] = [None] * len(calls)
        groups: dict[tuple, list[int]] = {}
        for i, call in enumerate(calls):
            groups.setdefault(call.group_key(), []).append(i)
        for members in groups.values():
            if len(members) == 1:
                results[members[0]] = self.run(calls[members[0]])
                continue
            for i, out in zip(members, self._stacked([calls[i] for i in members])):
                results[i] = out
        return results  # type: ignore[return-value]

    def _stacked(self, calls: list[BodyCall]) -> list[np.ndarray]:
        first = calls[0]
        rows = [c.embeddings.shape[0] for c in calls]
        with self.lock:
            acts: dict[str, torch.Tensor] = {}
            for name in first.activations:
                parts = []
                for c, n in zip(calls, rows):
                    a = torch.from_numpy(np.array(c.activations[name])).to(self.device, self.dtype)
                    parts.append(_tile(a, n))
                acts[name] = torch.cat(parts)
            embeddings = torch.cat([self._embeddings(c.embeddings) for c in calls])
            added = None
            if first.added_cond is not None:
                added = {k: torch.cat([self._added(c.added_cond)[k] for c in calls]) for k in first.added_cond}
            t_dtype = split.timestep_dtype(
                torch.float64 if isinstance(first.timestep, float) else torch.int64, self.device
            )
            timesteps = torch.tensor(
                [c.timestep for c, n in zip(calls, rows) for _ in range(n)], dtype=t_dtype, device=self.device
            )
            body = self.bodies[first.split]
            if first.guidance is None:
                out = body(acts, timesteps, embeddings, latent_size=tuple(first.latent_hw), added_cond=added)
            else:
                out = body(acts, timesteps, embeddings, added_cond=added)
        answers, start = [], 0
        for c, n in zip(calls, rows):
            part = out[start : start + n]
            start += n
            if c.guidance is not None:
                answers.append(split.mix_guidance(part, c.guidance, c.images))
            else:
                answers.append(
                    part.float().cpu().numpy().astype(np.float16 if c.out_dtype == "float16" else np.float32)
                )
        return answers


def _tile(activation: torch.Tensor, batch: int) -> torch.Tensor:
    """The images' activation repeated for each guidance branch, in diffusers' order (``cat([latents] * 2)``)."""
    if activation.shape[0] == 1:
        return activation.expand(batch, *activation.shape[1:])
    return activation.repeat(batch // activation.shape[0], *[1] * (activation.dim() - 1))


def _freeze(cfg: dict) -> tuple:
    return tuple(
        sorted(
            (k, _freeze(v) if isinstance(v, dict) else tuple(v) if isinstance(v, list) else v) for k, v in cfg.items()
        )
    )


@functools.lru_cache(maxsize=64)
def _cached_plan(scheduler: str, frozen_config: tuple, steps: int, strength: float | None = None):
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in frozen_config}
    try:
        return build_plan(scheduler, config, steps, strength)
    except ValueError as e:  # e.g. an img2img strength that runs no step: the client's mistake, said as such
        raise ProtocolError(str(e)) from None


_HEADER_BYTES_PER_FIELD = 256
_HEADER_BYTES_BASE = 16 << 10


def ciphertext_bytes_bound(preset: he.HEPreset) -> int:
    """The most bytes one serialised fresh ciphertext of this preset takes (two polynomials, every prime, plus
    SEAL's header and the worst case of its compression)."""
    raw = 2 * preset.poly_modulus_degree * len(preset.coeff_mod_bit_sizes) * 8
    return raw + raw // 64 + 4096


def step_fields(session: Session) -> list[str]:
    """Every field name a step request of this session may carry."""
    names = list(session.activation_shapes)
    settings = session.settings
    if split.is_u_shaped(settings.split):
        return names
    if settings.encryption == "none":
        return [*names, "latent"]
    n = int(np.prod(session.latent_shape))
    names += protocol.ciphertext_names(session.context.preset.ciphertexts_for(n))
    if settings.encryption in protocol.PARTIAL_ENCRYPTION:
        names += ["mask", "remainder"]
    return names


def step_bounds(settings: SessionSettings, latent_shape, activation_shapes) -> tuple[int, int]:
    """(most fields, most bytes) of one step request of a session with these settings."""
    itemsize = np.dtype(settings.activation_dtype).itemsize
    n_blobs = len(activation_shapes)
    n_bytes = sum(int(np.prod(s)) * itemsize for s in activation_shapes.values())
    n = int(np.prod(latent_shape))
    if not split.is_u_shaped(settings.split):
        if settings.encryption == "none":
            n_blobs, n_bytes = n_blobs + 1, n_bytes + 8 * n
        else:
            preset = he.get_preset(settings.he_preset)
            n_ct = preset.ciphertexts_for(n)  # all of the latent encrypted: the worst case of every mode
            n_blobs, n_bytes = n_blobs + n_ct, n_bytes + n_ct * ciphertext_bytes_bound(preset)
            if settings.encryption in protocol.PARTIAL_ENCRYPTION:
                n_blobs, n_bytes = n_blobs + 2, n_bytes + (n + 7) // 8 + 8 * n
    return n_blobs, n_bytes + _HEADER_BYTES_BASE + _HEADER_BYTES_PER_FIELD * n_blobs


class Engine:
    """Sessions and their steps: validation, the HE update, the history. The UNet body runs in ``body`` (the model
    in this process by default; a Ray UNet tier in a scaled-out deployment)."""

    def __init__(
        self,
        model: ModelFacts,
        limits: Limits,
        store: SessionStore,
        body: Callable[[BodyCall], np.ndarray] | None = None,
    ):
        self.model = model
        self.limits = limits
        self.store = store
        self.body = body if body is not None else model.run

    def open_session(self, token_id: str, frame: Frame, session_id: str | None = None) -> dict:
        settings = SessionSettings.from_meta(
            frame.meta,
            schedulers=SCHEDULER_NAMES,
            splits=split.SPLIT_POINTS,
            presets=tuple(he.PRESETS),
            max_steps=self.limits.max_steps,
            max_side=self.limits.max_side,
            u_splits=tuple(split.U_SPLITS),
        )
        if settings.split in self.model.unsupported:
            raise ProtocolError(
                f"this server's model cannot run split {settings.split!r}: {self.model.unsupported[settings.split]}"
            )
        u_shaped = split.is_u_shaped(settings.split)
        latent_shape = self.model.latent_shape(settings.height, settings.width)
        if settings.count > 1:  # the session's images travel and run as one batch
            latent_shape = (settings.count, *latent_shape)
        plan = self.model.plan(settings.scheduler, settings.steps, settings.strength)
        if plan.digest() != settings.plan_digest:
            raise ProtocolError(
                "the client's step plan differs from the server's (different scheduler config or library versions); "
                "use the same model on both sides"
            )
        if settings.weights_digest != self.model.weights_digest:
            raise ProtocolError(
                f"the client's UNet weights (digest {settings.weights_digest[:12]}) are not the server's "
                f"(digest {self.model.weights_digest[:12]}, model {self.model.model_id!r} with "
                f"{self.model.lora_count} LoRA(s)): load the same model folder (same fine-tune) and the same LoRAs "
                "at the same scales on both sides, or ask the operator which model and LoRAs the server runs"
            )
        tokens_dim = (self.model.prompt_tokens, self.model.cross_attention_dim)
        cond = protocol.require_tensor(frame, "cond", (1, *tokens_dim), ("float32", "float16"))
        embeds = [cond]
        if settings.guidance > 1.0:  # diffusers' pipeline runs the unconditional branch only when guidance > 1
            embeds = [protocol.require_tensor(frame, "uncond", (1, *tokens_dim), ("float32", "float16")), cond]
        context = None
        if u_shaped and "context" in frame.blobs:
            raise ProtocolError(f"split {settings.split!r} keeps the latent on the client: send no HE 'context'")
        if settings.encryption != "none":
            if "context" not in frame.blobs:
                raise ProtocolError("an encrypted session needs the 'context' blob (the HE evaluation parameters)")
            context = he.EvaluationContext(frame.blobs["context"], settings.he_preset)
        pooled = self._pooled_embeddings(frame, settings.guidance > 1.0)
        known = {"cond", "uncond", "context"} | ({"cond_pooled", "uncond_pooled"} if pooled else set())
        unknown = sorted((set(frame.tensors) | set(frame.blobs)) - known)
        if unknown:
            raise ProtocolError(f"unexpected fields in a session request: {', '.join(unknown[:8])}")
        # each branch once per image, as diffusers' num_images_per_prompt repeats them: (uncond x N, cond x N)
        embeds = [e for e in embeds for _ in range(settings.count)]
        activation_shapes = self.model.activation_shapes(settings.split, latent_shape, len(embeds))
        max_blobs, max_step_bytes = step_bounds(settings, latent_shape, activation_shapes)
        if max_blobs > protocol.MAX_BLOBS or max_step_bytes > self.limits.max_request_bytes:
            raise SessionTooLarge(
                f"a {settings.width}x{settings.height} session with encryption {settings.encryption!r} needs steps "
                f"of up to {max_step_bytes} bytes in {max_blobs} parts; this server takes at most "
                f"{self.limits.max_request_bytes} bytes in {protocol.MAX_BLOBS} parts per request: choose a smaller "
                "size, or ask the operator to raise --max-request-mb"
            )
        added_cond = None
        if pooled:  # SDXL: per batch row, in the embeddings' order; the time ids follow from the size
            rows = [p for p in pooled for _ in range(settings.count)]
            time_ids = [models.add_time_ids(settings.height, settings.width)] * len(rows)
            added_cond = {"text_embeds": np.concatenate(rows), "time_ids": np.array(time_ids, dtype=np.float64)}
        session = self.store.add(
            token_id,
            session_id=session_id,
            context_bytes=frame.blobs.get("context"),
            settings=settings,
            plan=plan,
            context=context,
            embeddings=np.concatenate(embeds),
            latent_shape=latent_shape,
            activation_shapes=activation_shapes,
            max_step_bytes=max_step_bytes,
            added_cond=added_cond,
        )
        return {
            "session_id": session.id,
            "timesteps": [s.timestep for s in plan.steps],
            "plan_digest": plan.digest(),
            "latent_shape": list(latent_shape),
            "activation_shapes": {k: list(v) for k, v in session.activation_shapes.items()},
            "expires_after_idle_s": self.store.ttl_s,
        }

    def _pooled_embeddings(self, frame: Frame, guided: bool) -> list[np.ndarray]:
        """SDXL: the pooled text embeddings (uncond first when guided), [] for a model without them."""
        if self.model.pooled_dim is None:
            return []
        shape = (1, self.model.pooled_dim)
        names = ["uncond_pooled", "cond_pooled"] if guided else ["cond_pooled"]
        return [protocol.require_tensor(frame, name, shape, ("float32", "float16")) for name in names]

    def step(self, session: Session, frame: Frame) -> bytes:
        t0 = time.perf_counter()
        with session.lock:
            step_index = protocol.meta_int(frame.meta, "step", 0, len(session.plan.steps) - 1)
            if session.last_response is not None and session.last_response[0] == step_index:
                return session.last_response[1]  # a retry of the step just answered: same answer, no new state
            if step_index != session.next_step:
                raise StepOrderError(f"expected step {session.next_step}, got step {step_index}")
            settings = session.settings
            unknown = sorted((set(frame.tensors) | set(frame.blobs)) - set(step_fields(session)))
            if unknown:
                raise ProtocolError(f"unexpected fields in a step request: {', '.join(unknown[:8])}")
            acts = {
                name: protocol.require_tensor(frame, name, shape, (settings.activation_dtype,))
                for name, shape in session.activation_shapes.items()
            }
            plan_step = session.plan.steps[step_index]
            if split.is_u_shaped(settings.split):
                return self._u_step(session, step_index, plan_step, acts, t0)
            latent = self._read_latent(session, frame)
            t_parsed = time.perf_counter()

            eps = self.body(
                BodyCall(
                    settings.split,
                    acts,
                    plan_step.timestep,
                    session.embeddings,
                    guidance=settings.guidance,
                    added_cond=session.added_cond,
                    images=settings.count,
                )
            )
            t_body = time.perf_counter()

            session.latents[step_index] = latent
            session.eps_history[step_index] = eps
            multiplies = settings.encryption != "none" and he.get_preset(settings.he_preset).server_multiplies
            scalar, offset = server_offset(plan_step, session.eps_history, multiplies)
            pivot = session.latents[plan_step.pivot]
            out = Frame(meta={"step": step_index, "pivot": plan_step.pivot})
            if settings.encryption == "none":
                out.tensors["latent"] = scalar * pivot + offset.reshape(pivot.shape)
            else:
                updated = update_latent(pivot, session.context, scalar, offset)
                for i, ct in enumerate(updated.ciphertexts):
                    out.blobs[f"ct{i}"] = ct.serialize()
                if updated.mask is not None:
                    out.tensors["remainder"] = updated.remainder
            t_he = time.perf_counter()

            session.next_step += 1
            session.forget_old()
            out.meta["timings"] = {
                "server_parse_s": t_parsed - t0,
                "server_body_s": t_body - t_parsed,
                "server_he_s": t_he - t_body,
                "server_total_s": time.perf_counter() - t0,
            }
            data = out.encode()
            session.last_response = (step_index, data)
            self.store.commit(session)
            return data

    def _u_step(self, session: Session, step_index: int, plan_step, acts: dict, t0: float) -> bytes:
        """U-shaped split: the middle of the UNet only; no latent, no noise prediction, no HE."""
        settings = session.settings
        t_parsed = time.perf_counter()
        hidden = self.body(
            BodyCall(
                settings.split,
                acts,
                plan_step.timestep,
                session.embeddings,
                latent_hw=tuple(session.latent_shape[-2:]),
                out_dtype=settings.activation_dtype,
                added_cond=session.added_cond,
                images=settings.count,
            )
        )
        t_body = time.perf_counter()
        session.next_step += 1
        out = Frame(meta={"step": step_index}, tensors={split.RETURN_NAME: hidden})
        out.meta["timings"] = {
            "server_parse_s": t_parsed - t0,
            "server_body_s": t_body - t_parsed,
            "server_he_s": 0.0,
            "server_total_s": time.perf_counter() - t0,
        }
        data = out.encode()
        session.last_response = (step_index, data)
        self.store.commit(session)
        return data

    def _read_latent(self, session: Session, frame: Frame):
        shape = session.latent_shape
        settings = session.settings
        if settings.encryption == "none":
            return protocol.require_tensor(frame, "latent", shape, ("float64",)).astype(np.float64)
        ctx = session.context
        mask = None
        remainder = np.zeros(0)
        if settings.encryption in protocol.PARTIAL_ENCRYPTION:
            n_bytes = (int(np.prod(shape)) + 7) // 8
            bits = protocol.require_tensor(frame, "mask", (n_bytes,), ("uint8",))
            mask = unpack_mask(bits, shape)
            n_plain = int((~mask).sum())
            remainder = protocol.require_tensor(frame, "remainder", (n_plain,), ("float64",)).astype(np.float64)
        n_enc = int(np.prod(shape)) if mask is None else int(mask.sum())
        blobs = protocol.collect_ciphertexts(frame, ctx.preset.ciphertexts_for(n_enc))
        return EncryptedLatent(shape=shape, mask=mask, ciphertexts=ctx.load(blobs), remainder=remainder)
