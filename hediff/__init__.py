"""HE-Diffusion: private Stable Diffusion.

The Python API lives in :mod:`hediff.desktop.core.api`; ``from hediff import HEDiffusion`` is the short
form. The heavy modules (torch, diffusers, TenSEAL) load on first use, so ``import hediff`` stays cheap.
"""

from __future__ import annotations

__all__ = ["HEDiffusion", "__version__"]


def _version() -> str:
    from importlib import metadata  # ~0.1-0.25 s (email parsing): only when the version is asked for

    try:
        return metadata.version("he-diffusion")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


def __getattr__(name: str):
    if name == "HEDiffusion":
        from hediff.desktop.core.api import HEDiffusion

        return HEDiffusion
    if name == "__version__":
        return _version()
    raise AttributeError(f"module 'hediff' has no attribute {name!r}")
