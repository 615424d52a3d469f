"""The one typed model of generation settings: every field, its default, bounds, choices and help text.

The CLI options, the Python API, the desktop form, the stored settings, the PNG metadata and the session-open
wire header are all derived from :class:`GenerationSettings` or validated by it, so they cannot disagree.
:class:`SizeLimits` holds what depends on the model and the server's configuration (largest side, most steps);
it is read from a model folder's config files or from a server's capabilities, never by loading weights.

Cheap to import on purpose (pydantic and the standard library only; no torch, diffusers or TenSEAL): the CLI
validates everything it can before any model loads.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.dataclasses import dataclass

from hediff.common.errors import UsageError
from hediff.common.lora import parse_lora

__all__ = [
    "ACTIVATION_DTYPES",
    "DEFAULT_HE_PRESET",
    "DEFAULT_SPLIT",
    "DEFAULT_STRENGTH",
    "MAX_COUNT",
    "ENCRYPTION_MODES",
    "HE_PRESET_NAMES",
    "PAPER_SPLITS",
    "PARTIAL_ENCRYPTION",
    "SCHEDULER_NAMES",
    "SD_GUIDANCE",
    "SPLIT_POINTS",
    "U_SPLITS",
    "Encryption",
    "GenerationSettings",
    "SettingsError",
    "SizeLimits",
    "allowed",
    "help_text",
]


class Encryption(enum.StrEnum):
    """Which latent elements are encrypted (only the paper's splits send the latent at all)."""

    FULL = "full"
    MIN_DISTORTION = "min-distortion"  # the paper's selection: its index set is a saliency map of the image
    RANDOM_MASK = "random-mask"  # a data-independent set drawn once per generation from a secret seed
    NONE = "none"  # the same split protocol in plaintext: the comparison baseline


ENCRYPTION_MODES: tuple[str, ...] = tuple(e.value for e in Encryption)
#: a mask bitmap and a plaintext remainder travel with the ciphertexts
PARTIAL_ENCRYPTION: tuple[str, ...] = (Encryption.MIN_DISTORTION.value, Encryption.RANDOM_MASK.value)

# The vocabularies the settings choose from. common.split, common.schedulers and common.he implement them; they
# are named here so that validating settings needs neither torch nor TenSEAL (tests check they agree).
SCHEDULER_NAMES: tuple[str, ...] = (
    "ddim",
    "plms",
    "euler",
    "dpmpp-2m",
    "euler-a",
    "dpmpp-2m-sde",
    "unipc",
    "heun",
    "lcm",
    "ddpm",
)
PAPER_SPLITS: tuple[str, ...] = ("conv_in", "down0.resnet0")
# U-shaped split -> how many down blocks (and, mirrored, up blocks) run on the client; None: all of them (the
# server runs only the mid block)
U_SPLITS: dict[str, int | None] = {"u1": 1, "u2": 2, "u3": None}
SPLIT_POINTS: tuple[str, ...] = (*PAPER_SPLITS, *U_SPLITS)
DEFAULT_SPLIT = PAPER_SPLITS[0]
HE_PRESET_NAMES: tuple[str, ...] = ("fast", "paper")
DEFAULT_HE_PRESET = "fast"
ACTIVATION_DTYPES: tuple[str, ...] = ("float32", "float16")

#: Stable Diffusion's usual classifier-free guidance: the default for a model that recommends none
SD_GUIDANCE = 7.5
DEFAULT_STEPS = 20
DEFAULT_TAU = 0.01
#: the paper's encrypted share at tau 0.01 on Gaussian latents (tests/test_selection.py reproduces it)
DEFAULT_MASK_FRACTION = 0.886
MAX_STEPS = 1000
MAX_GUIDANCE = 50.0
SEED_MAX = 2**31 - 1  # the desktop form's spin box holds a signed 32-bit int
SIZE_MULTIPLE = 8  # diffusers' pipeline insists on multiples of 8
#: the largest side any server accepts by default; a model's own limit is MAX_SIDE_FACTOR times its native side
MAX_SIDE = 2048
MAX_SIDE_FACTOR = 2
SERVER_MAX_STEPS = 500  # a server's default cap on steps per session
#: diffusers' img2img default
DEFAULT_STRENGTH = 0.8
#: images per session: the server runs them in one UNet batch, so its memory bounds this
MAX_COUNT = 16

_NATIVE = "0: the model's native size"
Steps = Annotated[int, Field(ge=1, le=MAX_STEPS, description="denoising steps")]
Guidance = Annotated[
    float,
    Field(
        ge=0.0,
        le=MAX_GUIDANCE,
        allow_inf_nan=False,
        description="classifier-free guidance scale; 1 or less runs only the prompt branch",
    ),
]
Side = Annotated[int, Field(ge=0, le=MAX_SIDE, multiple_of=SIZE_MULTIPLE, description="image side in pixels")]
Fraction = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Scheduler = Literal[SCHEDULER_NAMES]  # type: ignore[valid-type]
EncryptionMode = Literal[ENCRYPTION_MODES]  # type: ignore[valid-type]
HEPreset = Literal[HE_PRESET_NAMES]  # type: ignore[valid-type]
SplitPoint = Literal[SPLIT_POINTS]  # type: ignore[valid-type]
ActivationDtype = Literal[ACTIVATION_DTYPES]  # type: ignore[valid-type]

# strict: "5" is not a number and True is not an integer, wherever the settings come from
_CONFIG = ConfigDict(extra="forbid", strict=True)


class SettingsError(UsageError):
    """Settings that break a rule; ``field`` names the setting (None for a rule across settings)."""

    def __init__(self, message: str, field: str | None = None, allowed: str | None = None, value: Any = None):
        super().__init__(message)
        self.field, self.allowed, self.value = field, allowed, value

    def for_option(self, prefix: str = "--") -> str:
        """The message naming the setting as a command-line option (``--mask-fraction``)."""
        if self.field is None:
            return str(self)
        return f"{prefix}{self.field.replace('_', '-')} must be {self.allowed}, got {self.value!r}"


@dataclass(frozen=True, config=_CONFIG)
class GenerationSettings:
    """Everything one generation needs besides the model and the server. Validated on construction (also by
    ``dataclasses.replace``); a bad value raises :class:`SettingsError` naming the field and the allowed range,
    an unknown field a ``TypeError``."""

    # no length bound: the text encoder reads the first 77 tokens, and the prompts never leave this machine
    prompt: Annotated[str, Field(description="what to draw")] = ""
    negative_prompt: Annotated[str, Field(description="what to avoid (the unconditional branch)")] = ""
    steps: Steps = DEFAULT_STEPS
    guidance: Guidance = SD_GUIDANCE
    seed: Annotated[int, Field(ge=0, le=SEED_MAX, description="seed of the initial noise (as diffusers draws it)")] = 0
    width: Side = 0
    height: Side = 0
    scheduler: Annotated[Scheduler, Field(description="sampler")] = "plms"
    encryption: Annotated[
        EncryptionMode,
        Field(
            description="which latent elements are encrypted: all; the paper's min-distortion selection (its index "
            "set is a saliency map of the image); random-mask, a data-independent set drawn once per generation "
            "from a secret seed; or none (plaintext split baseline). Only the paper's splits send the latent"
        ),
    ] = Encryption.FULL.value
    tau: Annotated[Fraction, Field(description="min-distortion budget (smaller encrypts more)")] = DEFAULT_TAU
    mask_fraction: Annotated[Fraction, Field(description="random-mask: the share of the latent that is encrypted")] = (
        DEFAULT_MASK_FRACTION
    )
    he_preset: Annotated[HEPreset, Field(description="CKKS parameter preset")] = DEFAULT_HE_PRESET
    split: Annotated[
        SplitPoint,
        Field(
            description="where the UNet is split: the paper's conv_in / down0.resnet0 send a linear, invertible "
            "function of the latent; U-shaped u1 / u2 keep the first and last 1 / 2 UNet blocks, the latent and "
            "the noise prediction on this machine (no HE needed)"
        ),
    ] = DEFAULT_SPLIT
    activation_dtype: Annotated[
        ActivationDtype, Field(description="precision of the activations sent to the server")
    ] = "float32"
    init_image: Annotated[
        str,
        Field(
            description="img2img: the picture (PNG, JPEG) to start from, encoded on this machine; empty: start "
            "from noise. Its size is the image's size unless width/height are given"
        ),
    ] = ""
    strength: Annotated[
        Fraction,
        Field(description="img2img: how much of the picture is redrawn (1: all of it); int(steps x strength) run"),
    ] = DEFAULT_STRENGTH
    lora: Annotated[
        tuple[str, ...],
        Field(
            description="LoRAs applied on this machine and on the server at the same scale, each DIR[:SCALE] "
            "(a folder holding pytorch_lora_weights.safetensors, or the file; scale 1 if absent)"
        ),
    ] = ()
    count: Annotated[
        int,
        Field(
            ge=1,
            le=MAX_COUNT,
            description="images in one session, with seeds seed, seed+1, ...; the server runs them in one batch",
        ),
    ] = 1

    @field_validator("lora", mode="before")
    @classmethod
    def _lora_entries(cls, value: Any) -> Any:
        if isinstance(value, list):  # stored settings come back from JSON as lists
            value = tuple(value)
        if isinstance(value, tuple):
            for entry in value:
                parse_lora(entry)  # the form only: the files are read where the model loads
        return value

    @model_validator(mode="after")
    def _rules_across_fields(self) -> GenerationSettings:
        if self.split in U_SPLITS and self.encryption in PARTIAL_ENCRYPTION:
            raise ValueError(
                f"split {self.split!r} keeps the latent on this machine, so there is no index set to choose: "
                f"encryption {self.encryption!r} only applies to the paper's splits ({', '.join(PAPER_SPLITS)})"
            )
        return self

    def validate(self) -> None:
        """The rules construction cannot check because stored settings legitimately lack them: a prompt, and
        an img2img strength that runs at least one step."""
        if not self.prompt.strip():
            raise SettingsError("the prompt is empty", field="prompt", allowed="non-empty text", value=self.prompt)
        if self.init_image and int(self.steps * self.strength) < 1:
            rule = f"at least 1/steps ({1 / self.steps:g}) so that int(steps x strength) runs a step"
            raise SettingsError(
                f"strength must be {rule}, got {self.strength!r}", field="strength", allowed=rule, value=self.strength
            )
        if self.seed + self.count - 1 > SEED_MAX:
            rule = f"at most {SEED_MAX - self.seed + 1} from seed {self.seed} (the seeds run up to {SEED_MAX})"
            raise SettingsError(
                f"count must be {rule}, got {self.count}", field="count", allowed=rule, value=self.count
            )

    # --- serialisations ---

    def to_dict(self, include_prompt: bool = True) -> dict[str, Any]:
        """JSON-ready fields (stored settings, gallery sidecars); the prompts and the init image's path only when
        asked for (a file name can say whose picture it is)."""
        data = dataclasses.asdict(self)
        if not include_prompt:
            data.pop("prompt")
            data.pop("negative_prompt")
            data.pop("init_image")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any) -> GenerationSettings:
        """Settings from :meth:`to_dict`'s output (missing fields take their defaults); ``overrides`` win.
        Raises SettingsError for a bad value, TypeError for an unknown field."""
        if not isinstance(data, dict):
            raise SettingsError(f"stored settings must be an object, got {type(data).__name__}")
        return cls(**{**data, **overrides})

    def to_text(self, include_prompt: bool = False, prefix: str = "hediff:") -> dict[str, str]:
        """Fields as text (PNG text chunks); the prompts only when asked for."""
        return {
            f"{prefix}{k}": json.dumps(list(v)) if isinstance(v, tuple) else str(v)
            for k, v in self.to_dict(include_prompt).items()
        }

    @classmethod
    def from_text(cls, text: dict[str, str], prefix: str = "hediff:") -> GenerationSettings:
        """The settings :meth:`to_text` wrote (other keys, e.g. other programs' chunks, are ignored)."""
        values: dict[str, Any] = {}
        for name, f in cls.__pydantic_fields__.items():
            raw = text.get(prefix + name)
            if raw is None:
                continue
            kind = f.annotation
            try:
                if getattr(kind, "__origin__", None) is tuple:  # a list of texts, written as JSON
                    values[name] = tuple(json.loads(raw))
                else:
                    values[name] = int(raw) if kind is int else float(raw) if kind is float else raw
            except (ValueError, TypeError):
                raise SettingsError(
                    f"{name} must be {allowed(name)}, got {raw!r}", field=name, allowed=allowed(name), value=raw
                ) from None
        return cls(**values)


_pydantic_init = GenerationSettings.__init__


def _init(self, *args: Any, **kwargs: Any) -> None:
    try:
        _pydantic_init(self, *args, **kwargs)
    except ValidationError as e:
        raise _clear_error(e) from None


GenerationSettings.__init__ = _init  # type: ignore[method-assign]  # pydantic's errors are multi-line and vague
_FIELD_NAMES = tuple(GenerationSettings.__pydantic_fields__)


def _clear_error(e: ValidationError) -> Exception:
    """One line naming the setting, what is allowed and what was given."""
    err = e.errors(include_url=False)[0]
    loc = err.get("loc") or ()
    name = str(loc[0]) if loc else None
    if err["type"] == "unexpected_keyword_argument":
        return TypeError(f"unknown setting {name!r}; the settings are: {', '.join(_FIELD_NAMES)}")
    if name is None or name not in GenerationSettings.__pydantic_fields__:
        ctx_error = (err.get("ctx") or {}).get("error")
        return SettingsError(str(ctx_error) if ctx_error else err["msg"])
    rule = allowed(name)
    return SettingsError(
        f"{name} must be {rule}, got {err.get('input')!r}", field=name, allowed=rule, value=err["input"]
    )


def _bounds(name: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in GenerationSettings.__pydantic_fields__[name].metadata:
        for attr in ("ge", "le", "multiple_of"):
            if getattr(m, attr, None) is not None:
                out[attr] = getattr(m, attr)
    return out


def choices(name: str) -> tuple[str, ...] | None:
    """The values a choice field may take (None for a number or text)."""
    annotation = GenerationSettings.__pydantic_fields__[name].annotation
    return tuple(annotation.__args__) if getattr(annotation, "__origin__", None) is Literal else None


def bounds(name: str) -> tuple[float, float]:
    """``(lowest, highest)`` of a numeric field."""
    b = _bounds(name)
    return b["ge"], b["le"]


def allowed(name: str) -> str:
    """What a field accepts, in words: ``an integer in [1, 1000]``, ``one of ddim, plms``."""
    options = choices(name)
    if options is not None:
        return "one of " + ", ".join(options)
    kind = GenerationSettings.__pydantic_fields__[name].annotation
    b = _bounds(name)
    if kind is str:
        return "text"
    if getattr(kind, "__origin__", None) is tuple:
        return "a list of DIR[:SCALE] (the scale a finite number)"
    if "multiple_of" in b:
        return f"a multiple of {b['multiple_of']} in [{b['ge']}, {b['le']}] ({_NATIVE})"
    if kind is int:
        return f"an integer in [{b['ge']}, {b['le']}]"
    return f"a finite number in [{b['ge']:g}, {b['le']:g}]"


def help_text(name: str) -> str:
    """The field's description for CLI help and tooltips."""
    return GenerationSettings.__pydantic_fields__[name].description or ""


def default(name: str) -> Any:
    return GenerationSettings.__pydantic_fields__[name].default


# --- limits that depend on the model and the server ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SizeLimits:
    """What one model on one server accepts beyond the settings' own bounds.

    ``max_side``: the smaller of the server's configured cap and MAX_SIDE_FACTOR times the model's native side
    (a UNet far beyond its training size makes repeated, broken images and costs quadratically more).
    """

    native_side: int
    max_side: int
    max_steps: int = MAX_STEPS
    multiple: int = SIZE_MULTIPLE

    @classmethod
    def for_model(
        cls, native_side: int, vae_scale_factor: int = 8, server_max_side: int = MAX_SIDE, max_steps: int = MAX_STEPS
    ) -> SizeLimits:
        multiple = max(SIZE_MULTIPLE, int(vae_scale_factor))
        cap = min(int(server_max_side), MAX_SIDE_FACTOR * int(native_side))
        return cls(native_side=int(native_side), max_side=cap - cap % multiple, max_steps=max_steps, multiple=multiple)

    @classmethod
    def from_model_folder(
        cls, folder: str | Path, server_max_side: int = MAX_SIDE, max_steps: int = MAX_STEPS
    ) -> SizeLimits:
        """From ``unet/config.json`` and ``vae/config.json`` only: no weights are read."""
        folder = Path(folder)
        try:
            unet = json.loads((folder / "unet" / "config.json").read_text())
            vae = json.loads((folder / "vae" / "config.json").read_text())
            scale = 2 ** (len(vae["block_out_channels"]) - 1)
            native = int(unet["sample_size"]) * scale
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SettingsError(f"the model folder {folder} has no readable UNet/VAE config ({e})") from None
        return cls.for_model(native, scale, server_max_side, max_steps)

    @classmethod
    def from_capabilities(cls, capabilities: dict) -> SizeLimits:
        """From a server's ``/v1/capabilities`` answer (``limits``)."""
        limits = capabilities.get("limits") if isinstance(capabilities, dict) else None
        try:
            return cls(
                native_side=int(limits["native_side"]),
                max_side=int(limits["max_side"]),
                max_steps=int(limits["max_steps"]),
                multiple=int(limits.get("size_multiple", SIZE_MULTIPLE)),
            )
        except (TypeError, KeyError, ValueError):
            raise SettingsError("the server's capabilities do not state its size and step limits") from None

    def to_dict(self) -> dict[str, int]:
        """For the capabilities answer."""
        return {
            "native_side": self.native_side,
            "max_side": self.max_side,
            "max_steps": self.max_steps,
            "size_multiple": self.multiple,
        }

    def check(self, settings: GenerationSettings) -> None:
        """SettingsError naming the first setting this model and server refuse."""
        for name in ("width", "height"):
            value = getattr(settings, name)
            if value and (value > self.max_side or value % self.multiple):
                rule = f"a multiple of {self.multiple} in [{self.multiple}, {self.max_side}] for this model ({_NATIVE})"
                raise SettingsError(f"{name} must be {rule}, got {value}", field=name, allowed=rule, value=value)
        if settings.steps > self.max_steps:
            rule = f"an integer in [1, {self.max_steps}] on this server"
            raise SettingsError(
                f"steps must be {rule}, got {settings.steps}", field="steps", allowed=rule, value=settings.steps
            )
