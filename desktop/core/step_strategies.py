"""What the client does in one denoising step, per split family: what it runs, what it sends, what it makes of
the server's answer.

``engine.Generator.generate`` drives a session (prompt, initial noise, session, latent history, timings, progress,
cancel, decode); a strategy holds what its family needs for that session (the HE key and index sets, the prompt
batch and the skips a U-shaped tail consumes) and does the family's part of each step:

- the paper's splits (:data:`split.PAPER_FAMILY`): the client runs the head, sends the latent (encrypted in full
  or in part, or in plaintext as the baseline) and gets ``x_{t-1}`` (or its pivot term) back;
- the U-shaped splits (:data:`split.U_SHAPED_FAMILY`): the client runs the head, sends its activation, gets the
  tail's input back and runs the tail, the guidance and the scheduler step; the latent never leaves.

A new split family is a :class:`StepStrategy` subclass and one entry in :data:`STRATEGIES`.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from hediff.common import he, protocol, split
from hediff.common.errors import UsageError
from hediff.common.latent import EncryptedLatent, decrypt_latent, encrypt_latent, pack_mask
from hediff.common.schedulers import AffinePlan, AffineStep, apply_step, client_finish
from hediff.common.selection import new_mask_seed, random_mask, select_mask
from hediff.desktop.core.client_model import ClientModel

if TYPE_CHECKING:  # engine imports this module; the settings type is only named here
    from hediff.desktop.core.engine import GenerationParams

LatentHistory = Mapping[int, np.ndarray]  # step index -> the plaintext latent x_i entering that step


@dataclass
class StepRequest:
    """One step's request, and what the driver needs to know about it."""

    frame: protocol.Frame
    encrypted_fraction: float | None = None  # share of the latent sent encrypted; None: no encrypted latent sent
    on_uploaded: Callable[[], None] | None = None  # run when the last request byte has left


class StepStrategy(ABC):
    """One session's per-step work for one split family.

    ``request`` and ``finish`` add their own seconds to the step's ``timings`` (keys of ``engine.TIMING_KEYS``);
    ``finish`` raises :class:`protocol.ProtocolError` or :class:`he.HEError` for an answer it cannot use.
    """

    # settings a session of this family runs with whatever was asked, so that the result records what happened
    settings_overrides: ClassVar[Mapping[str, Any]] = {}

    def __init__(self, model: ClientModel, params: GenerationParams):
        self.model = model
        self.params = params
        self.key: he.ClientKey | None = None  # the CKKS key this session's latents are encrypted under, if any

    def open_blobs(self) -> dict[str, bytes]:
        """Blobs the session-open request carries besides the prompt embeddings."""
        return {}

    @abstractmethod
    def start(
        self,
        plan: AffinePlan,
        latent_shape: tuple[int, ...],
        cond: np.ndarray,
        uncond: np.ndarray,
        added_cond: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Set up for the session the server has just opened (part of the generation's set-up time).
        ``added_cond``: SDXL's ``text_embeds`` (cond_pooled, uncond_pooled) and ``time_ids`` for one image."""

    @abstractmethod
    def request(self, step: AffineStep, history: LatentHistory, timings: dict[str, float]) -> StepRequest:
        """Run this machine's layers on ``history[step.index]`` and build the step's request."""

    @abstractmethod
    def finish(
        self, step: AffineStep, answer: protocol.Frame, history: LatentHistory, timings: dict[str, float]
    ) -> np.ndarray:
        """x_{step.index + 1} (float64) from the server's answer, less the step's fresh-noise term: the driver
        draws that noise from the seed's generator and adds it (it never leaves this machine)."""

    def forget_before(self, index: int) -> None:
        """The driver no longer keeps latents before step ``index``: drop what belongs to them."""
        return  # most strategies keep nothing per latent


def _check_answer_step(answer: protocol.Frame, step: AffineStep, **expected: int) -> None:
    if answer.meta.get("step") != step.index or any(answer.meta.get(k) != v for k, v in expected.items()):
        raise protocol.ProtocolError(f"answer is for step {answer.meta.get('step')!r}, expected {step.index}")


class _LatentSteps(StepStrategy):
    """Paper splits: the head runs here, the latent travels, the server applies the scheduler's affine step."""

    _server_multiplies = False  # whether the server's answer already carries the pivot's coefficient

    def start(self, plan, latent_shape, cond, uncond, added_cond=None) -> None:
        self.latent_shape = latent_shape  # the paper's heads run no time embedding: SDXL's added one is the server's

    def request(self, step: AffineStep, history: LatentHistory, timings: dict[str, float]) -> StepRequest:
        x = history[step.index]
        t = time.perf_counter()
        activations = self.model.run_head(step.input_scale * x, step.timestep, self.params.activation_dtype)
        timings["head"] = time.perf_counter() - t
        return self._with_latent(protocol.Frame(meta={"step": step.index}, tensors=dict(activations)), step, x, timings)

    def finish(
        self, step: AffineStep, answer: protocol.Frame, history: LatentHistory, timings: dict[str, float]
    ) -> np.ndarray:
        t = time.perf_counter()
        _check_answer_step(answer, step, pivot=step.pivot)
        x_next = client_finish(step, self._pivot_term(answer, step), history, self._server_multiplies)
        timings["decrypt"] = time.perf_counter() - t
        return x_next

    @abstractmethod
    def _with_latent(
        self, frame: protocol.Frame, step: AffineStep, x: np.ndarray, timings: dict[str, float]
    ) -> StepRequest:
        """The request: ``frame`` (the head's activations) plus the latent ``x`` in this strategy's form."""

    @abstractmethod
    def _pivot_term(self, answer: protocol.Frame, step: AffineStep) -> np.ndarray:
        """The server's y for this step's pivot, in plaintext."""


class PlaintextLatentSteps(_LatentSteps):
    """Paper splits with ``encryption=none``: the baseline that shows what the encryption costs."""

    def _with_latent(
        self, frame: protocol.Frame, step: AffineStep, x: np.ndarray, timings: dict[str, float]
    ) -> StepRequest:
        frame.tensors["latent"] = x
        return StepRequest(frame)

    def _pivot_term(self, answer: protocol.Frame, step: AffineStep) -> np.ndarray:
        return protocol.require_tensor(answer, "latent", self.latent_shape, ("float64",)).astype(np.float64)


class EncryptedLatentSteps(_LatentSteps):
    """Paper splits with the latent CKKS-encrypted, in full or the selected part (the rest travels in plaintext)."""

    def __init__(self, model: ClientModel, params: GenerationParams, key: he.ClientKey | None):
        super().__init__(model, params)
        if key is None:
            key = he.RotatingKey(params.he_preset)  # fresh keys per generation, each retired before its bound
        elif key.preset.name != params.he_preset:
            raise UsageError(
                f"the given key is for preset {key.preset.name!r}, the generation asks for {params.he_preset!r}"
            )
        self.key = key
        self._server_multiplies = key.preset.server_multiplies
        self._masks: dict[int, np.ndarray | None] = {}  # step -> index set the server holds for that step's latent
        self._refill: threading.Thread | None = None

    def open_blobs(self) -> dict[str, bytes]:
        return {"context": self.key.evaluation_context()}

    def start(self, plan, latent_shape, cond, uncond, added_cond=None) -> None:
        super().start(plan, latent_shape, cond, uncond, added_cond)
        # drawn once from a fresh secret seed: the same index set every step, independent of the latent
        self._fixed_mask = (
            random_mask(latent_shape, self.params.mask_fraction, new_mask_seed())
            if self.params.encryption == "random-mask"
            else None
        )
        self._n_cts = self.key.preset.ciphertexts_for(int(np.prod(latent_shape)))
        self.key.prepare(self._n_cts)

    def _with_latent(
        self, frame: protocol.Frame, step: AffineStep, x: np.ndarray, timings: dict[str, float]
    ) -> StepRequest:
        t = time.perf_counter()
        if self._fixed_mask is not None:
            mask = self._fixed_mask
        else:
            mask = select_mask(x, self.params.encryption, self.params.tau)
        timings["select"] = time.perf_counter() - t
        t = time.perf_counter()
        package = encrypt_latent(x, mask, self.key)
        for i, ct in enumerate(package.ciphertexts):
            frame.blobs[f"ct{i}"] = ct.serialize()
        if mask is not None:
            frame.tensors["mask"] = pack_mask(mask)
            frame.tensors["remainder"] = package.remainder
        timings["encrypt"] = time.perf_counter() - t
        self._masks[step.index] = mask
        # fresh encryptions of zero for the next step are made while the server works
        self._refill = threading.Thread(target=self.key.prepare, args=(self._n_cts,), daemon=True)
        return StepRequest(frame, package.encrypted_fraction, on_uploaded=self._refill.start)

    def finish(
        self, step: AffineStep, answer: protocol.Frame, history: LatentHistory, timings: dict[str, float]
    ) -> np.ndarray:
        if self._refill is not None and self._refill.is_alive():
            self._refill.join()  # the key is used from one thread at a time
        return super().finish(step, answer, history, timings)

    def _pivot_term(self, answer: protocol.Frame, step: AffineStep) -> np.ndarray:
        pivot_mask = self._masks.get(step.pivot)
        n_enc = int(np.prod(self.latent_shape)) if pivot_mask is None else int(pivot_mask.sum())
        blobs = protocol.collect_ciphertexts(answer, self.key.preset.ciphertexts_for(n_enc))
        remainder = np.zeros(0)
        if pivot_mask is not None:
            remainder = protocol.require_tensor(answer, "remainder", (int((~pivot_mask).sum()),), ("float64",))
        latent = EncryptedLatent(
            shape=self.latent_shape, mask=pivot_mask, ciphertexts=self.key.deserialize(blobs), remainder=remainder
        )
        return decrypt_latent(latent, self.key)

    def forget_before(self, index: int) -> None:
        for k in [k for k in self._masks if k < index]:
            del self._masks[k]


def _latent_steps(model: ClientModel, params: GenerationParams, key: he.ClientKey | None) -> StepStrategy:
    if params.encryption == "none":
        return PlaintextLatentSteps(model, params)
    return EncryptedLatentSteps(model, params, key)


class UShapedSteps(StepStrategy):
    """U-shaped splits: head and tail run here around the server's middle, then the guidance and the scheduler
    step; the latent, the skips and the noise predictions never leave this machine."""

    settings_overrides: ClassVar[Mapping[str, Any]] = {"encryption": "none"}  # nothing here is encrypted

    def __init__(self, model: ClientModel, params: GenerationParams, key: he.ClientKey | None = None):
        super().__init__(model, params)  # no latent leaves, so no key is used

    def start(self, plan, latent_shape, cond, uncond, added_cond=None) -> None:
        # the prompt batch the UNet runs on, in diffusers' order (negative first, each once per image); guidance
        # only when > 1
        self.images = latent_shape[0] if len(latent_shape) == 4 else 1
        branches = [uncond, cond] if self.params.guidance > 1.0 else [cond]
        self.embeds = np.concatenate([e for e in branches for _ in range(self.images)])
        self.added_cond = None
        if added_cond is not None:  # SDXL: the same rows for the added conditioning, in the same order
            pooled = added_cond["uncond_pooled"], added_cond["cond_pooled"]
            rows = [p for p in (pooled if self.params.guidance > 1.0 else pooled[1:]) for _ in range(self.images)]
            self.added_cond = {
                "text_embeds": np.concatenate(rows),
                "time_ids": np.repeat(added_cond["time_ids"], len(rows), axis=0),
            }
        self.hidden_shape = split.return_shape(
            self.model.head.unet_config, self.params.split, (len(self.embeds), *latent_shape[-3:])
        )
        self._eps_kept = plan.eps_history_needed()
        self._eps_history: dict[int, np.ndarray] = {}  # step -> guided noise prediction, computed here
        self._kept: split.UShapedKept | None = None  # the current step's skips, for the tail

    def request(self, step: AffineStep, history: LatentHistory, timings: dict[str, float]) -> StepRequest:
        t = time.perf_counter()
        activations, self._kept = self.model.run_u_head(
            step.input_scale * history[step.index],
            step.timestep,
            self.embeds,
            self.params.activation_dtype,
            self.added_cond,
        )
        timings["head"] = time.perf_counter() - t
        return StepRequest(protocol.Frame(meta={"step": step.index}, tensors=dict(activations)))

    def finish(
        self, step: AffineStep, answer: protocol.Frame, history: LatentHistory, timings: dict[str, float]
    ) -> np.ndarray:
        t = time.perf_counter()
        _check_answer_step(answer, step)
        hidden = protocol.require_tensor(answer, split.RETURN_NAME, self.hidden_shape, (self.params.activation_dtype,))
        self._eps_history[step.index] = self.model.run_u_tail(
            hidden, self._kept, self.embeds, self.params.guidance, self.images
        )
        x_next = apply_step(step, history, self._eps_history)
        timings["head"] += time.perf_counter() - t  # "head" is all UNet work here: tail, guidance, step included
        for k in [k for k in self._eps_history if k <= step.index - self._eps_kept]:
            del self._eps_history[k]
        return x_next


StrategyFactory = Callable[[ClientModel, "GenerationParams", "he.ClientKey | None"], StepStrategy]

# split family (common.split.split_family) -> the strategy for a session; a key given for a family that sends
# no encrypted latent is not used
STRATEGIES: dict[str, StrategyFactory] = {
    split.PAPER_FAMILY: _latent_steps,
    split.U_SHAPED_FAMILY: UShapedSteps,
}


def strategy_for(model: ClientModel, params: GenerationParams, key: he.ClientKey | None) -> StepStrategy:
    """The step strategy for a session with ``params`` (its split's family decides)."""
    family = split.split_family(params.split)
    if family not in STRATEGIES:
        raise UsageError(f"no client step strategy for split {params.split!r} (family {family!r})")
    return STRATEGIES[family](model, params, key)
