"""The headless Python API: the client's local models plus a connection to a backend (or a loopback one).

from hediff.desktop.core.api import HEDiffusion

with HEDiffusion("embedded", local_backend=True) as hd:
    result = hd.generate("a red circle", steps=20, seed=1)
    result.save("circle.png")
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from hediff.common.he import ClientKey
from hediff.common.models import resolve_model
from hediff.common.split import DEFAULT_SPLIT
from hediff.desktop.core.backend_client import BackendClient
from hediff.desktop.core.client_model import ClientModel
from hediff.desktop.core.engine import GenerationParams, GenerationResult, Generator, StepUpdate


class HEDiffusion:
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
        insecure: bool = False,
    ):
        if local_backend == (server is not None):
            raise ValueError("give either a server URL or local_backend=True")
        self.model_path = resolve_model(str(model))
        self.client_model = ClientModel(self.model_path, split)
        self._local = None
        if local_backend:
            from hediff.backend.app import create_app
            from hediff.backend.auth import TokenStore
            from hediff.backend.engine import ServerModel
            from hediff.backend.serve import start_in_thread

            tokens, token = TokenStore.ephemeral()
            server_model = ServerModel(self.model_path, str(model), device=backend_device, dtype="float32")
            self._local = start_in_thread(create_app(server_model, tokens))
            server = self._local.url
        else:
            token = token or os.environ.get("HEDIFF_TOKEN")
            if not token:
                raise ValueError(f"{server} needs an API token: pass token=... or set HEDIFF_TOKEN")
        self.client = BackendClient(server, token, timeout_s=timeout_s, tls_ca=tls_ca, insecure=insecure)
        self._generator = Generator(self.client_model, self.client)

    @property
    def native_size(self) -> int:
        return self.client_model.native_size

    @property
    def recommended(self) -> dict[str, float | int]:
        """The model's recommended settings (its ``hediff.json``): the defaults of :meth:`params`."""
        return dict(self.client_model.recommended)

    def params(self, prompt: str, **settings) -> GenerationParams:
        """Generation settings: the model's recommended guidance and steps unless given; width/height default to
        0, the model's native size."""
        settings.setdefault("split", self.client_model.split)
        for name, value in self.client_model.recommended.items():
            if settings.get(name) is None:
                settings[name] = value
        settings = {k: v for k, v in settings.items() if v is not None}
        return GenerationParams(prompt=prompt, **settings)

    def generate(
        self,
        prompt: str | GenerationParams,
        *,
        on_step: Callable[[StepUpdate], None] | None = None,
        cancel=None,
        key: ClientKey | None = None,
        **settings,
    ) -> GenerationResult:
        """``key``: a stored device key to use; by default every generation gets a fresh key."""
        params = prompt if isinstance(prompt, GenerationParams) else self.params(prompt, **settings)
        return self._generator.generate(params, on_step=on_step, cancel=cancel, key=key)

    def close(self) -> None:
        self.client.close()
        if self._local is not None:
            self._local.stop()
            self._local = None

    def __enter__(self) -> HEDiffusion:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
