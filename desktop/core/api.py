"""The headless Python API: generate on this device, or with the client's local models and a backend.

from hediff import HEDiffusion

with HEDiffusion("embedded") as hd:  # on this device; local_backend=True for the paper's split on loopback
    result = hd.generate("a red circle", steps=20, seed=1)
    result.save("circle.png")

Settings are :class:`~hediff.common.settings.GenerationSettings`; every keyword of :meth:`HEDiffusion.generate`
is one of its fields. Whatever can be checked cheaply (bounds, the model's and the server's size limits) is
checked before any model loads; models load on the first generation that needs them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hediff import __version__
from hediff.common.errors import UsageError
from hediff.common.settings import (
    DEFAULT_SPLIT,
    MAX_SIDE,
    SERVER_MAX_STEPS,
    SPLIT_POINTS,
    GenerationSettings,
    SettingsError,
    SizeLimits,
)
from hediff.desktop.core.privacy import PrivacyLabel, Where, label_for

if TYPE_CHECKING:  # torch, TenSEAL and httpx load when needed, not with this module: checks come first and fast
    from hediff.common.he import ClientKey
    from hediff.desktop.core.backend_client import BackendClient
    from hediff.desktop.core.engine import GenerationResult, StepUpdate

__all__ = [
    "GenerationSettings",
    "HEDiffusion",
    "NotPrivateError",
    "PrivacyLabel",
    "SettingsError",
    "SizeLimits",
    "__version__",
    "quiet_libraries",
]


def quiet_libraries() -> None:
    """Silence transformers' and diffusers' loading logs and progress bars (they would hide ours)."""
    import diffusers
    import huggingface_hub
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()


class NotPrivateError(UsageError):
    """A server that proved nothing was asked for without the caller accepting that it is not private."""


class HEDiffusion:
    """A client for one model: on this device (the default: private, nothing leaves the machine), through a
    backend started on loopback (the paper's split, still on this machine), or through a remote ``server``.

    A remote server that proved nothing can rebuild the images and read the prompts (measured: see
    :attr:`privacy`), so it needs ``accept_not_private=True``. ``split``: the split used when a generation does
    not name one (a generation may name any split; the local models for it load on first use). ``token``: the
    remote server's API token (default ``$HEDIFF_TOKEN``); a loopback backend makes its own, so giving one with
    ``local_backend=True`` is an error.
    """

    def __init__(
        self,
        model: str | Path = "embedded",
        *,
        server: str | None = None,
        token: str | None = None,
        local_backend: bool = False,
        split: str = DEFAULT_SPLIT,
        backend_device: str = "cpu",
        timeout_s: float = 120.0,
        tls_ca: str | Path | None = None,
        accept_not_private: bool = False,
        insecure: bool = False,
    ):
        if local_backend and server is not None:
            raise UsageError("give either a server URL or local_backend=True, not both")
        self.where = Where.SERVER if server is not None else Where.LOOPBACK if local_backend else Where.DEVICE
        if self.where is Where.DEVICE and token is not None:
            raise UsageError("a generation on this device talks to no server: do not pass token=...")
        if local_backend and token is not None:
            raise UsageError("local_backend=True starts its own backend with its own token: do not pass token=...")
        if split not in SPLIT_POINTS:
            raise SettingsError(f"split must be one of {', '.join(SPLIT_POINTS)}, got {split!r}", "split")
        if self.where is Where.SERVER:
            if not accept_not_private:
                raise NotPrivateError(
                    f"{server} proved nothing about what it runs: "
                    f"{label_for(Where.SERVER, split, 'full').text}. Pass accept_not_private=True to send to it "
                    "anyway, generate on this device (no server), or use an attested confidential server"
                )
            token = token or os.environ.get("HEDIFF_TOKEN")
            if not token:
                raise UsageError(f"{server} needs an API token: pass token=... or set HEDIFF_TOKEN")
        self.model_spec = str(model)
        self._model_path: Path | None = None
        self.split = split
        self._backend_device = backend_device
        self._timeout_s, self._tls_ca = timeout_s, tls_ca
        self._client_models: dict[str, Any] = {}
        self._local = None
        self._limits: SizeLimits | None = None
        self.client: BackendClient | None = None
        self._on_device = None
        if self.where is Where.SERVER:
            from hediff.desktop.core.backend_client import BackendClient

            self.client = BackendClient(server, token, timeout_s=timeout_s, tls_ca=tls_ca, insecure=insecure)

    # --- what the model and the server accept (no weights loaded) ---

    @property
    def model_path(self) -> Path:
        """The model folder (``"embedded"`` and hub ids are resolved, built or downloaded on first use)."""
        if self._model_path is None:
            from hediff.common.models import resolve_model

            self._model_path = resolve_model(self.model_spec)
        return self._model_path

    def _config_folder(self) -> Path:
        # a folder given by path is read as it is: its configs answer the cheap checks before torch is imported
        given = Path(self.model_spec).expanduser()
        return given if self.model_spec != "embedded" and given.is_dir() else self.model_path

    @property
    def native_size(self) -> int:
        """The model's native image side in pixels (from its config)."""
        return SizeLimits.from_model_folder(self._config_folder()).native_side

    @property
    def recommended(self) -> dict[str, float | int]:
        """The model's recommended settings (its ``hediff.json``): the defaults of :meth:`settings`."""
        from hediff.common.models import recommended_settings

        return recommended_settings(self.model_path)

    @property
    def limits(self) -> SizeLimits:
        """The largest size and most steps this model on this backend accepts: the remote server's advertised
        capabilities, or the model's config and the loopback backend's default configuration."""
        if self._limits is None:
            if self.where is Where.SERVER:
                self._limits = SizeLimits.from_capabilities(self.client.capabilities())
            else:  # this machine: the loopback backend's default configuration applies to both
                self._limits = SizeLimits.from_model_folder(self._config_folder(), MAX_SIDE, SERVER_MAX_STEPS)
        return self._limits

    def privacy(self, split: str | None = None, encryption: str = "full") -> PrivacyLabel:
        """What this way of generating protects, in one line (measured for a server; see docs/threat-model.md)."""
        return label_for(self.where, split or self.split, encryption)

    def settings(self, prompt: str, **overrides: Any) -> GenerationSettings:
        """Settings for ``prompt``: the model's recommended guidance and steps and this client's split unless
        ``overrides`` say otherwise. Width and height 0 mean the model's native size. Unknown names are a
        TypeError, bad values a SettingsError."""
        base: dict[str, Any] = {"split": self.split, **self.recommended}
        return GenerationSettings(prompt=prompt, **{**base, **_path_names(overrides)})

    def check(self, settings: GenerationSettings) -> None:
        """Everything that can be checked without loading a model: a prompt, the model's and server's limits."""
        settings.validate()
        self.limits.check(settings)

    # --- generating ---

    def generate(
        self,
        prompt: str | GenerationSettings,
        *,
        on_step: Callable[[StepUpdate], None] | None = None,
        cancel=None,
        key: ClientKey | None = None,
        **overrides: Any,
    ) -> GenerationResult:
        """Generate one image from a prompt (plus setting ``overrides``) or from complete settings (``overrides``
        then replace some of them). ``key``: a stored device key to use; by default every generation gets a
        fresh key. ``cancel``: a ``threading.Event`` that stops the generation between steps."""
        if isinstance(prompt, GenerationSettings):
            settings = dataclasses.replace(prompt, **_path_names(overrides)) if overrides else prompt
        elif isinstance(prompt, str):
            settings = self.settings(prompt, **overrides)
        else:
            raise TypeError(f"generate() takes a prompt or GenerationSettings, not {type(prompt).__name__}")
        self.check(settings)
        if self.where is Where.DEVICE:
            return self._device_generator(settings.lora).generate(settings, on_step=on_step, cancel=cancel, key=key)
        from hediff.desktop.core.engine import Generator

        generator = Generator(self._client_model(settings.split, settings.lora), self._backend(settings.lora))
        return generator.generate(settings, on_step=on_step, cancel=cancel, key=key)

    def _device_generator(self, lora: tuple[str, ...] = ()):
        if self._on_device is None or self._on_device.lora != tuple(lora):  # LoRAs change the weights: reload
            from hediff.desktop.core.on_device import OnDeviceGenerator

            quiet_libraries()
            self._on_device = OnDeviceGenerator(self.model_path, lora=tuple(lora))
        return self._on_device

    def _client_model(self, split: str, lora: tuple[str, ...] = ()):
        key = (split, tuple(lora))
        if key not in self._client_models:
            from hediff.desktop.core.client_model import ClientModel

            quiet_libraries()
            self._client_models[key] = ClientModel(self.model_path, split, lora=tuple(lora))
        return self._client_models[key]

    def _backend(self, lora: tuple[str, ...] = ()) -> BackendClient:
        """The server's client; a loopback backend starts with the first generation's LoRAs (a later generation
        with others is refused by the weights digest: start another HEDiffusion for them)."""
        if self.client is None:
            from hediff.backend.app import create_app
            from hediff.backend.auth import TokenStore
            from hediff.backend.engine import ServerModel
            from hediff.backend.serve import start_in_thread
            from hediff.desktop.core.backend_client import BackendClient

            quiet_libraries()
            tokens, token = TokenStore.ephemeral()
            server_model = ServerModel(
                self.model_path, self.model_spec, device=self._backend_device, dtype="float32", lora=tuple(lora)
            )
            self._local = start_in_thread(create_app(server_model, tokens))
            self.client = BackendClient(self._local.url, token, timeout_s=self._timeout_s, tls_ca=self._tls_ca)
        return self.client

    def close(self) -> None:
        """Close the connection and stop the loopback backend, if one was started."""
        if self.client is not None:
            self.client.close()
        if self._local is not None:
            self._local.stop()
            self._local = None

    def __enter__(self) -> HEDiffusion:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _path_names(overrides: dict[str, Any]) -> dict[str, Any]:
    """A path object given for a file setting (``init_image``) as the text the settings hold."""
    return {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in overrides.items()}
