"""Deterministic prompt-adherence checker for single-shape scenes: colour, shape and position.

1. Every pixel is labelled with the nearest palette colour (shape colours and backgrounds); the most frequent
   label is the background.
2. The foreground is the largest 4-connected component of non-background pixels.
3. Colour: the majority palette label inside the component.
4. Position: the component's centroid, snapped to the nearest of the five named positions.
5. Shape: each shape is rendered as a template at the component's centroid over a range of sizes and small
   rotations (with the dataset's own renderer); the shape whose best template has the highest IoU with the
   component wins.
No learned parts, so the checker cannot share a model's blind spots.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from training.shapes import BACKGROUNDS, COLOURS, IMAGE_SIZE, POSITIONS, SHAPES, Scene, shape_mask

_PALETTE_NAMES = list(COLOURS) + list(BACKGROUNDS)
_PALETTE = np.array([*COLOURS.values(), *BACKGROUNDS.values()], dtype=np.float64)
_RADII = np.arange(5.0, 17.01, 0.5)
_ANGLES = (-0.2, 0.0, 0.2)
_MIN_PIXELS = 12


@dataclass(frozen=True)
class Reading:
    """What the checker sees in an image."""

    colour: str | None
    shape: str | None
    position: str | None
    background: str
    pixels: int
    shape_iou: float

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Verdict:
    colour: bool
    shape: bool
    position: bool
    reading: Reading

    @property
    def all(self) -> bool:
        return self.colour and self.shape and self.position


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 4-connected component (the first in raster order on a tie)."""
    labels, count = ndimage.label(mask)
    if count == 0:
        return np.zeros_like(mask, dtype=bool)
    sizes = np.bincount(labels.ravel())[1:]
    return labels == 1 + int(sizes.argmax())


def _nearest_position(cx: float, cy: float) -> str:
    return min(
        POSITIONS,
        key=lambda p: (POSITIONS[p][0] * IMAGE_SIZE - cx) ** 2 + (POSITIONS[p][1] * IMAGE_SIZE - cy) ** 2,
    )


def _best_shape(component: np.ndarray, cx: float, cy: float) -> tuple[str, float]:
    scores = {}
    area = component.sum()
    for shape in SHAPES:
        best = 0.0
        angles = (0.0,) if shape in ("circle", "ring") else _ANGLES
        for radius in _RADII:
            for angle in angles:
                tmpl = shape_mask(shape, cx, cy, float(radius), angle, IMAGE_SIZE)
                inter = np.logical_and(tmpl, component).sum()
                iou = inter / (area + tmpl.sum() - inter)
                best = max(best, float(iou))
        scores[shape] = best
    shape = max(scores, key=scores.get)
    return shape, scores[shape]


def read_image(image: np.ndarray) -> Reading:
    """Read a (64, 64, 3) uint8 RGB image."""
    img = np.asarray(image)
    if img.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"the checker reads {IMAGE_SIZE}x{IMAGE_SIZE} RGB images, got shape {img.shape}")
    dist = ((img.astype(np.float64)[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(-1)
    labels = dist.argmin(-1)
    counts = np.bincount(labels.ravel(), minlength=len(_PALETTE_NAMES))
    bg = int(counts.argmax())
    component = _largest_component(labels != bg)
    pixels = int(component.sum())
    if pixels < _MIN_PIXELS:
        return Reading(None, None, None, _PALETTE_NAMES[bg], pixels, 0.0)
    inside = np.bincount(labels[component], minlength=len(_PALETTE_NAMES))
    inside[bg] = 0
    colour = _PALETTE_NAMES[int(inside.argmax())]
    ys, xs = np.nonzero(component)
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    shape, iou = _best_shape(component, cx, cy)
    return Reading(colour, shape, _nearest_position(cx, cy), _PALETTE_NAMES[bg], pixels, iou)


def check(image: np.ndarray, scene: Scene) -> Verdict:
    """Does ``image`` show the (single-shape) ``scene``?"""
    if len(scene.shapes) != 1:
        raise ValueError("the checker scores single-shape scenes")
    want = scene.shapes[0]
    r = read_image(image)
    return Verdict(r.colour == want.colour, r.shape == want.shape, r.position == want.position, r)
