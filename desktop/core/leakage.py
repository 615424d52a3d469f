"""Measured leakage per (split, encryption), as shipped with the app. Qt-free.

The numbers come from ``python -m bench.leakage --model <m>`` and are copied into ``desktop/core/data/leakage.json``
by ``python -m bench.leakage --update-app``; docs/leakage.md explains them. A mode that was not measured has no
entry, and the app says so rather than guessing.

Every verdict is relative to the prompt-only baseline (a server that holds only the prompt runs the sampler
itself): a mode "leaks the image" only when the best measured attack beats that. :func:`privacy_label` is the
one plain-words line per (split, encryption) that the Privacy tab, the CLI and the form show; it never calls a
mode private.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from hediff.common.errors import HEDiffusionError

DATA_FILE = Path(__file__).resolve().parent / "data" / "leakage.json"
FORMAT = "he-diffusion/leakage/v2"
#: Which measurement to show when several models were measured: the shipped model first.
MODEL_PREFERENCE = ("embedded", "tiny", "sd15")
NOT_MEASURED = "not measured yet"
#: Share of prompt tokens at and above which the server "reads your prompts".
PROMPT_READ_SHARE = 0.5


class LeakageDataError(HEDiffusionError, ValueError):
    """The shipped leakage file is unreadable or not in the expected format."""


@dataclass(frozen=True)
class LeakageMeasurement:
    model: str
    split: str
    encryption: str
    attack: str  # the best measured attack on this mode
    final_psnr: float  # dB, PSNR of the server's best rebuild of the final image (100 = exact)
    final_ssim: float
    baseline_psnr: float  # dB, what a server holding only the prompt gets
    baseline_ssim: float
    x_t_psnr_min: float  # dB, over the attacked steps
    x_t_psnr_max: float
    prompt_token_accuracy: float | None  # share of prompt tokens the server recovers, None if not measured
    leaks_image: bool  # the best attack beats the prompt-only baseline (decided by bench/leakage.py)
    verdict: str
    command: str

    def label(self) -> str:
        """The plain-words line: private or not, and the measured numbers that say so."""
        rebuilt = "exactly" if self.final_psnr >= 100 else f"{self.final_psnr:.1f} dB"
        measured = f"measured {rebuilt} vs {self.baseline_psnr:.1f} dB from the prompt alone"
        reads = self.prompt_token_accuracy is not None and self.prompt_token_accuracy >= PROMPT_READ_SHARE
        tokens = (
            "prompt recovery not measured"
            if self.prompt_token_accuracy is None
            else f"{self.prompt_token_accuracy * 100:.0f}% of tokens"
        )
        if self.leaks_image and reads:
            return f"Not private: this server can rebuild your images ({measured}) and read your prompts ({tokens})"
        if self.leaks_image:
            return f"Not private: this server can rebuild your images ({measured}); prompts: {tokens}"
        if reads:
            return (
                f"Not private: this server can read your prompts ({tokens}); your images it rebuilds little "
                f"better than from the prompt alone ({measured})"
            )
        # nothing measured leaks beyond the prompt, which is not a proof of privacy: say what was measured
        return f"Leaks little beyond the prompt in our measurements ({measured}; prompts: {tokens})"

    def summary(self) -> str:
        """The label, then the numbers behind it."""
        psnr = "exact (≥ 100 dB PSNR)" if self.final_psnr >= 100 else f"{self.final_psnr:.1f} dB PSNR"
        return (
            f"{self.label()}. Verdict: {self.verdict}; best attack ({self.attack}): final image {psnr}, SSIM "
            f"{self.final_ssim:.2f}; prompt alone: {self.baseline_psnr:.1f} dB, SSIM {self.baseline_ssim:.2f}; "
            f"measured on the {self.model} model"
        )


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


def _flag(value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"leaks_image must be true or false, got {value!r}")
    return value


def _measurement(model: str, entry: dict, row: dict) -> LeakageMeasurement:
    try:
        token = row.get("prompt_token_accuracy")
        return LeakageMeasurement(
            model=model,
            split=str(row["split"]),
            encryption=str(row["encryption"]),
            attack=str(row["attack"]),
            final_psnr=float(row["final_psnr"]),
            final_ssim=float(row["final_ssim"]),
            baseline_psnr=float(row["baseline_psnr"]),
            baseline_ssim=float(row["baseline_ssim"]),
            x_t_psnr_min=float(row["x_t_psnr_min"]),
            x_t_psnr_max=float(row["x_t_psnr_max"]),
            prompt_token_accuracy=None if token is None else float(token),
            leaks_image=_flag(row["leaks_image"]),
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


def privacy_label(split: str, encryption: str, path: Path = DATA_FILE) -> str:
    """The one plain-words line for ``(split, encryption)`` (CLI, form, Privacy tab); never raises.

    Unmeasured modes and unreadable data are not called private either: the line says to treat them as not.
    """
    try:
        found = lookup(split, encryption, path=path)
    except LeakageDataError as exc:
        return f"Privacy {NOT_MEASURED} ({exc}); treat this mode as not private"
    if found is None:
        return f"Privacy {NOT_MEASURED} for split {split} with encryption {encryption}; treat it as not private"
    return found.label()
