"""Procedural `t2i_shapes` scenes: images of 1-2 shapes, captions and attribute labels.

The scene geometry is defined on a 32x32 canvas (`IMAGE_SIZE`); `image_size` renders the
same scene at any multiple of 8 px (the shapes scaled, anti-aliased at that resolution), so
a scene's caption and attributes never depend on its resolution.

Pure numpy, no TFDS: `make_example(seed, split, index)` is a pure function of its arguments,
so any example can be regenerated alone, in any order, on any machine.

Some (shape, colour) pairs (`HELD_OUT`) never appear in train / validation / test; the
`compositional` split holds only scenes with at least one of them, to measure whether a model
composes attributes it has seen separately but never together.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Saturated colours that stay far apart in RGB and readable on black.
COLORS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (255, 40, 40)),
    ("green", (40, 220, 40)),
    ("blue", (50, 90, 255)),
    ("yellow", (255, 230, 0)),
    ("purple", (180, 40, 255)),
    ("cyan", (0, 230, 230)),
)
COLOR_NAMES: tuple[str, ...] = tuple(name for name, _ in COLORS)
COLOR_RGB: np.ndarray = np.array([rgb for _, rgb in COLORS], dtype=np.uint8)
SIZES: tuple[str, ...] = ("small", "large")
# Row-major 3x3 grid: position index = 3 * row + column.
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
RELATIONS: tuple[str, ...] = ("left of", "above")
HELD_OUT: tuple[tuple[str, str], ...] = (
    ("circle", "yellow"),
    ("square", "purple"),
    ("triangle", "cyan"),
)
SPLITS: tuple[str, ...] = ("train", "validation", "test", "compositional")

IMAGE_SIZE = 32  # the canvas the geometry below is measured on, and the default size
SUPERSAMPLE = 4
# Cell centres 7 px from the borders and half-extents <= 7 px: a large shape never clips.
CELL_CENTERS: tuple[float, ...] = (7.0, 16.0, 25.0)
HALF_EXTENT: tuple[float, ...] = (4.0, 7.0)  # indexed by size
MIN_GAP = 1.0  # px of background between two objects, so they stay separable.

# How each position reads after a noun ("a red circle in the top left").
_PLACE: dict[str, str] = {
    "top left": "in the top left",
    "top": "at the top",
    "top right": "in the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "in the bottom left",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right",
}
# {a}: object 1 phrase ("a large red circle"), {b}: object 2 phrase.
ONE_OBJECT_TEMPLATES: tuple[str, ...] = (
    "{a} {place}",
    "there is {a} {place}",
    "{pos}: {a}",
    "{place} there is {a}",
)
TWO_OBJECT_TEMPLATES: tuple[str, ...] = (
    "{a} {forward} {b}",
    "{b} {backward} {a}",
    "there is {a} {forward} {b}",
    "{b} with {a} {beside}",
)
# Relation wording: object 1 is <forward> object 2; object 2 is <backward> object 1.
_RELATION_WORDS: dict[str, dict[str, str]] = {
    "left of": {
        "forward": "to the left of",
        "backward": "to the right of",
        "beside": "to its left",
    },
    "above": {"forward": "above", "backward": "below", "beside": "above it"},
}
ATTRIBUTE_KEYS: tuple[str, ...] = (
    "num_objects",
    "shape",
    "color",
    "size",
    "position",
    "shape2",
    "color2",
    "size2",
    "position2",
    "relation",
    "template",
)

_HELD_OUT_IDS = {(SHAPES.index(s), COLOR_NAMES.index(c)) for s, c in HELD_OUT}


def is_held_out(shape: int, color: int) -> bool:
    """Whether a (shape index, colour index) pair is one of `HELD_OUT`."""
    return (int(shape), int(color)) in _HELD_OUT_IDS


def scene_is_held_out(attributes: dict[str, Any]) -> bool:
    """A scene is held out if any of its objects has a held-out (shape, colour) pair."""
    if is_held_out(attributes["shape"], attributes["color"]):
        return True
    return int(attributes["num_objects"]) == 2 and is_held_out(
        attributes["shape2"], attributes["color2"]
    )


def check_image_size(image_size: int) -> int:
    if not isinstance(image_size, int) or image_size < 8 or image_size % 8:
        raise ValueError(f"t2i_shapes renders at a multiple of 8 px, got {image_size!r}")
    return image_size


@functools.cache  # Only 3 * 2 * 9 distinct masks per size: render each once per process.
def _coverage(shape: int, size: int, position: int, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Anti-aliased coverage in [0, 1], float32 [S, S]: 4x4 supersampling, box-averaged."""
    n = image_size * SUPERSAMPLE
    # Sample points at sub-pixel centres, in canvas units (pixel i of a 32 px image spans
    # [i, i + 1]); at 32 px this is exactly the historical 32 px rendering.
    coords = (np.arange(n, dtype=np.float32) + 0.5) / SUPERSAMPLE
    if image_size != IMAGE_SIZE:
        coords = coords * np.float32(IMAGE_SIZE / image_size)
    y, x = np.meshgrid(coords, coords, indexing="ij")
    row, col = divmod(position, 3)
    dx, dy = x - CELL_CENTERS[col], y - CELL_CENTERS[row]
    r = HALF_EXTENT[size]
    if SHAPES[shape] == "circle":
        inside = dx * dx + dy * dy <= r * r
    elif SHAPES[shape] == "square":
        inside = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    else:  # Upward triangle: apex (0, -r), base from (-r, r) to (r, r); |dx| shrinks upwards.
        inside = (dy <= r) & (2.0 * np.abs(dx) <= dy + r)
    hi = inside.astype(np.float32).reshape(image_size, SUPERSAMPLE, image_size, SUPERSAMPLE)
    coverage = hi.mean(axis=(1, 3))
    coverage.flags.writeable = False  # Shared by the cache.
    return coverage


def render(objects: list[tuple[int, int, int, int]], image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Renders (shape, colour, size, position) objects on black: uint8 [S, S, 3]."""
    image = np.zeros((image_size, image_size, 3), np.float32)
    for shape, color, size, position in objects:
        alpha = _coverage(int(shape), int(size), int(position), image_size)[..., None]
        image = image * (1.0 - alpha) + alpha * COLOR_RGB[color].astype(np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _sample_pair_cells(rng: np.random.Generator, relation: int, size1: int, size2: int):
    """Grid cells (p1, p2) realising the relation, or None if the two objects would touch."""
    lo, hi = sorted(rng.choice(3, size=2, replace=False).tolist())
    other = int(rng.integers(3))
    if RELATIONS[relation] == "left of":  # Same row, object 1 in the smaller column.
        p1, p2 = 3 * other + lo, 3 * other + hi
    else:  # "above": same column, object 1 in the smaller row.
        p1, p2 = 3 * lo + other, 3 * hi + other
    distance = abs(CELL_CENTERS[hi] - CELL_CENTERS[lo])
    if distance < HALF_EXTENT[size1] + HALF_EXTENT[size2] + MIN_GAP:
        return None
    return p1, p2


def _sample_scene(rng: np.random.Generator) -> dict[str, int]:
    """One scene's attributes, ignoring the held-out rule (applied by the caller)."""
    attrs = dict.fromkeys(ATTRIBUTE_KEYS, -1)
    attrs["num_objects"] = int(rng.integers(1, 3))
    attrs["shape"] = int(rng.integers(len(SHAPES)))
    attrs["color"] = int(rng.integers(len(COLORS)))
    attrs["size"] = int(rng.integers(len(SIZES)))
    if attrs["num_objects"] == 1:
        attrs["position"] = int(rng.integers(len(POSITIONS)))
        attrs["template"] = int(rng.integers(len(ONE_OBJECT_TEMPLATES)))
        return attrs
    while True:  # Object 2 must be nameable apart from object 1 and fit beside it.
        shape2, color2 = int(rng.integers(len(SHAPES))), int(rng.integers(len(COLORS)))
        size2, relation = int(rng.integers(len(SIZES))), int(rng.integers(len(RELATIONS)))
        if (shape2, color2) == (attrs["shape"], attrs["color"]):
            continue
        cells = _sample_pair_cells(rng, relation, attrs["size"], size2)
        if cells is not None:
            break
    attrs.update(shape2=shape2, color2=color2, size2=size2, relation=relation)
    attrs["position"], attrs["position2"] = cells
    attrs["template"] = int(rng.integers(len(TWO_OBJECT_TEMPLATES)))
    return attrs


def _phrase(shape: int, color: int, size: int) -> str:
    # Both size words start with a consonant, so "a" is always the right article.
    return f"a {SIZES[size]} {COLOR_NAMES[color]} {SHAPES[shape]}"


def caption(attrs: dict[str, int]) -> str:
    """The caption of a scene, from its attributes (the template is one of them)."""
    a = _phrase(attrs["shape"], attrs["color"], attrs["size"])
    if attrs["num_objects"] == 1:
        pos = POSITIONS[attrs["position"]]
        return ONE_OBJECT_TEMPLATES[attrs["template"]].format(a=a, pos=pos, place=_PLACE[pos])
    b = _phrase(attrs["shape2"], attrs["color2"], attrs["size2"])
    words = _RELATION_WORDS[RELATIONS[attrs["relation"]]]
    return TWO_OBJECT_TEMPLATES[attrs["template"]].format(a=a, b=b, **words)


def make_example(seed: int, split: str, index: int, image_size: int = IMAGE_SIZE) -> dict[str, Any]:
    """Example `index` of `split`: {"image": uint8[S, S, 3], "caption": str, "attributes"}.

    A pure function of (seed, split, index): its own RNG stream, so examples can be made in
    any order or in parallel. Scenes are redrawn until they match the split's held-out rule.
    The scene does not depend on `image_size`, only its rendering does.
    """
    check_image_size(image_size)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    want_held_out = split == "compositional"
    while True:
        attrs = _sample_scene(rng)
        if scene_is_held_out(attrs) == want_held_out:
            break
    objects = [(attrs["shape"], attrs["color"], attrs["size"], attrs["position"])]
    if attrs["num_objects"] == 2:
        objects.append((attrs["shape2"], attrs["color2"], attrs["size2"], attrs["position2"]))
    return {
        "image": render(objects, image_size),
        "caption": caption(attrs),
        "attributes": {k: np.int32(v) for k, v in attrs.items()},
    }
