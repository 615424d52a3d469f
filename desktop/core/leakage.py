"""Measured leakage per (split, encryption), as shipped with the app. Qt-free.

The numbers come from ``python -m bench.leakage --model <m>`` and are copied into ``desktop/core/data/leakage.json``
by ``python -m bench.leakage --update-app``; docs/leakage.md explains them. A mode that was not measured has no
entry, and the app says so rather than guessing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

DATA_FILE = Path(__file__).resolve().parent / "data" / "leakage.json"
FORMAT = "he-diffusion/leakage/v1"
#: Which measurement to show when several models were measured: the shipped model first.
MODEL_PREFERENCE = ("embedded", "tiny", "sd15")
NOT_MEASURED = "not measured yet"


class LeakageDataError(ValueError):
    """The shipped leakage file is unreadable or not in the expected format."""


@dataclass(frozen=True)
class LeakageMeasurement:
    model: str
    split: str
    encryption: str
    final_psnr: float  # dB, PSNR of the server's best rebuild of the final image (100 = exact)
    final_ssim: float
    x_t_psnr_min: float  # dB, over the attacked steps
    x_t_psnr_max: float
    prompt_token_accuracy: float | None  # share of prompt tokens the server recovers, None if not measured
    verdict: str
    command: str

    def summary(self) -> str:
        """One line for the app: the verdict, then the numbers behind it."""
        psnr = "exact (≥ 100 dB PSNR)" if self.final_psnr >= 100 else f"{self.final_psnr:.1f} dB PSNR"
        parts = [f"final image rebuilt by the server: {psnr}, SSIM {self.final_ssim:.2f}"]
        if self.prompt_token_accuracy is not None:
            parts.append(f"prompt tokens recovered: {self.prompt_token_accuracy * 100:.0f} %")
        return f"{self.verdict} ({'; '.join(parts)}; measured on the {self.model} model)"


def load_table(path: Path = DATA_FILE) -> dict:
    """The shipped file as a dict; an absent file is an empty table, a broken one a :class:`LeakageDataError`."""
    path = Path(path)
    if not path.is_file():
        return {"format": FORMAT, "models": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LeakageDataError(f"leakage data {path} is unreadable ({exc}); rerun python -m bench.leakage") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("models"), dict):
        raise LeakageDataError(f"leakage data {path} is not in format {FORMAT}; rerun python -m bench.leakage")
    return data


def _measurement(model: str, entry: dict, row: dict) -> LeakageMeasurement:
    try:
        token = row.get("prompt_token_accuracy")
        return LeakageMeasurement(
            model=model,
            split=str(row["split"]),
            encryption=str(row["encryption"]),
            final_psnr=float(row["final_psnr"]),
            final_ssim=float(row["final_ssim"]),
            x_t_psnr_min=float(row["x_t_psnr_min"]),
            x_t_psnr_max=float(row["x_t_psnr_max"]),
            prompt_token_accuracy=None if token is None else float(token),
            verdict=str(row["verdict"]),
            command=str(entry.get("command", "")),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise LeakageDataError(f"leakage data for model {model!r} has a malformed row: {exc}") from exc


def lookup(split: str, encryption: str, model: str | None = None, path: Path = DATA_FILE) -> LeakageMeasurement | None:
    """The measurement for ``(split, encryption)``: from ``model`` if given, else the first of
    :data:`MODEL_PREFERENCE` (then any other) that has one. None when the mode was not measured."""
    models = load_table(path)["models"]
    order = [model] if model else [*MODEL_PREFERENCE, *sorted(set(models) - set(MODEL_PREFERENCE))]
    for name in order:
        entry = models.get(name)
        if not isinstance(entry, dict):
            continue
        for row in entry.get("modes", []):
            if isinstance(row, dict) and row.get("split") == split and row.get("encryption") == encryption:
                return _measurement(name, entry, row)
    return None


def describe(split: str, encryption: str, path: Path = DATA_FILE) -> str:
    """The line the app shows; never raises (a broken file is reported in the line itself)."""
    try:
        found = lookup(split, encryption, path=path)
    except LeakageDataError as exc:
        return f"{NOT_MEASURED} ({exc})"
    return found.summary() if found else f"{NOT_MEASURED} for split {split} with encryption {encryption}"
