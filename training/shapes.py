"""Synthetic captioned shapes: the training and evaluation data of the embedded model.

A scene is one shape, or two shapes in a spatial relation, flat-coloured on a plain background of any named
colour, e.g. "a large red circle at the top left on a blue background" or
"a red circle to the left of a blue square on a white background".
Everything is a pure function of an integer seed, so a dataset index always gives the same image and caption.

Held out of training: some (colour, shape) pairs (:data:`HELD_OUT_PAIRS`) anywhere, and some colour pairs
(:data:`HELD_OUT_COLOUR_PAIRS`) as the two objects of a relation; the evaluation prompts use exactly those, so
adherence is measured on combinations the model has not seen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 128
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
#: Background colours: every shape colour plus three neutrals; a background never equals its shapes' colours.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    **COLOURS,
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
#: Relation phrase -> direction from the first-named shape to the second (unit x, y; y down).
RELATIONS: dict[str, tuple[int, int]] = {
    "to the left of": (1, 0),
    "to the right of": (-1, 0),
    "above": (0, 1),
    "below": (0, -1),
}
#: Radius of each shape of a relation scene (no size word: both are drawn alike).
RELATION_RADIUS = 0.16

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
#: Colour pairs never drawn together in a training relation scene (each colour in exactly one pair).
HELD_OUT_COLOUR_PAIRS: frozenset[frozenset[str]] = frozenset(
    frozenset(p) for p in (("red", "cyan"), ("green", "pink"), ("blue", "orange"), ("yellow", "purple"))
)


@dataclass(frozen=True)
class ShapeSpec:
    colour: str
    shape: str
    position: str | None = None  # None in a relation scene, where the relation places the shapes
    size: str | None = None

    def phrase(self) -> str:
        if self.position is None:
            return f"{article(self.colour)} {self.colour} {self.shape}"
        where = "in the center" if self.position == "center" else f"at the {self.position}"
        return f"a {self.size} {self.colour} {self.shape} {where}"


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class Scene:
    shapes: tuple[ShapeSpec, ...]
    background: str
    relation: str | None = None  # how shapes[0] stands to shapes[1], a key of RELATIONS

    def __post_init__(self):
        if self.relation is not None and (len(self.shapes) != 2 or self.relation not in RELATIONS):
            raise ValueError(f"a relation scene has two shapes and one of {sorted(RELATIONS)}")
        if self.background in {s.colour for s in self.shapes}:
            raise ValueError(f"a {self.background} shape on a {self.background} background would be invisible")

    def caption(self) -> str:
        if self.relation is not None:
            a, b = self.shapes
            shapes = f"{a.phrase()} {self.relation} {b.phrase()}"
        else:
            shapes = " and ".join(s.phrase() for s in self.shapes)
        return f"{shapes} on {article(self.background)} {self.background} background"


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


def _angle(shape: str, rng: np.random.Generator, jitter: bool) -> float:
    return rng.uniform(-0.2, 0.2) if jitter and shape not in ("circle", "ring") else 0.0


def place(spec: ShapeSpec, rng: np.random.Generator, jitter: bool = True) -> Placement:
    """Centre, radius and rotation (pixels of the output image) of a positioned shape, with small jitter."""
    fx, fy = POSITIONS[spec.position]
    r = SIZES[spec.size] * IMAGE_SIZE
    if jitter:
        jx, jy = rng.uniform(-0.047, 0.047, size=2) * IMAGE_SIZE
        r *= rng.uniform(0.92, 1.08)
    else:
        jx = jy = 0.0
    return Placement(fx * IMAGE_SIZE + jx, fy * IMAGE_SIZE + jy, r, _angle(spec.shape, rng, jitter))


def place_relation(scene: Scene, rng: np.random.Generator, jitter: bool = True) -> tuple[Placement, Placement]:
    """Where a relation scene's two shapes go: side by side (or one over the other) on a random line across the
    image, far enough apart that they never touch, the first where the relation says."""
    dx, dy = RELATIONS[scene.relation]
    if jitter:
        across = rng.uniform(0.3, 0.7)
        near, far = rng.uniform(0.17, 0.3), rng.uniform(0.7, 0.83)
        radii = rng.uniform(0.92, 1.08, size=2) * RELATION_RADIUS * IMAGE_SIZE
    else:
        across, near, far = 0.5, 0.25, 0.75
        radii = np.full(2, RELATION_RADIUS * IMAGE_SIZE)
    # The first shape is `near` (left or top) when the second lies in +x / +y from it.
    first, second = (near, far) if dx + dy > 0 else (far, near)
    centres = [(f, across) if dx else (across, f) for f in (first, second)]
    return tuple(
        Placement(cx * IMAGE_SIZE, cy * IMAGE_SIZE, float(r), _angle(spec.shape, rng, jitter))
        for (cx, cy), r, spec in zip(centres, radii, scene.shapes)
    )


def shape_coverage(shape: str, placement: Placement, size: int = IMAGE_SIZE) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of one shape on a ``size`` x ``size`` grid."""
    scale = size / IMAGE_SIZE
    cx, cy, r = placement.cx * scale, placement.cy * scale, placement.radius * scale
    # Only the shape's bounding box is supersampled: the same pixels as the whole grid, a fraction of the work.
    x0, y0 = max(0, math.floor(cx - r) - 1), max(0, math.floor(cy - r) - 1)
    x1, y1 = min(size, math.ceil(cx + r) + 1), min(size, math.ceil(cy + r) + 1)
    out = np.zeros((size, size))
    if x1 <= x0 or y1 <= y0:
        return out
    s = _SUPERSAMPLE
    n = max(x1 - x0, y1 - y0) * s
    mask = shape_mask(shape, (cx - x0) * s, (cy - y0) * s, r * s, placement.angle, n)
    w, h = x1 - x0, y1 - y0
    out[y0:y1, x0:x1] = mask[: h * s, : w * s].reshape(h, s, w, s).mean(axis=(1, 3))
    return out


def render(scene: Scene, rng: np.random.Generator, jitter: bool = True) -> np.ndarray:
    """The scene as an (IMAGE_SIZE, IMAGE_SIZE, 3) uint8 RGB image."""
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float64)
    img[:] = BACKGROUNDS[scene.background]
    if scene.relation is not None:
        placements = place_relation(scene, rng, jitter)
    else:
        placements = tuple(place(spec, rng, jitter) for spec in scene.shapes)
    for spec, placement in zip(scene.shapes, placements):
        cov = shape_coverage(spec.shape, placement)[..., None]
        img = img * (1.0 - cov) + np.asarray(COLOURS[spec.colour], dtype=np.float64) * cov
    return np.clip(img.round(), 0, 255).astype(np.uint8)


def _pick(rng: np.random.Generator, items):
    items = list(items)
    return items[int(rng.integers(len(items)))]


def _random_spec(rng: np.random.Generator, held_out: bool, exclude_colours=()) -> tuple[str, str]:
    while True:
        colour, shape = _pick(rng, COLOURS), _pick(rng, SHAPES)
        if ((colour, shape) in HELD_OUT_PAIRS) == held_out and colour not in exclude_colours:
            return colour, shape


def _background(rng: np.random.Generator, colours) -> str:
    return _pick(rng, [b for b in BACKGROUNDS if b not in colours])


def _relation_scene(rng: np.random.Generator, held_out_colours: bool) -> Scene:
    while True:
        a = _random_spec(rng, False)
        b = _random_spec(rng, False, exclude_colours=(a[0],))
        if (frozenset((a[0], b[0])) in HELD_OUT_COLOUR_PAIRS) == held_out_colours:
            break
    relation = _pick(rng, RELATIONS)
    return Scene((ShapeSpec(*a), ShapeSpec(*b)), _background(rng, (a[0], b[0])), relation)


def training_scene(index: int, seed: int = 0, relation_fraction: float = 0.3) -> tuple[Scene, np.ndarray]:
    """Training example ``index``: a scene with no held-out pair, and its image. Deterministic."""
    rng = np.random.default_rng([seed, index])
    if rng.random() < relation_fraction:
        scene = _relation_scene(rng, held_out_colours=False)
    else:
        colour, shape = _random_spec(rng, False)
        spec = ShapeSpec(colour, shape, _pick(rng, POSITIONS), _pick(rng, SIZES))
        scene = Scene((spec,), _background(rng, (colour,)))
    return scene, render(scene, rng)


def held_out_scenes() -> list[Scene]:
    """Single-shape scenes of every held-out colour/shape pair at every position and size (8 x 5 x 2 = 80), each
    on three backgrounds taken in turn from the ten its colour allows: 240 scenes, in a fixed order."""
    out = []
    turn = 0
    for colour, shape in sorted(HELD_OUT_PAIRS):
        allowed = [b for b in BACKGROUNDS if b != colour]
        for position in POSITIONS:
            for size in SIZES:
                for _ in range(3):
                    out.append(Scene((ShapeSpec(colour, shape, position, size),), allowed[turn % len(allowed)]))
                    turn += 1
    return out


def held_out_relation_scenes(n: int = 128) -> list[Scene]:
    """Relation scenes whose two colours were never drawn together in training: every held-out colour pair in
    both orders under every relation, shapes and backgrounds drawn from a fixed seed; ``n`` scenes."""
    rng = np.random.default_rng(20261207)
    combos = [
        (a, b, rel)
        for pair in sorted(sorted(p) for p in HELD_OUT_COLOUR_PAIRS)
        for a, b in (pair, pair[::-1])
        for rel in RELATIONS
    ]
    out = []
    for i in range(n):
        a, b, rel = combos[i % len(combos)]
        shape_a = _pick(rng, [s for s in SHAPES if (a, s) not in HELD_OUT_PAIRS])
        shape_b = _pick(rng, [s for s in SHAPES if (b, s) not in HELD_OUT_PAIRS])
        out.append(Scene((ShapeSpec(a, shape_a), ShapeSpec(b, shape_b)), _background(rng, (a, b)), rel))
    return out


def vocabulary_words() -> list[str]:
    """Every word a caption can contain."""
    words = {"a", "an", "at", "the", "in", "on", "and", "background"}
    for name in [*COLOURS, *BACKGROUNDS, *SHAPES, *SIZES, *POSITIONS, *RELATIONS]:
        words.update(name.split())
    return sorted(words)
