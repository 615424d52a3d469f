"""Finished images in the app's private data folder: ``<id>.png`` plus a ``<id>.json`` sidecar. Qt-free.

The sidecar keeps the full parameters so "load settings back" works; the prompts only when the user turned on
"remember prompt" (the same choice that keeps them in the settings). It never leaves the private data folder. The
PNG carries the prompt only if the user asked for that, and an export decides again. Every file is 0600.
Ids are UTC timestamps with microseconds plus a random suffix: unique, and they sort by creation time.

A job of ``count`` N stores N entries, one per image, as InvokeAI does: each is a whole image with its own seed
(s, s+1, ...) in its settings and metadata, so it can be viewed, exported, deleted or reproduced alone; the
sidecar records the batch (the first image's id, the index, N) so the gallery lists a job's images together.
"""

from __future__ import annotations

import io
import json
import re
import secrets
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from hediff.common.errors import HEDiffusionError
from hediff.common.files import atomic_write
from hediff.desktop.core.appdata import ensure_private_dir
from hediff.desktop.core.engine import GenerationParams, GenerationResult
from hediff.desktop.core.settings import params_from_dict

SIDECAR_FORMAT = "hediff-gallery/1"
_ID_RE = re.compile(r"^\d{8}-\d{6}-\d{6}-[0-9a-f]{6}$")
_MAX_SIDECAR = 1 << 20
EXPORT_SCALES = (1, 2, 3, 4, 6, 8)


class GalleryError(HEDiffusionError, ValueError):
    """A gallery entry that cannot be used; str() names it and says why."""


@dataclass
class GalleryEntry:
    id: str
    image_path: Path
    params: GenerationParams
    created: float
    total_s: float
    steps: int
    key_fingerprint: str | None
    server_url: str
    encrypted_fraction: float | None  # mean over the steps; None for the plaintext baseline
    timing_totals: dict[str, float] = field(default_factory=dict)
    bytes_sent: int = 0
    bytes_received: int = 0
    model: str = ""  # "embedded", a model folder or a hub id; "" for entries from before it was kept
    batch_id: str = ""  # the id of the job's first image when the job made several; "" for a single image
    batch_index: int = 0  # 0-based place in the job's images (its seed is the job's seed + batch_index)
    batch_size: int = 1

    def summary(self) -> str:
        """One line for a list: size, steps, scheduler, encryption, seed, time."""
        p = self.params
        enc = p.encryption if p.encryption != "min-distortion" else f"min-distortion (tau {p.tau:g})"
        return (
            f"{p.width}x{p.height}, {self.steps} steps {p.scheduler}, {enc}, seed {p.seed}, "
            f"guidance {p.guidance:g}, {self.total_s:.1f} s{self.batch_text(', ')}"
        )

    def batch_text(self, prefix: str = "") -> str:
        """``image 2 of 4 of one job`` for an image of a batch; "" for a single image."""
        if self.batch_size <= 1:
            return ""
        return f"{prefix}image {self.batch_index + 1} of {self.batch_size} of one job"


def new_entry_id(now: float) -> str:
    """``YYYYMMDD-HHMMSS-uuuuuu-rrrrrr`` (UTC): sorts by time; the random suffix keeps ids unique."""
    seconds = int(now)
    micros = int(round((now - seconds) * 1e6))
    if micros >= 1_000_000:
        seconds, micros = seconds + 1, micros - 1_000_000
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(seconds))
    return f"{stamp}-{micros:06d}-{secrets.token_hex(3)}"


def save_png_private(result: GenerationResult, path: Path, include_prompt: bool) -> Path:
    """The result's PNG (parameters in its metadata, the prompts only if ``include_prompt``) written atomically,
    readable by this user only (0600) from the first byte."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in result.metadata(include_prompt).items():
        info.add_text(k, v)
    buf = io.BytesIO()
    result.image.save(buf, format="PNG", pnginfo=info)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, buf.getvalue(), mode=0o600)
    return path


def settings_from_png(path: Path) -> GenerationParams:
    """The generation settings a PNG written by this app carries in its metadata (the prompts only if they were
    embedded: "" otherwise). GalleryError when the file is not a readable PNG or carries no settings."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            if im.format != "PNG":
                raise GalleryError(f"{path.name} is not a PNG image")
            text = dict(getattr(im, "text", {}) or {})
    except OSError as e:
        raise GalleryError(f"{path.name} cannot be read as an image: {e}") from None
    if not any(k.startswith("hediff:") for k in text):
        raise GalleryError(f"{path.name} carries no HE-Diffusion settings (only images made by this app do)")
    try:
        return GenerationParams.from_text(text)
    except ValueError as e:
        raise GalleryError(f"the settings in {path.name} are not usable: {e}") from None


def entry_date(entry: GalleryEntry) -> str:
    """When an entry was made, local time, as the gallery shows and searches it: ``YYYY-MM-DD HH:MM``."""
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.created))


def matches(entry: GalleryEntry, query: str) -> bool:
    """Gallery search: every word of ``query`` (case-insensitive) appears in the entry's prompt (kept only when
    prompts are remembered), negative prompt, model, date (``2026-12-07 14:05``), scheduler or seed."""
    p = entry.params
    haystack = " ".join(
        (p.prompt, p.negative_prompt, entry.model, Path(entry.model).name, entry_date(entry), p.scheduler, str(p.seed))
    ).lower()
    return all(word in haystack for word in query.lower().split())


def _check_id(entry_id: str) -> str:
    if not isinstance(entry_id, str) or not _ID_RE.match(entry_id):
        raise GalleryError(f"{entry_id!r} is not a gallery entry id")
    return entry_id


class Gallery:
    def __init__(self, root: Path, clock=time.time):
        self.root = Path(root)
        self.clock = clock
        self.problems: list[str] = []

    def _png(self, entry_id: str) -> Path:
        return self.root / f"{entry_id}.png"

    def _sidecar(self, entry_id: str) -> Path:
        return self.root / f"{entry_id}.json"

    # --- adding ---

    def add(
        self, result: GenerationResult, include_prompt_in_png: bool, remember_prompt: bool = False, model: str = ""
    ) -> GalleryEntry:
        """Store a finished result (every image of a batch, see :meth:`add_all`); the entry of its first image."""
        return self.add_all(result, include_prompt_in_png, remember_prompt, model)[0]

    def add_all(
        self, result: GenerationResult, include_prompt_in_png: bool, remember_prompt: bool = False, model: str = ""
    ) -> list[GalleryEntry]:
        """Store a finished result, one entry per image in seed order: the PNG (prompt in its metadata only if
        asked) and the parameters sidecar (the prompts and the init image's path only if ``remember_prompt``;
        ``model``: what made it, for search). Each image's settings carry its own seed."""
        if result.image is None:
            raise GalleryError("the result has no image to store")
        images = list(result.images) or [result.image]
        ensure_private_dir(self.root, tighten_existing=True)
        created = float(self.clock())
        entries: list[GalleryEntry] = []
        for index, image in enumerate(images):
            params = replace(result.params, seed=result.params.seed + index)
            one = replace(result, params=params, image=image, images=[image])
            batch_id = entries[0].id if entries else ""
            entries.append(
                self._add_one(one, created, include_prompt_in_png, remember_prompt, model, batch_id, index, len(images))
            )
        return entries

    def _add_one(
        self,
        result: GenerationResult,
        created: float,
        include_prompt_in_png: bool,
        remember_prompt: bool,
        model: str,
        batch_id: str,
        batch_index: int,
        batch_size: int,
    ) -> GalleryEntry:
        entry_id = new_entry_id(created)
        while self._sidecar(entry_id).exists() or self._png(entry_id).exists():
            entry_id = new_entry_id(created)
        if batch_size > 1 and not batch_id:
            batch_id = entry_id
        png = save_png_private(result, self._png(entry_id), include_prompt_in_png)
        fractions = list(result.encrypted_fractions)
        entry = GalleryEntry(
            id=entry_id,
            image_path=png,
            params=result.params,
            created=created,
            total_s=float(result.total_s),
            steps=int(result.params.steps),
            key_fingerprint=result.key_fingerprint,
            server_url=result.server_url,
            encrypted_fraction=float(np.mean(fractions)) if fractions else None,
            timing_totals=result.timing_totals(),
            bytes_sent=int(sum(result.bytes_sent)),
            bytes_received=int(sum(result.bytes_received)),
            model=str(model),
            batch_id=batch_id,
            batch_index=batch_index,
            batch_size=batch_size,
        )
        kept = entry.params if remember_prompt else replace(entry.params, prompt="", negative_prompt="", init_image="")
        sidecar = {
            "format": SIDECAR_FORMAT,
            "id": entry.id,
            "image": png.name,
            "params": asdict(kept),
            "model": entry.model,
            "created": entry.created,
            "total_s": entry.total_s,
            "steps": entry.steps,
            "key_fingerprint": entry.key_fingerprint,
            "server_url": entry.server_url,
            "encrypted_fraction": entry.encrypted_fraction,
            "timing_totals": entry.timing_totals,
            "bytes_sent": entry.bytes_sent,
            "bytes_received": entry.bytes_received,
            "prompt_in_png": bool(include_prompt_in_png),
        }
        if batch_size > 1:
            sidecar["batch"] = {"id": batch_id, "index": batch_index, "size": batch_size}
        # the sidecar is the commit point: an image without one is reported, never half-listed
        atomic_write(self._sidecar(entry_id), (json.dumps(sidecar, indent=1) + "\n").encode("utf-8"), mode=0o600)
        return entry

    # --- reading ---

    def entries(self) -> list[GalleryEntry]:
        """All readable entries, newest first. Unreadable ones are skipped and described in ``.problems``."""
        problems: list[str] = []
        found: list[GalleryEntry] = []
        if self.root.is_dir():
            ids_with_sidecar = set()
            for sidecar in sorted(self.root.glob("*.json")):
                if not _ID_RE.match(sidecar.stem):
                    continue
                ids_with_sidecar.add(sidecar.stem)
                try:
                    found.append(self._read(sidecar.stem))
                except GalleryError as e:
                    problems.append(str(e))
            for png in sorted(self.root.glob("*.png")):
                if _ID_RE.match(png.stem) and png.stem not in ids_with_sidecar:
                    problems.append(f"gallery image {png.name} has no settings file (.json) and was skipped")
        # newest job first; a job's images together, in seed order
        found.sort(key=lambda e: (-e.created, e.batch_id or e.id, e.batch_index))
        self.problems = problems
        return found

    def get(self, entry_id: str) -> GalleryEntry | None:
        """The entry, or None if there is none with this id; GalleryError if it exists but is unreadable."""
        if not isinstance(entry_id, str) or not _ID_RE.match(entry_id):
            return None  # not an id this gallery makes, so nothing is stored under it
        if not self._sidecar(entry_id).exists():
            return None
        return self._read(entry_id)

    def _read(self, entry_id: str) -> GalleryEntry:
        path = self._sidecar(entry_id)
        name = path.name
        try:
            with open(path, "rb") as f:
                raw = f.read(_MAX_SIDECAR + 1)
        except OSError as e:
            raise GalleryError(f"gallery entry {name} cannot be read ({e.strerror or e}) and was skipped") from None
        try:
            if len(raw) > _MAX_SIDECAR:
                raise ValueError("the file is far too large")
            data = json.loads(raw.decode("utf-8"))
            if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT:
                raise ValueError("not a gallery settings file")
            if data.get("id") != entry_id:
                raise ValueError(f"it describes entry {data.get('id')!r}")
            stored = data["params"]
            if not isinstance(stored, dict) or not isinstance(stored.get("prompt"), str):
                raise ValueError("the parameters are missing")
            params = params_from_dict(stored, prompt=stored["prompt"])
            fraction = data.get("encrypted_fraction")
            fingerprint = data.get("key_fingerprint")
            if fingerprint is not None and not isinstance(fingerprint, str):
                raise ValueError("bad key fingerprint")
            batch = data.get("batch") or {"id": "", "index": 0, "size": 1}
            if not isinstance(batch, dict) or not isinstance(batch.get("id"), str):
                raise ValueError("bad batch")
            totals = data.get("timing_totals", {})
            if not isinstance(totals, dict):
                raise ValueError("bad timing totals")
            entry = GalleryEntry(
                id=entry_id,
                image_path=self._png(entry_id),
                params=params,
                created=_number(data["created"], "created"),
                total_s=_number(data.get("total_s", 0.0), "total_s"),
                steps=int(_number(data.get("steps", params.steps), "steps")),
                key_fingerprint=fingerprint,
                server_url=str(data.get("server_url", "")),
                encrypted_fraction=None if fraction is None else _number(fraction, "encrypted_fraction"),
                timing_totals={str(k): _number(v, "timing") for k, v in totals.items()},
                bytes_sent=int(_number(data.get("bytes_sent", 0), "bytes_sent")),
                bytes_received=int(_number(data.get("bytes_received", 0), "bytes_received")),
                model=str(data.get("model", "")),
                batch_id=batch["id"],
                batch_index=int(_number(batch.get("index", 0), "batch index")),
                batch_size=int(_number(batch.get("size", 1), "batch size")),
            )
        except (UnicodeDecodeError, ValueError, TypeError, KeyError) as e:
            why = f"missing {e}" if isinstance(e, KeyError) else str(e)
            raise GalleryError(f"gallery entry {name} is corrupt ({why}) and was skipped") from None
        if not entry.image_path.is_file():
            raise GalleryError(f"gallery entry {entry_id}: its image {entry.image_path.name} is missing; skipped")
        return entry

    # --- changing ---

    def delete(self, entry_id: str) -> None:
        """Remove the image and its sidecar (an entry that is not there is fine)."""
        _check_id(entry_id)
        for path in (self._sidecar(entry_id), self._png(entry_id)):
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    def export(self, entry_id: str, dest: Path, include_prompt: bool, scale: int = 1, smooth: bool = False) -> Path:
        """Write the image as a PNG to ``dest`` (a file, ".png" added if missing, or a folder to put
        ``hediff-<id>.png`` in) with the parameters in its metadata, the prompts only if ``include_prompt``.
        ``scale``: upscale by a whole factor (a 128 px image is small as is), with crisp pixels (nearest) or,
        if ``smooth``, Lanczos filtering. Returns the path written."""
        if isinstance(scale, bool) or not isinstance(scale, int) or scale not in EXPORT_SCALES:
            raise GalleryError(f"the export scale must be one of {', '.join(map(str, EXPORT_SCALES))}, got {scale!r}")
        entry = self.get(entry_id)
        if entry is None:
            raise GalleryError(f"there is no gallery entry {entry_id}")
        dest = Path(dest)
        if dest.is_dir():
            dest = dest / f"hediff-{entry_id}.png"
        elif dest.suffix.lower() != ".png":
            dest = dest.with_name(dest.name + ".png")  # always a PNG: that is where the metadata goes
        try:
            with Image.open(entry.image_path) as im:
                image = im.convert("RGB")  # pixels only: none of the stored file's metadata comes along
        except OSError as e:
            raise GalleryError(f"gallery image {entry.image_path.name} cannot be read: {e}") from None
        if scale > 1:
            resample = Image.Resampling.LANCZOS if smooth else Image.Resampling.NEAREST
            image = image.resize((image.width * scale, image.height * scale), resample)
        fractions = [entry.encrypted_fraction] if entry.encrypted_fraction is not None else []
        latent = np.zeros(0)  # not needed for the PNG
        exported = GenerationResult(params=entry.params, image=image, latent=latent, encrypted_fractions=fractions)
        return save_png_private(exported, dest, include_prompt)


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"bad {what}")
    return float(value)
