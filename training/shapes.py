"""Synthetic captioned shapes: the training and evaluation data of the embedded model.

Each scene is one or two flat-coloured shapes on a plain background, e.g.
"a large red circle at the top left on a white background" or
"a small blue star at the top right and a large yellow ring at the bottom left on a black background".
Everything is a pure function of an integer seed, so a dataset index always gives the same image and caption.

Some (colour, shape) pairs never appear in training (:data:`HELD_OUT_PAIRS`); the evaluation prompts use
exactly those pairs, so adherence is measured on combinations the model has not seen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 64
_SUPERSAMPLE = 4

#: Shape colours (RGB). Saturated and far apart so the checker can segment them without ambiguity.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 230),
    "yellow": (245, 220, 30),
    "purple": (140, 50, 200),
    "orange": (250, 140, 20),
    "cyan": (30, 210, 220),
    "pink": (250, 120, 200),
}
#: Background colours: neutrals, so that no shape colour is ever close to its background.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "cross")
#: Position name -> centre as a fraction of the image side (x, y).
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
    "center": (0.5, 0.5),
}
#: Size name -> radius (half the bounding extent) as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.15, "large": 0.22}

#: Colour/shape pairs that never appear in training: every colour and every shape is held out at least once.
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {
        ("red", "star"),
        ("green", "ring"),
        ("blue", "triangle"),
        ("yellow", "cross"),
        ("purple", "circle"),
        ("orange", "square"),
        ("cyan", "star"),
        ("pink", "triangle"),
    }
)


@dataclass(frozen=True)
class ShapeSpec:
    colour: str
    shape: str
    position: str
    size: str

    def phrase(self) -> str:
        where = "in the center" if self.position == "center" else f"at the {self.position}"
        return f"a {self.size} {self.colour} {self.shape} {where}"


@dataclass(frozen=True)
class Scene:
    shapes: tuple[ShapeSpec, ...]
    background: str

    def caption(self) -> str:
        return " and ".join(s.phrase() for s in self.shapes) + f" on a {self.background} background"


def shape_mask(shape: str, cx: float, cy: float, r: float, angle: float, n: int) -> np.ndarray:
    """Boolean mask (n x n) of ``shape`` centred at (cx, cy) with extent radius ``r`` (pixel units of n)."""
    ys, xs = np.mgrid[0:n, 0:n].astype(np.float64) + 0.5
    dx, dy = xs - cx, ys - cy
    ca, sa = math.cos(angle), math.sin(angle)
    u, v = ca * dx + sa * dy, -sa * dx + ca * dy
    if shape == "circle":
        return u * u + v * v <= r * r
    if shape == "ring":
        d2 = u * u + v * v
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if shape == "square":
        s = r * 0.85
        return (np.abs(u) <= s) & (np.abs(v) <= s)
    if shape == "cross":
        w = r * 0.33
        return ((np.abs(u) <= w) & (np.abs(v) <= r)) | ((np.abs(v) <= w) & (np.abs(u) <= r))
    if shape == "triangle":
        # Upward equilateral triangle inscribed in the circle of radius r (centroid at the centre).
        return _polygon_mask(u, v, [(r * math.cos(a), r * math.sin(a)) for a in _angles(3, -math.pi / 2)])
    if shape == "star":
        pts = []
        for i, a in enumerate(_angles(10, -math.pi / 2)):
            rad = r if i % 2 == 0 else 0.45 * r
            pts.append((rad * math.cos(a), rad * math.sin(a)))
        return _star_mask(u, v, pts)
    raise ValueError(f"unknown shape {shape!r}")


def _angles(k: int, start: float) -> list[float]:
    return [start + 2 * math.pi * i / k for i in range(k)]


def _polygon_mask(u: np.ndarray, v: np.ndarray, pts: list[tuple[float, float]]) -> np.ndarray:
    """Convex polygon (counter-clockwise in image coordinates, y down) as the intersection of half-planes."""
    inside = np.ones(u.shape, dtype=bool)
    k = len(pts)
    for i in range(k):
        (x0, y0), (x1, y1) = pts[i], pts[(i + 1) % k]
        inside &= (x1 - x0) * (v - y0) - (y1 - y0) * (u - x0) >= 0
    return inside


def _star_mask(u: np.ndarray, v: np.ndarray, pts: list[tuple[float, float]]) -> np.ndarray:
    """Star polygon = union of the triangles (centre, p_i, p_{i+1})."""
    out = np.zeros(u.shape, dtype=bool)
    k = len(pts)
    for i in range(k):
        tri = [(0.0, 0.0), pts[i], pts[(i + 1) % k]]
        a, b, c = tri
        if (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0]) < 0:
            tri = [a, c, b]
        out |= _polygon_mask(u, v, tri)
    return out


@dataclass(frozen=True)
class Placement:
    cx: float
    cy: float
    radius: float
    angle: float


def place(spec: ShapeSpec, rng: np.random.Generator, jitter: bool = True) -> Placement:
    """Centre, radius and rotation (pixels of the output image) with small random jitter."""
    fx, fy = POSITIONS[spec.position]
    r = SIZES[spec.size] * IMAGE_SIZE
    if jitter:
        jx, jy = rng.uniform(-3.0, 3.0, size=2)
        r *= rng.uniform(0.92, 1.08)
        angle = rng.uniform(-0.2, 0.2) if spec.shape not in ("circle", "ring") else 0.0
    else:
        jx = jy = 0.0
        angle = 0.0
    return Placement(fx * IMAGE_SIZE + jx, fy * IMAGE_SIZE + jy, r, angle)


def shape_coverage(shape: str, placement: Placement, size: int = IMAGE_SIZE) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of one shape on a ``size`` x ``size`` grid."""
    n = size * _SUPERSAMPLE
    scale = n / IMAGE_SIZE
    mask = shape_mask(shape, placement.cx * scale, placement.cy * scale, placement.radius * scale, placement.angle, n)
    return mask.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3))


def render(scene: Scene, rng: np.random.Generator, jitter: bool = True) -> np.ndarray:
    """The scene as a (64, 64, 3) uint8 RGB image."""
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float64)
    img[:] = BACKGROUNDS[scene.background]
    for spec in scene.shapes:
        cov = shape_coverage(spec.shape, place(spec, rng, jitter))[..., None]
        img = img * (1.0 - cov) + np.asarray(COLOURS[spec.colour], dtype=np.float64) * cov
    return np.clip(img.round(), 0, 255).astype(np.uint8)


def _pick(rng: np.random.Generator, items):
    items = list(items)
    return items[int(rng.integers(len(items)))]


def _random_spec(rng: np.random.Generator, held_out: bool, position: str | None = None) -> ShapeSpec:
    while True:
        colour, shape = _pick(rng, COLOURS), _pick(rng, SHAPES)
        if ((colour, shape) in HELD_OUT_PAIRS) == held_out:
            break
    return ShapeSpec(colour, shape, position or _pick(rng, POSITIONS), _pick(rng, SIZES))


def training_scene(index: int, seed: int = 0, two_shape_fraction: float = 0.2) -> tuple[Scene, np.ndarray]:
    """Training example ``index``: a scene with no held-out pair, and its image. Deterministic."""
    rng = np.random.default_rng([seed, index])
    if rng.random() < two_shape_fraction:
        # Two shapes in different corners so that they never overlap.
        corners = [p for p in POSITIONS if p != "center"]
        a = _pick(rng, corners)
        b = _pick(rng, [p for p in corners if p != a])
        specs = (_random_spec(rng, False, a), _random_spec(rng, False, b))
        specs = tuple(ShapeSpec(s.colour, s.shape, s.position, "small") for s in specs)
    else:
        specs = (_random_spec(rng, False),)
    scene = Scene(specs, _pick(rng, BACKGROUNDS))
    return scene, render(scene, rng)


def held_out_scenes() -> list[Scene]:
    """Every single-shape scene that uses a held-out colour/shape pair (8 x 5 x 2 x 3 = 240), in a fixed order."""
    out = []
    for colour, shape in sorted(HELD_OUT_PAIRS):
        for position in POSITIONS:
            for size in SIZES:
                for background in BACKGROUNDS:
                    out.append(Scene((ShapeSpec(colour, shape, position, size),), background))
    return out


def vocabulary_words() -> list[str]:
    """Every word a caption can contain."""
    words = {"a", "at", "the", "in", "on", "and", "background"}
    for name in [*COLOURS, *BACKGROUNDS, *SHAPES, *SIZES, *POSITIONS]:
        words.update(name.split())
    return sorted(words)
