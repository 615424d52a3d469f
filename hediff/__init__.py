"""HE-Diffusion: private Stable Diffusion.

The Python API lives in :mod:`hediff.desktop.core.api`; ``from hediff import HEDiffusion`` is the short
form. The heavy modules (torch, diffusers, TenSEAL) load on first use, so ``import hediff`` stays cheap.
"""

from __future__ import annotations

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("he-diffusion")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["HEDiffusion", "__version__"]


def __getattr__(name: str):
    if name == "HEDiffusion":
        from hediff.desktop.core.api import HEDiffusion

        return HEDiffusion
    raise AttributeError(f"module 'hediff' has no attribute {name!r}")
