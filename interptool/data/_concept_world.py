"""``builtin:concept-world``: a procedurally drawn image set with Broden-format annotation.

Every image shows one main shape (its class) on a scene background, with up to two small
distractor shapes in front of or behind it. Colours, shapes, object parts and textures are
annotated per pixel, the scene per image, all derived from the very boolean maps used to
paint the pixels, so the masks agree with the drawing by construction. See docs/data.md.

Determinism: image ``i`` of split ``s`` is drawn from ``numpy.random.default_rng([seed,
SPLIT_CODE[s], i])`` only, so the same parameters give byte-identical files, a smaller ``n``
gives a prefix of a larger one, and the splits never share an image.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from interptool.errors import DataError

# Generator versions: 1 (the original 10-class set, byte-identical to what it always was, so
# old caches and the weights trained on it stay reachable with ``version=1``) and 2 (12
# classes in 4 superclasses, texture regions, 16 scenes; docs/data.md). The default (what a
# spec or call without a version gets) is 2. Before it was, caches recorded unversioned specs
# meaning version 1; data sets now record their spec with the version written out
# (``interptool.data._spec.canonical_spec``), and an unversioned spec read back from a file is
# taken as version 1 (``recorded_spec``), so no old cache is silently reread as version 2.
DEFAULT_VERSION = 2
LATEST_VERSION = 2
GENERATOR_VERSION = LATEST_VERSION  # the newest version (name kept for old imports)

# The 10 classes (main shape), listed by similarity group: round, polygons, pointed.
CLASSES = ["circle", "ellipse", "ring", "hexagon", "square", "rectangle", "diamond",
           "triangle", "star", "cross"]
# Groups of visually similar classes (the "dark knowledge" a teacher's logits can carry).
SIMILAR_GROUPS = [["circle", "ellipse", "ring", "hexagon"], ["square", "rectangle", "diamond"],
                  ["triangle", "star", "cross"]]

# The 11 colour names of Broden's colour category, with the RGB used to paint them.
COLORS: dict[str, tuple[int, int, int]] = {
    "black": (30, 30, 30), "blue": (40, 70, 215), "brown": (125, 75, 30), "gray": (128, 128, 128),
    "green": (35, 165, 50), "orange": (245, 140, 20), "pink": (245, 145, 195),
    "purple": (130, 45, 175), "red": (205, 30, 30), "white": (240, 240, 240),
    "yellow": (240, 220, 40),
}
SCENES = ["sky", "grass", "water", "wall", "sand"]
# The colour label given to background pixels of each scene.
SCENE_COLOR = {"sky": "blue", "grass": "green", "water": "blue", "wall": "gray", "sand": "brown"}
TEXTURES = ["plain", "stripes", "dots", "checker"]
# part mask file 1 (exclusive): rim (outline, drawn darker/lighter), else arm/hub for star and
# cross, else body.  part mask file 2: top-half / bottom-half (image-up, about the centre).
PARTS = ["rim", "body", "arm", "hub", "top-half", "bottom-half"]
CATEGORIES = ["color", "object", "part", "texture", "scene"]
SPLITS = {"train": 1, "eval": 2, "probe": 3}
SPLIT_CODE = SPLITS

# Mixing weights toward the contrast colour (black for light colours, white for dark ones):
# pattern pixels of a texture and rim pixels. Pixel = (1 - t) * base + t * contrast.
PATTERN_MIX = 0.4
RIM_MIX = 0.65
NOISE_STD = 6.0
# Class <-> scene / colour correlation (partial, so neither is a shortcut).
P_PREFERRED_SCENE = 0.4
P_PREFERRED_COLOR = 0.3
PREFERRED_SCENE = {c: SCENES[k % len(SCENES)] for k, c in enumerate(CLASSES)}
PREFERRED_COLOR = {c: ["red", "orange", "yellow", "purple", "pink", "white", "black", "red",
                       "yellow", "white"][k] for k, c in enumerate(CLASSES)}


def _label_numbers() -> tuple[list[tuple[int, str, str]], dict[tuple[str, str], int]]:
    """Fixed label numbering: (number, name, category) in category order, starting at 1."""
    rows: list[tuple[int, str, str]] = []
    lookup: dict[tuple[str, str], int] = {}
    names = {"color": list(COLORS), "object": CLASSES, "part": PARTS, "texture": TEXTURES,
             "scene": SCENES}
    num = 1
    for cat in CATEGORIES:
        for name in names[cat]:
            rows.append((num, name, cat))
            lookup[(cat, name)] = num
            num += 1
    return rows, lookup


LABELS, LABEL_NUMBER = _label_numbers()
DEFAULTS = {"n": 1000, "size": 64, "seed": 0, "split": "probe", "version": DEFAULT_VERSION}


# --------------------------------------------------------------------------- geometry
@dataclass
class Shape:
    """One drawn object (all lengths in pixels of the full-size image)."""

    kind: str
    cx: float
    cy: float
    radius: float
    angle: float
    aspect: float
    color: str
    texture: str
    outlined: bool


def _box(u: np.ndarray, v: np.ndarray, a: float, b: float) -> np.ndarray:
    qx, qy = np.abs(u) - a, np.abs(v) - b
    outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
    return outside + np.minimum(np.maximum(qx, qy), 0)


def _polygon(u: np.ndarray, v: np.ndarray, k: int, circumradius: float) -> np.ndarray:
    r = np.hypot(u, v)
    sector = 2 * math.pi / k
    phi = np.mod(np.arctan2(v, u) + sector / 2, sector) - sector / 2
    return r * np.cos(phi) - circumradius * math.cos(math.pi / k)


def _star(u: np.ndarray, v: np.ndarray, outer: float, inner: float) -> np.ndarray:
    """Signed distance to the edge of a 5-point star (exact inside, folded by symmetry)."""
    sector = 2 * math.pi / 5
    r = np.hypot(u, v)
    phi = np.mod(np.arctan2(v, u), sector)
    phi = np.minimum(phi, sector - phi)
    ox, oy = outer, 0.0
    ix, iy = inner * math.cos(sector / 2), inner * math.sin(sector / 2)
    dx, dy = ix - ox, iy - oy
    norm = math.hypot(dx, dy)
    px, py = r * np.cos(phi), r * np.sin(phi)
    s = (dx * (py - oy) - dy * (px - ox)) / norm  # > 0 on the centre's side of the edge
    return -s


def shape_field(shape: Shape, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Signed distance (negative inside) and sub-part map (0 body, 1 arm, 2 hub) of a shape."""
    c, s = math.cos(shape.angle), math.sin(shape.angle)
    dx, dy = x - shape.cx, y - shape.cy
    u, v = c * dx + s * dy, -s * dx + c * dy
    R, asp = shape.radius, shape.aspect
    sub = np.zeros(x.shape, dtype=np.int8)
    k = shape.kind
    if k == "circle":
        d = np.hypot(u, v) - R
    elif k == "ellipse":
        a, b = R * math.sqrt(asp), R / math.sqrt(asp)
        d = (np.hypot(u / a, v / b) - 1) * b
    elif k == "ring":
        t = 0.4 * R
        d = np.abs(np.hypot(u, v) - (R - t / 2)) - t / 2
    elif k == "hexagon":
        d = _polygon(u, v, 6, R)
    elif k == "square":
        d = _box(u, v, 0.82 * R, 0.82 * R)
    elif k == "rectangle":
        h = 0.82 * R
        d = _box(u, v, h * math.sqrt(asp), h / math.sqrt(asp))
    elif k == "diamond":
        a, b = 1.05 * R * math.sqrt(asp), 1.05 * R / math.sqrt(asp)
        d = (np.abs(u) / a + np.abs(v) / b - 1) / math.sqrt(1 / a**2 + 1 / b**2)
    elif k == "triangle":
        d = _polygon(u, v, 3, 1.15 * R)
    elif k == "star":
        outer, inner = 1.15 * R, 0.5 * R
        d = _star(u, v, outer, inner)
        sub = np.where(np.hypot(u, v) < 0.85 * inner, 2, 1).astype(np.int8)
    elif k == "cross":
        arm, half = 1.0 * R, 0.32 * R
        d = np.minimum(_box(u, v, arm, half), _box(u, v, half, arm))
        sub = np.where((np.abs(u) < half) & (np.abs(v) < half), 2, 1).astype(np.int8)
    else:  # pragma: no cover - kinds come from CLASSES
        raise ValueError(k)
    return d, sub


def texture_pattern(shape: Shape, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Boolean map of a shape's texture 'ink' (in the shape's own rotated frame)."""
    if shape.texture == "plain":
        return np.zeros(x.shape, dtype=bool)
    c, s = math.cos(shape.angle), math.sin(shape.angle)
    dx, dy = x - shape.cx, y - shape.cy
    u, v = c * dx + s * dy, -s * dx + c * dy
    p = max(3.0, 0.45 * shape.radius)
    if shape.texture == "stripes":
        return np.floor(u / p).astype(np.int64) % 2 == 0
    if shape.texture == "checker":
        return (np.floor(u / p).astype(np.int64) + np.floor(v / p).astype(np.int64)) % 2 == 0
    # dots: distance to the nearest grid point
    fu, fv = u / p - np.round(u / p), v / p - np.round(v / p)
    return np.hypot(fu, fv) < 0.3


def contrast_rgb(color: str) -> np.ndarray:
    r, g, b = COLORS[color]
    lum = 0.299 * r + 0.587 * g + 0.114 * b
    return np.array((0.0, 0.0, 0.0) if lum > 100 else (255.0, 255.0, 255.0))


def shade(color: str, mix: float) -> np.ndarray:
    """RGB of ``color`` mixed toward its contrast colour by ``mix`` (0 = the pure colour)."""
    base = np.array(COLORS[color], dtype=np.float64)
    return (1 - mix) * base + mix * contrast_rgb(color)


# ------------------------------------------------------------------------- backgrounds
def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Values in [-1, 1] interpolated bilinearly from a (cells+1)^2 random grid."""
    grid = rng.uniform(-1, 1, size=(cells + 1, cells + 1))
    t = (np.arange(size) + 0.5) * cells / size
    i0 = np.minimum(np.floor(t).astype(int), cells - 1)
    f = t - i0
    rows = grid[i0] * (1 - f)[:, None] + grid[i0 + 1] * f[:, None]
    return rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]


def _background(scene: str, rng: np.random.Generator, size: int,
                x: np.ndarray, y: np.ndarray) -> np.ndarray:
    t = y / size
    if scene == "sky":
        top, bottom = np.array((150, 190, 245.0)), np.array((60, 110, 215.0))
        img = (1 - t)[..., None] * top + t[..., None] * bottom
        cloud = np.clip(_smooth_noise(rng, size, 3), 0, None)[..., None]
        img = img + 60 * cloud * np.array((1.0, 0.8, 0.3))
    elif scene == "grass":
        base = np.array((55, 135, 45.0))
        blades = np.sin(x * 1.7 + 3 * _smooth_noise(rng, size, 6))[..., None]
        img = base + 18 * blades * np.array((0.3, 1.0, 0.3))
        img = img + rng.normal(0, 10, size=(size, size, 1)) * np.array((0.5, 1.0, 0.5))
    elif scene == "water":
        base = np.array((35, 85, 160.0))
        period = size / rng.uniform(4, 7)
        phase = rng.uniform(0, 2 * math.pi)
        wave = np.sin(2 * math.pi * (y / period + 0.25 * np.sin(2 * math.pi * x / (1.7 * period)))
                      + phase)
        img = base + 28 * wave[..., None] * np.array((0.5, 0.7, 1.0))
    elif scene == "wall":
        base = np.array((165, 158, 150.0))
        bh = max(4, size // 8)
        bw = 2 * bh
        row = np.floor(y / bh).astype(int)
        offset = (row % 2) * (bw // 2)
        mortar = (np.mod(y, bh) < 1.0) | (np.mod(x + offset, bw) < 1.0)
        img = np.broadcast_to(base, (size, size, 3)).copy()
        img[mortar] = (200, 195, 188)
        img = img + 8 * _smooth_noise(rng, size, 4)[..., None]
    elif scene == "sand":
        base = np.array((190, 150, 95.0))
        img = base + 18 * _smooth_noise(rng, size, 3)[..., None]
        img = img + rng.normal(0, 9, size=(size, size, 1))
    else:  # pragma: no cover
        raise ValueError(scene)
    return img


# ------------------------------------------------------------------------------ scene
def _pick_color(rng: np.random.Generator, avoid: str, preferred: str | None) -> str:
    names = list(COLORS)
    if preferred is not None and preferred != avoid and rng.random() < P_PREFERRED_COLOR:
        return preferred
    while True:
        c = names[int(rng.integers(len(names)))]
        if c != avoid:  # an object painted in the background's colour could be invisible
            return c


def _random_shape(rng: np.random.Generator, kind: str, radius: float, cx: float, cy: float,
                  color: str) -> Shape:
    return Shape(
        kind=kind, cx=cx, cy=cy, radius=radius,
        angle=float(rng.uniform(0, 2 * math.pi)),
        aspect=float(rng.uniform(1.5, 1.95)),
        color=color,
        texture=TEXTURES[int(rng.integers(len(TEXTURES)))],
        outlined=bool(rng.random() < 0.5),
    )


def sample_scene(index: int, size: int, seed: int, split: str) -> dict[str, Any]:
    """Random choices of image ``index``: class, scene, shapes in drawing order."""
    rng = np.random.default_rng([seed, SPLITS[split], index])
    label = int(rng.integers(len(CLASSES)))
    cls = CLASSES[label]
    if rng.random() < P_PREFERRED_SCENE:
        scene = PREFERRED_SCENE[cls]
    else:
        scene = SCENES[int(rng.integers(len(SCENES)))]
    bg_color = SCENE_COLOR[scene]
    radius = size * float(rng.uniform(0.19, 0.3))
    margin = 0.85 * radius
    cx, cy = (float(rng.uniform(margin, size - margin)) for _ in range(2))
    main = _random_shape(rng, cls, radius, cx, cy, _pick_color(rng, bg_color, PREFERRED_COLOR[cls]))
    behind, front = [], []
    for _ in range(int(rng.choice(3, p=[0.35, 0.4, 0.25]))):
        kind = CLASSES[int(rng.integers(len(CLASSES)))]
        r = size * float(rng.uniform(0.07, 0.12))
        dx, dy = (float(rng.uniform(r * 0.5, size - r * 0.5)) for _ in range(2))
        d = _random_shape(rng, kind, r, dx, dy, _pick_color(rng, bg_color, None))
        (front if rng.random() < 0.5 else behind).append(d)
    return {"rng": rng, "label": label, "scene": scene, "shapes": behind + [main] + front,
            "main": len(behind)}


def render(index: int, size: int = 64, seed: int = 0, split: str = "probe") -> dict[str, Any]:
    """Draw image ``index``: returns the clean and noisy images and full-size label maps.

    Keys: ``image`` (uint8 HxWx3, what is saved), ``clean`` (float, before noise), ``label``,
    ``scene``, ``shapes`` (list of :class:`Shape`, drawing order), ``main`` (its position),
    ``maps``: dict of int64 HxW label-number maps ``color``, ``object``, ``part_1``,
    ``part_2``, ``texture``, plus ``owner`` (index of the shape owning a pixel, -1 background),
    ``pattern`` and ``rim`` (bool) describing how each object pixel was painted.
    """
    info = sample_scene(index, size, seed, split)
    rng: np.random.Generator = info["rng"]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5  # pixel centres
    img = _background(info["scene"], rng, size, xx, yy)
    L = LABEL_NUMBER
    maps = {
        "color": np.full((size, size), L[("color", SCENE_COLOR[info["scene"]])], dtype=np.int64),
        "object": np.zeros((size, size), dtype=np.int64),
        "part_1": np.zeros((size, size), dtype=np.int64),
        "part_2": np.zeros((size, size), dtype=np.int64),
        "texture": np.zeros((size, size), dtype=np.int64),
        "owner": np.full((size, size), -1, dtype=np.int64),
        "pattern": np.zeros((size, size), dtype=bool),
        "rim": np.zeros((size, size), dtype=bool),
    }
    part_lut = np.array([L[("part", "body")], L[("part", "arm")], L[("part", "hub")]])
    for k, sh in enumerate(info["shapes"]):
        # Work on the shape's bounding box only: distractors are small, so this is most of
        # the speed. The extent bounds every shape kind (largest: diamond at aspect 2).
        ext = 1.55 * sh.radius + 2
        y0, y1 = max(0, int(sh.cy - ext)), min(size, int(math.ceil(sh.cy + ext)))
        x0, x1 = max(0, int(sh.cx - ext)), min(size, int(math.ceil(sh.cx + ext)))
        if y0 >= y1 or x0 >= x1:
            continue
        box = (slice(y0, y1), slice(x0, x1))
        bx, by = xx[box], yy[box]
        d, sub = shape_field(sh, bx, by)
        inside = d < 0
        if not inside.any():
            continue
        width = max(1.0, 0.16 * sh.radius)
        rim = inside & (d > -width) if sh.outlined else np.zeros_like(inside)
        pattern = inside & texture_pattern(sh, bx, by) & ~rim
        colour = np.where(pattern[..., None], shade(sh.color, PATTERN_MIX), shade(sh.color, 0.0))
        colour = np.where(rim[..., None], shade(sh.color, RIM_MIX), colour)
        img[box] = np.where(inside[..., None], colour, img[box])
        part1 = np.where(rim, L[("part", "rim")], part_lut[sub])
        part2 = np.where(by < sh.cy, L[("part", "top-half")], L[("part", "bottom-half")])
        for key, value in (("color", L[("color", sh.color)]), ("object", L[("object", sh.kind)]),
                           ("part_1", part1), ("part_2", part2),
                           ("texture", L[("texture", sh.texture)]), ("owner", k),
                           ("pattern", pattern), ("rim", rim)):
            view = maps[key][box]
            view[inside] = value[inside] if isinstance(value, np.ndarray) else value
    clean = img
    noisy = clean + rng.normal(0, NOISE_STD, size=clean.shape)
    image = np.clip(np.round(noisy), 0, 255).astype(np.uint8)
    return {"image": image, "clean": clean, "label": info["label"], "scene": info["scene"],
            "shapes": info["shapes"], "main": info["main"], "maps": maps}


def seg_indices(size: int, seg: int) -> np.ndarray:
    """Full-size pixel sampled for each segmentation cell (PIL 'nearest' convention)."""
    return np.minimum(np.floor((np.arange(seg) + 0.5) * size / seg).astype(int), size - 1)


# ====================================================================== version 2
# Version 2 (the default) keeps version 1's painting rules and Broden layout but
# redefines the classes by concepts with a graded similarity structure, adds pixel-level
# texture regions (no texture label on plain objects) and 16 scenes. Its tables and drawing
# code are separate from version 1's so that version 1 stays byte-identical for old caches.

# 12 classes in 4 superclasses of 3; class name = the main object's shape (the object label).
SUPERCLASSES_V2: dict[str, list[str]] = {
    "round": ["circle", "ellipse", "ring"],
    "boxy": ["square", "rectangle", "diamond"],
    "pointed": ["triangle", "star", "cross"],
    "faceted": ["hexagon", "pentagon", "semicircle"],
}
CLASSES_V2 = [c for members in SUPERCLASSES_V2.values() for c in members]
SUPERCLASS_OF_V2 = {c: s for s, members in SUPERCLASSES_V2.items() for c in members}
# Each superclass prefers 4 of the 16 scenes (siblings share them; see SCENE_COLOR_V2 for the
# colour label of the background pixels).
SUPER_SCENES_V2: dict[str, list[str]] = {
    "round": ["sky", "sunset", "night", "fog"],
    "boxy": ["wall", "brick", "snow", "tiles"],
    "pointed": ["grass", "forest", "field", "mud"],
    "faceted": ["water", "lagoon", "sand", "rock"],
}
SCENES_V2 = [s for members in SUPER_SCENES_V2.values() for s in members]
SCENE_COLOR_V2 = {
    "sky": "blue", "sunset": "orange", "night": "black", "fog": "white",
    "wall": "gray", "brick": "red", "snow": "white", "tiles": "yellow",
    "grass": "green", "forest": "green", "field": "yellow", "mud": "brown",
    "water": "blue", "lagoon": "green", "sand": "brown", "rock": "gray",
}
# Colour palette of each superclass: its k-th colour is the preferred colour of its k-th class.
# Siblings thus differ in colour, and every colour but pink, blue, white and black is preferred
# by two classes of different superclasses (a weaker, "cousin" similarity).
PALETTES_V2: dict[str, list[str]] = {
    "round": ["yellow", "white", "red"],
    "boxy": ["blue", "purple", "orange"],
    "pointed": ["red", "pink", "orange"],
    "faceted": ["yellow", "black", "purple"],
}
CLASS_COLOR_V2 = {c: PALETTES_V2[s][k] for s, members in SUPERCLASSES_V2.items()
                  for k, c in enumerate(members)}
TEXTURES_V2 = ["stripes", "dots", "checker", "zigzag", "grid"]
# Each class has a preferred texture; each texture is preferred by 2-3 classes of different
# superclasses (cousins).
CLASS_TEXTURE_V2 = {
    "circle": "dots", "ellipse": "stripes", "ring": "checker",
    "square": "checker", "rectangle": "stripes", "diamond": "grid",
    "triangle": "zigzag", "star": "dots", "cross": "grid",
    "hexagon": "zigzag", "pentagon": "stripes", "semicircle": "dots",
}
# "plain" objects are drawn without a pattern and carry no texture label.
TEXTURE_CHOICES_V2 = [*TEXTURES_V2, "plain"]
P_SUPER_SCENE_V2 = 0.75   # else uniform over all 16 scenes
P_CLASS_COLOR_V2 = 0.8    # else (or when it is the background's) any colour but the background's
P_CLASS_TEXTURE_V2 = 0.8  # else uniform over the 5 textures and plain
CATEGORIES_V2 = CATEGORIES


def _label_numbers_v2() -> tuple[list[tuple[int, str, str]], dict[tuple[str, str], int]]:
    """Version 2 numbering: (number, name, category) in category order, starting at 1."""
    rows: list[tuple[int, str, str]] = []
    lookup: dict[tuple[str, str], int] = {}
    names = {"color": list(COLORS), "object": CLASSES_V2, "part": PARTS,
             "texture": TEXTURES_V2, "scene": SCENES_V2}
    num = 1
    for cat in CATEGORIES_V2:
        for name in names[cat]:
            rows.append((num, name, cat))
            lookup[(cat, name)] = num
            num += 1
    return rows, lookup


LABELS_V2, LABEL_NUMBER_V2 = _label_numbers_v2()


def class_similarity_v2() -> np.ndarray:
    """The documented concept overlap between classes (12 x 12, symmetric, diagonal 1).

    Score = (same superclass: shared scene set and shape family, 3 points) + (same preferred
    texture, 1 point) + (same preferred colour, 1 point), divided by 5: siblings score 0.6,
    cousins sharing a texture or a colour 0.2 (diamond and cross share both: 0.4), other
    classes 0. It is the ground truth a teacher's soft labels can be compared with
    (docs/data.md).
    """
    k = len(CLASSES_V2)
    out = np.eye(k)
    for i, a in enumerate(CLASSES_V2):
        for j, b in enumerate(CLASSES_V2):
            if i == j:
                continue
            sa, sb = SUPERCLASS_OF_V2[a], SUPERCLASS_OF_V2[b]
            score = 3.0 * (sa == sb) + 1.0 * (CLASS_TEXTURE_V2[a] == CLASS_TEXTURE_V2[b])
            score += 1.0 * (CLASS_COLOR_V2[a] == CLASS_COLOR_V2[b])
            out[i, j] = score / 5.0
    return out


def shape_field_v2(shape: Shape, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Version 2 shapes: version 1's plus ``pentagon`` and ``semicircle`` (a half disk)."""
    if shape.kind not in ("pentagon", "semicircle"):
        return shape_field(shape, x, y)
    c, s = math.cos(shape.angle), math.sin(shape.angle)
    dx, dy = x - shape.cx, y - shape.cy
    u, v = c * dx + s * dy, -s * dx + c * dy
    R = shape.radius
    if shape.kind == "pentagon":
        d = _polygon(u, v, 5, 1.1 * R)
    else:
        # disk of radius R cut at its diameter; the centre offset 4R/(3 pi) puts the
        # half disk's centroid on (cx, cy)
        off = 4 * R / (3 * math.pi)
        d = np.maximum(np.hypot(u, v - off) - R, v - off)
    return d, np.zeros(x.shape, dtype=np.int8)


def texture_pattern_v2(shape: Shape, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Boolean 'ink' map of a version 2 texture, in the shape's rotated frame."""
    if shape.texture == "plain":
        return np.zeros(x.shape, dtype=bool)
    c, s = math.cos(shape.angle), math.sin(shape.angle)
    dx, dy = x - shape.cx, y - shape.cy
    u, v = c * dx + s * dy, -s * dx + c * dy
    # a period of at least 3 px keeps every pattern resolvable at 32-48 px images
    p = max(3.0, 0.45 * shape.radius)
    if shape.texture == "stripes":
        return np.floor(u / p).astype(np.int64) % 2 == 0
    if shape.texture == "checker":
        return (np.floor(u / p).astype(np.int64) + np.floor(v / p).astype(np.int64)) % 2 == 0
    if shape.texture == "dots":
        fu, fv = u / p - np.round(u / p), v / p - np.round(v / p)
        return np.hypot(fu, fv) < 0.3
    if shape.texture == "zigzag":
        tri = np.abs(np.mod(u / p, 2.0) - 1.0)  # triangle wave of period 2p, amplitude 1
        return np.floor(v / p + tri).astype(np.int64) % 2 == 0
    if shape.texture == "grid":
        q = 1.5 * p
        return (np.mod(u, q) < 0.4 * p) | (np.mod(v, q) < 0.4 * p)
    raise ValueError(shape.texture)  # pragma: no cover - textures come from the tables


def _background_v2(scene: str, rng: np.random.Generator, size: int,
                   x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Version 2 scene backgrounds: version 1's five plus eleven new ones."""
    if scene in ("sky", "grass", "water", "wall", "sand"):
        return _background(scene, rng, size, x, y)
    t = y / size
    if scene == "sunset":
        top, bottom = np.array((250, 175, 95.0)), np.array((235, 110, 60.0))
        img = (1 - t)[..., None] * top + t[..., None] * bottom
        img = img + 40 * np.clip(_smooth_noise(rng, size, 3), 0, None)[..., None] * \
            np.array((0.2, 0.5, 1.0))
    elif scene == "night":
        img = np.array((20, 24, 48.0)) + 8 * _smooth_noise(rng, size, 3)[..., None]
        stars = rng.random((size, size)) < 0.025
        img = img + 170 * stars[..., None]
    elif scene == "fog":
        img = np.array((212, 215, 222.0)) + 22 * _smooth_noise(rng, size, 3)[..., None]
    elif scene in ("brick", "tiles"):
        if scene == "brick":
            base, line, bh = np.array((168, 62, 45.0)), (215, 205, 190), max(4, size // 8)
            bw = 2 * bh
        else:
            base, line, bh = np.array((232, 214, 150.0)), (150, 138, 100), max(4, size // 6)
            bw = bh
        row = np.floor(y / bh).astype(int)
        offset = (row % 2) * (bw // 2) if scene == "brick" else 0
        mortar = (np.mod(y, bh) < 1.0) | (np.mod(x + offset, bw) < 1.0)
        img = np.broadcast_to(base, (size, size, 3)).copy()
        img[mortar] = line
        img = img + 8 * _smooth_noise(rng, size, 4)[..., None]
    elif scene == "snow":
        img = np.array((236, 239, 246.0)) + 10 * _smooth_noise(rng, size, 3)[..., None]
        img = img + rng.normal(0, 6, size=(size, size, 1))
    elif scene == "forest":
        blobs = _smooth_noise(rng, size, 7)[..., None]
        img = np.array((32, 92, 38.0)) + 40 * blobs * np.array((0.4, 1.0, 0.4))
    elif scene == "field":
        blades = np.sin(x * 1.7 + 3 * _smooth_noise(rng, size, 6))[..., None]
        img = np.array((215, 188, 70.0)) + 22 * blades * np.array((1.0, 0.9, 0.3))
    elif scene == "mud":
        img = np.array((105, 72, 42.0)) + 20 * _smooth_noise(rng, size, 4)[..., None]
        img = img + rng.normal(0, 8, size=(size, size, 1))
    elif scene == "lagoon":
        period = size / rng.uniform(4, 7)
        phase = rng.uniform(0, 2 * math.pi)
        wave = np.sin(2 * math.pi * (y / period + 0.25 * np.sin(2 * math.pi * x / (1.7 * period)))
                      + phase)
        img = np.array((40, 165, 130.0)) + 25 * wave[..., None] * np.array((0.5, 1.0, 0.8))
    elif scene == "rock":
        img = np.array((122, 120, 116.0)) + 28 * _smooth_noise(rng, size, 5)[..., None]
        img = img + 12 * _smooth_noise(rng, size, 11)[..., None]
    else:  # pragma: no cover - scenes come from the tables
        raise ValueError(scene)
    return img


def _pick_color_v2(rng: np.random.Generator, avoid: str, preferred: str | None) -> str:
    if preferred is not None and rng.random() < P_CLASS_COLOR_V2 and preferred != avoid:
        return preferred
    choices = [c for c in COLORS if c != avoid]
    return choices[int(rng.integers(len(choices)))]


def _shape_v2(rng: np.random.Generator, kind: str, radius: float, cx: float, cy: float,
              color: str, texture: str) -> Shape:
    return Shape(kind=kind, cx=cx, cy=cy, radius=radius,
                 angle=float(rng.uniform(0, 2 * math.pi)), aspect=float(rng.uniform(1.5, 1.95)),
                 color=color, texture=texture, outlined=bool(rng.random() < 0.5))


def sample_scene_v2(index: int, size: int, seed: int, split: str) -> dict[str, Any]:
    """Random choices of version 2 image ``index`` (its own stream: ``[seed, split, i, 2]``)."""
    rng = np.random.default_rng([seed, SPLITS[split], index, 2])
    label = int(rng.integers(len(CLASSES_V2)))
    cls = CLASSES_V2[label]
    sup = SUPERCLASS_OF_V2[cls]
    if rng.random() < P_SUPER_SCENE_V2:
        scene = SUPER_SCENES_V2[sup][int(rng.integers(len(SUPER_SCENES_V2[sup])))]
    else:
        scene = SCENES_V2[int(rng.integers(len(SCENES_V2)))]
    bg_color = SCENE_COLOR_V2[scene]
    radius = size * float(rng.uniform(0.22, 0.32))
    margin = 0.85 * radius
    cx, cy = (float(rng.uniform(margin, size - margin)) for _ in range(2))
    color = _pick_color_v2(rng, bg_color, CLASS_COLOR_V2[cls])
    if rng.random() < P_CLASS_TEXTURE_V2:
        texture = CLASS_TEXTURE_V2[cls]
    else:
        texture = TEXTURE_CHOICES_V2[int(rng.integers(len(TEXTURE_CHOICES_V2)))]
    main = _shape_v2(rng, cls, radius, cx, cy, color, texture)
    behind, front = [], []
    for _ in range(int(rng.choice(3, p=[0.45, 0.4, 0.15]))):
        kind = CLASSES_V2[int(rng.integers(len(CLASSES_V2)))]
        r = size * float(rng.uniform(0.07, 0.12))
        dx, dy = (float(rng.uniform(r * 0.5, size - r * 0.5)) for _ in range(2))
        tex = TEXTURE_CHOICES_V2[int(rng.integers(len(TEXTURE_CHOICES_V2)))]
        d = _shape_v2(rng, kind, r, dx, dy, _pick_color_v2(rng, bg_color, None), tex)
        (front if rng.random() < 0.5 else behind).append(d)
    return {"rng": rng, "label": label, "scene": scene, "shapes": behind + [main] + front,
            "main": len(behind)}


def render_v2(index: int, size: int = 48, seed: int = 0, split: str = "probe") -> dict[str, Any]:
    """Draw version 2 image ``index``; same keys as :func:`render` (texture 0 on plain objects)."""
    info = sample_scene_v2(index, size, seed, split)
    rng: np.random.Generator = info["rng"]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    img = _background_v2(info["scene"], rng, size, xx, yy)
    L = LABEL_NUMBER_V2
    maps = {
        "color": np.full((size, size), L[("color", SCENE_COLOR_V2[info["scene"]])],
                         dtype=np.int64),
        "object": np.zeros((size, size), dtype=np.int64),
        "part_1": np.zeros((size, size), dtype=np.int64),
        "part_2": np.zeros((size, size), dtype=np.int64),
        "texture": np.zeros((size, size), dtype=np.int64),
        "owner": np.full((size, size), -1, dtype=np.int64),
        "pattern": np.zeros((size, size), dtype=bool),
        "rim": np.zeros((size, size), dtype=bool),
    }
    part_lut = np.array([L[("part", "body")], L[("part", "arm")], L[("part", "hub")]])
    for k, sh in enumerate(info["shapes"]):
        ext = 1.55 * sh.radius + 2  # bounds every kind (semicircle reaches 1.43 r)
        y0, y1 = max(0, int(sh.cy - ext)), min(size, int(math.ceil(sh.cy + ext)))
        x0, x1 = max(0, int(sh.cx - ext)), min(size, int(math.ceil(sh.cx + ext)))
        if y0 >= y1 or x0 >= x1:
            continue
        box = (slice(y0, y1), slice(x0, x1))
        bx, by = xx[box], yy[box]
        d, sub = shape_field_v2(sh, bx, by)
        inside = d < 0
        if not inside.any():
            continue
        width = max(1.0, 0.16 * sh.radius)
        rim = inside & (d > -width) if sh.outlined else np.zeros_like(inside)
        pattern = inside & texture_pattern_v2(sh, bx, by) & ~rim
        colour = np.where(pattern[..., None], shade(sh.color, PATTERN_MIX), shade(sh.color, 0.0))
        colour = np.where(rim[..., None], shade(sh.color, RIM_MIX), colour)
        img[box] = np.where(inside[..., None], colour, img[box])
        part1 = np.where(rim, L[("part", "rim")], part_lut[sub])
        part2 = np.where(by < sh.cy, L[("part", "top-half")], L[("part", "bottom-half")])
        # a texture label marks the whole region of a patterned object (as Broden's texture
        # regions do), not only its ink; a plain object has none
        tex = L[("texture", sh.texture)] if sh.texture != "plain" else 0
        for key, value in (("color", L[("color", sh.color)]), ("object", L[("object", sh.kind)]),
                           ("part_1", part1), ("part_2", part2), ("texture", tex),
                           ("owner", k), ("pattern", pattern), ("rim", rim)):
            view = maps[key][box]
            view[inside] = value[inside] if isinstance(value, np.ndarray) else value
    clean = img
    noisy = clean + rng.normal(0, NOISE_STD, size=clean.shape)
    image = np.clip(np.round(noisy), 0, 255).astype(np.uint8)
    return {"image": image, "clean": clean, "label": info["label"], "scene": info["scene"],
            "shapes": info["shapes"], "main": info["main"], "maps": maps}


@dataclass(frozen=True)
class _Version:
    """What the writer needs from one generator version."""

    classes: list[str]
    labels: list[tuple[int, str, str]]
    label_number: dict[tuple[str, str], int]
    render: Any
    extra_meta: dict[str, Any]


VERSION_TABLES: dict[int, _Version] = {
    1: _Version(CLASSES, LABELS, LABEL_NUMBER, render, {"similar_groups": SIMILAR_GROUPS}),
    2: _Version(CLASSES_V2, LABELS_V2, LABEL_NUMBER_V2, render_v2,
                {"superclasses": SUPERCLASSES_V2, "super_scenes": SUPER_SCENES_V2,
                 "class_color": CLASS_COLOR_V2, "class_texture": CLASS_TEXTURE_V2,
                 "scene_color": SCENE_COLOR_V2}),
}
VERSIONS = tuple(VERSION_TABLES)


# ----------------------------------------------------------------------------- writing
MASK_COLUMNS = {"color": ["color"], "object": ["object"], "part": ["part_1", "part_2"],
                "texture": ["texture"]}


def params_hash(n: int, size: int, seed: int, split: str, version: int = 1) -> str:
    """Folder name of a set in the cache. Version 1's hash is what it always was."""
    blob = json.dumps({"generator": version, "n": n, "size": size, "seed": seed,
                       "split": split}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_root() -> Path:
    """Where generated sets are cached: ``$INTERPTOOL_DATA`` or ``~/.cache/interptool``."""
    base = os.environ.get("INTERPTOOL_DATA")
    return Path(base).expanduser() if base else Path.home() / ".cache" / "interptool"


def validate_params(n: Any, size: Any, seed: Any, split: Any,
                    version: Any = DEFAULT_VERSION) -> tuple[int, int, int, str, int]:
    def as_int(name: str, value: Any, lo: int, hi: int) -> int:
        try:
            iv = int(value)
            # exact comparison (int == float compares exactly): float(value) would round a
            # large integer such as seed=99999999999999999999 and call it "not an integer"
            if not isinstance(value, (int, str)) and iv != value:
                raise ValueError
        except (TypeError, ValueError, OverflowError):
            raise DataError(f"concept-world: {name}={value!r} is not an integer; expected a "
                            f"whole number in {lo}..{hi}") from None
        if not lo <= iv <= hi:
            raise DataError(f"concept-world: {name}={iv} is outside {lo}..{hi}")
        return iv

    n = as_int("n", n, 1, 10_000_000)
    size = as_int("size", size, 16, 1024)
    seed = as_int("seed", seed, 0, 2**63 - 1)
    if split not in SPLITS:
        raise DataError(f"concept-world: split={split!r}; expected one of "
                        f"{', '.join(SPLITS)}")
    version = as_int("version", version, 0, 2**31)
    if version not in VERSION_TABLES:
        raise DataError(f"concept-world: version={version}; expected one of "
                        f"{', '.join(map(str, VERSIONS))} (1 for sets and caches made before "
                        "version 2)")
    return n, size, seed, str(split), version


def _meta(n: int, size: int, seed: int, split: str, version: int) -> dict[str, Any]:
    tables = VERSION_TABLES[version]
    # key order as version 1 always wrote it (its concept_world.json must not change)
    return {
        "format": "interptool-concept-world", "generator": version,
        "params": {"n": n, "size": size, "seed": seed, "split": split},
        "seg_size": size // 2, "classes": tables.classes, **tables.extra_meta,
        "categories": CATEGORIES, "complete": True,
    }


def _is_complete(root: Path, n: int, size: int, seed: int, split: str,
                 version: int) -> bool:
    meta = root / "concept_world.json"
    if not meta.is_file():
        return False
    try:
        data = json.loads(meta.read_text())
    except (OSError, ValueError):
        return False
    return data.get("complete") is True and data.get("generator") == version and \
        data.get("params") == {"n": n, "size": size, "seed": seed, "split": split}


def _write_set(out: Path, n: int, size: int, seed: int, split: str, version: int) -> None:
    from PIL import Image

    from interptool._progress import progress
    from interptool.data._broden import encode_mask

    seg = size // 2
    idx = seg_indices(size, seg)
    sub = f"concept-world/{split}"
    (out / "images" / sub).mkdir(parents=True)
    tables = VERSION_TABLES[version]
    labels_v, number_v = tables.labels, tables.label_number
    n_labels = len(labels_v) + 1
    # per (label, category) image counts and coverage (in whole images), as Broden counts them
    freq = {c: np.zeros(n_labels, dtype=np.int64) for c in CATEGORIES}
    cover = {c: np.zeros(n_labels, dtype=np.float64) for c in CATEGORIES}
    index_rows, label_rows = [], []
    for i in progress(range(n), total=n, desc=f"concept-world {split}", unit="img"):
        r = tables.render(i, size, seed, split)
        stem = f"{sub}/{i:05d}"
        Image.fromarray(r["image"], mode="RGB").save(out / "images" / f"{stem}.png",
                                                     format="PNG", compress_level=1)
        cells = {}
        for cat, keys in MASK_COLUMNS.items():
            files = []
            for key in keys:
                small = r["maps"][key][np.ix_(idx, idx)]
                suffix = key if cat != "part" else f"part_{key[-1]}"
                name = f"{stem}_{suffix}.png"
                Image.fromarray(encode_mask(small), mode="RGB").save(out / "images" / name,
                                                                     format="PNG", compress_level=1)
                files.append(name)
                counts = np.bincount(small.ravel(), minlength=n_labels)
                present = np.nonzero(counts[1:])[0] + 1
                freq[cat][present] += 1
                cover[cat][present] += counts[present] / small.size
            cells[cat] = ";".join(files)
        scene_num = number_v[("scene", r["scene"])]
        freq["scene"][scene_num] += 1
        cover["scene"][scene_num] += 1.0
        cells["scene"] = str(scene_num)
        index_rows.append([f"{stem}.png", split, size, size, seg, seg] +
                          [cells[c] for c in CATEGORIES])
        label_rows.append([f"{stem}.png", r["label"]])
    _write_csv(out / "index.csv", ["image", "split", "ih", "iw", "sh", "sw", *CATEGORIES],
               index_rows)
    _write_csv(out / "labels.csv", ["image", "label"], label_rows)
    (out / "classes.txt").write_text("\n".join(tables.classes) + "\n")
    label_csv, cat_csv = [], []
    for num, name, cat in labels_v:
        label_csv.append([num, name, f"{cat}({freq[cat][num]})", freq[cat][num],
                          f"{cover[cat][num]:f}", ""])
    for cat in CATEGORIES:
        nums = [num for num, _, c in labels_v if c == cat]
        cat_csv.append([cat, min(nums), max(nums), len(nums), int(freq[cat][nums].sum())])
        # dense codes in label-number order (stable across splits and sizes)
        rows = [[code, num, labels_v[num - 1][1], freq[cat][num], f"{cover[cat][num]:f}"]
                for code, num in enumerate(nums, start=1)]
        _write_csv(out / f"c_{cat}.csv", ["code", "number", "name", "frequency", "coverage"],
                   rows)
    _write_csv(out / "label.csv", ["number", "name", "category", "frequency", "coverage",
                                   "syns"], label_csv)
    _write_csv(out / "category.csv", ["name", "first", "last", "count", "frequency"], cat_csv)
    # written last: its presence with complete=true marks a whole set
    (out / "concept_world.json").write_text(json.dumps(_meta(n, size, seed, split, version), indent=1))


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def make_concept_world(
    root: str | os.PathLike | None = None,
    n: int = 1000,
    size: int = 64,
    seed: int = 0,
    split: str = "probe",
    *,
    overwrite: bool = False,
    version: int = DEFAULT_VERSION,
) -> Path:
    """Generate (or reuse) a concept-world set in Broden format and return its folder.

    Args:
        root: output folder; default ``$INTERPTOOL_DATA/concept-world/<param-hash>`` (or
            ``~/.cache/interptool/...``). An existing complete set with the same parameters
            is reused; any other non-empty folder is an error unless ``overwrite``.
        n: number of images. size: image side in pixels (segmentation side is ``size // 2``).
        seed: base seed. split: ``train``, ``eval`` or ``probe`` (disjoint derived seeds).
        version: generator version: 2 (default; 12 classes, docs/data.md) or 1 (the
            original 10-class set, byte-identical to what it always was: same files, same
            cache folder).

    The set is written to a temporary sibling folder and renamed into place, so an
    interrupted or concurrent run never leaves a half-written set that looks whole.
    """
    n, size, seed, split, version = validate_params(n, size, seed, split, version)
    if root is None:
        root = default_root() / "concept-world" / params_hash(n, size, seed, split, version)
    root = Path(root).expanduser()
    if _is_complete(root, n, size, seed, split, version) and not overwrite:
        return root
    if root.exists() and not root.is_dir():
        raise DataError(f"{root} is a file; give a folder for the concept-world set")
    if root.exists() and any(root.iterdir()) and not overwrite:
        raise DataError(
            f"{root} exists and is not a concept-world set with n={n}, size={size}, "
            f"seed={seed}, split={split}, version={version}; choose another folder or pass --overwrite"
        )
    try:
        _generate(root, n, size, seed, split, overwrite, version)
    except OSError as exc:
        raise DataError(
            f"cannot write concept-world to {root}: {exc}; choose a writable folder (--out) "
            "or set $INTERPTOOL_DATA to one"
        ) from None
    return root


def _generate(root: Path, n: int, size: int, seed: int, split: str, overwrite: bool,
              version: int) -> None:
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _write_set(tmp, n, size, seed, split, version)
        if root.exists():
            if overwrite or not any(root.iterdir()):
                old = root.parent / f".{root.name}.old-{uuid.uuid4().hex[:8]}"
                os.rename(root, old)
                shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, root)
        except OSError:
            # another process finished the same set first: keep theirs when it is complete
            if not _is_complete(root, n, size, seed, split, version):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
