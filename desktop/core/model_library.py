"""The models the app knows: the embedded one and diffusers folders the user added, what each is (native size,
family, recommended settings, which splits its UNet supports) and which one is the default. Qt-free.

Folders are validated by hediff.common.models (configs and safetensors headers only: no weights are loaded), so
adding one takes well under a second. The list and the default live in the app's settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hediff.common import settings as gs
from hediff.common.errors import ModelError
from hediff.common.models import (
    EMBEDDED_MODEL_DIR,
    ModelFolderError,
    load_unet_config,
    model_family,
    recommended_settings,
    validate_model_folder,
)

EMBEDDED = "embedded"
FAMILY_NAMES = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x"}


@dataclass
class ModelInfo:
    spec: str  # "embedded" or the folder's absolute path, as the form and settings name it
    name: str
    family: str
    native_side: int
    max_side: int
    recommended: dict[str, float | int] = field(default_factory=dict)
    splits: dict[str, str | None] = field(default_factory=dict)  # split -> None if supported, else why not

    @property
    def supported_splits(self) -> list[str]:
        return [s for s, why in self.splits.items() if why is None]

    def summary(self) -> str:
        rec = ", ".join(f"{k} {v:g}" for k, v in self.recommended.items()) or "none (SD's defaults apply)"
        return (
            f"{FAMILY_NAMES.get(self.family, self.family)}, native {self.native_side}×{self.native_side} px "
            f"(up to {self.max_side}); recommended: {rec}; splits: {', '.join(self.supported_splits) or 'none'}"
        )


def folder_of(spec: str) -> Path:
    return EMBEDDED_MODEL_DIR if spec == EMBEDDED else Path(spec).expanduser()


def describe(spec: str) -> ModelInfo:
    """What a model folder is; ModelError (its text says what is wrong and what to do) when it is not usable."""
    folder = folder_of(spec)
    validate_model_folder(folder)
    family = model_family(folder)
    try:
        limits = gs.SizeLimits.from_model_folder(folder)
    except gs.SettingsError as e:
        raise ModelFolderError(f"Model folder {folder}: {e}") from None
    unet = load_unet_config(folder)
    from hediff.common.split import check_unet_config

    splits: dict[str, str | None] = {}
    for split in gs.choices("split"):
        try:
            check_unet_config(unet, split)
            splits[split] = None
        except ModelError as e:
            splits[split] = str(e)
    name = "Embedded model" if spec == EMBEDDED else folder.name
    return ModelInfo(
        spec=spec,
        name=name,
        family=family,
        native_side=limits.native_side,
        max_side=limits.max_side,
        recommended=recommended_settings(folder),
        splits=splits,
    )


class ModelLibrary:
    """The embedded model first, then the added folders in the order they were added."""

    def __init__(self, settings):
        self.settings = settings

    def specs(self) -> list[str]:
        return [EMBEDDED, *(m for m in self.settings.models if m != EMBEDDED)]

    @property
    def default(self) -> str:
        return self.settings.model or EMBEDDED

    def add(self, folder) -> ModelInfo:
        """Validate a diffusers folder and add it (once). Saves. ModelError when it is not a usable model."""
        spec = str(Path(folder).expanduser().absolute())
        info = describe(spec)
        if spec not in self.settings.models:
            self.settings.models = [*self.settings.models, spec]
            self.settings.save()
        return info

    def remove(self, spec: str) -> None:
        """Forget an added folder (its files stay). The embedded model stays; removing the default makes the
        embedded model the default. Saves."""
        if spec == EMBEDDED:
            raise ValueError("the embedded model ships with the app and cannot be removed")
        self.settings.models = [m for m in self.settings.models if m != spec]
        if self.settings.model == spec:
            self.settings.model = EMBEDDED
        self.settings.save()

    def set_default(self, spec: str) -> None:
        """The model the app starts with. Saves."""
        if spec not in self.specs():
            raise ValueError(f"{spec} is not in the model list; add it first")
        self.settings.model = spec
        self.settings.save()
