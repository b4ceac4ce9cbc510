"""Procedural scenes for the benchmark: a scene model, a renderer and its exact ground truths.

A `Scene` is a background (colour + pattern), one to three `SceneObject`s (shape, colour, pattern,
size, position, depth, rotation) and an optional style. Everything is drawn for small pictures
(32 x 32 by default, 64 works the same): shapes are chosen to stay recognisable at that size, and
every length is a fraction of the image side so a 64-pixel render is a sharper 32-pixel one.

    sample_scene(rng) ──▶ Scene ──render──▶ RGB image
                              ├──render_edges / render_sketch / render_mask / render_depth
                              └──caption ──▶ "a large red circle on the left on a striped beige background"

Rendering rasterises at 4x the requested size and averages 4x4 blocks, so edges are anti-aliased;
the same 4x raster gives the label map (which part covers most of each output pixel) from which
edges, masks and depth maps are read, so they agree exactly with the picture. Every output is a
pure function of the scene (per-scene noise, such as film grain, is seeded by `Scene.seed`).

Subjects and styles are what text alone does not pin down:

- a *subject* (`SUBJECTS`, 24) is a two-part object: a body (shape, colour, pattern) and a feature
  (a hat, a badge or a pair of ears, in its own shape and colour). Captions name only its kind
  ("a robot"), and four subjects share each kind. The last six are held out for zero-shot tests.
- a *style* (`STYLES`, 8) re-renders the whole picture: a palette remap (tint, saturation or a
  luminance ramp), a texture (grain or hatching), outlines and posterisation. The last two are
  held out; they recombine ingredients of the others (and one brings a new ramp).

Depth scenes (`sample_overlapping_scene`) put two objects of clearly different colours in neighbouring
cells, one partly in front of the other, so that a picture shows which one is nearer.

Positions are named on a 3 x 3 grid (left/center/right x top/middle/bottom); an object's anchor (the
centre of its bounding box) lies well inside its cell, so the cell is never ambiguous.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = [
    "BACKGROUND_COLOURS",
    "BACKGROUND_PATTERNS",
    "CELLS",
    "COLOURS",
    "COLUMNS",
    "FEATURE_PLACEMENTS",
    "HELD_OUT_STYLES",
    "HELD_OUT_SUBJECTS",
    "OBJECT_PATTERNS",
    "ROWS",
    "SEEN_STYLES",
    "SEEN_SUBJECTS",
    "SHAPES",
    "SIZES",
    "STYLES",
    "SUBJECTS",
    "SUBJECT_KINDS",
    "Background",
    "Layout",
    "CAPTION_TEMPLATES",
    "Scene",
    "SceneObject",
    "ScenePalette",
    "Style",
    "Subject",
    "caption",
    "find_placed_phrases",
    "edge_pixels",
    "layout",
    "object_phrase",
    "placed_phrase",
    "overlaps",
    "position_phrase",
    "render",
    "render_background",
    "render_depth",
    "render_edges",
    "render_mask",
    "render_masked",
    "render_sketch",
    "render_style_reference",
    "render_subject_reference",
    "sample_hole",
    "sample_overlapping_scene",
    "sample_scene",
    "scene_palette",
    "style_by_name",
    "style_colours",
    "vary_scene",
]

SUPERSAMPLE = 4

SHAPES = ("circle", "square", "triangle", "cross", "diamond", "ring")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 45, 45),
    "green": (45, 165, 65),
    "blue": (45, 85, 215),
    "yellow": (240, 205, 40),
    "purple": (135, 60, 185),
    "orange": (240, 135, 30),
    "white": (245, 245, 245),
    "black": (30, 30, 30),
}
OBJECT_PATTERNS = ("plain", "striped", "dotted")
# Muted backgrounds, so a saturated object always stands out from at least some of them.
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "beige": (222, 208, 178),
    "light grey": (205, 205, 205),
    "pale blue": (180, 200, 228),
    "pale green": (188, 216, 186),
    "dark grey": (72, 72, 78),
    "navy": (32, 42, 88),
}
BACKGROUND_PATTERNS = ("plain", "stripes", "checker", "gradient")
# Half-extent of a body as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.12, "medium": 0.17, "large": 0.22}
COLUMNS = ("left", "center", "right")
ROWS = ("top", "middle", "bottom")
CELLS = tuple((column, row) for row in ROWS for column in COLUMNS)  # index = 3 * row + column
FEATURE_PLACEMENTS = ("hat", "badge", "ears")
SUBJECT_KINDS = ("robot", "critter", "gadget", "totem", "mascot", "beacon")

# Smallest max-channel difference (0..255) between an object's colours and its background's, after
# the scene's style: below it an object would be hard to see and its ground truth meaningless.
MIN_CONTRAST = 80
_CELL_ANCHORS = (0.25, 0.5, 0.75)
_JITTER = 0.04
_MAX_ROTATION = 15.0  # degrees; more would turn a square into a diamond
_BACKGROUND_SHADE = 30  # the second colour of a background pattern, this far from the first
_OBJECT_SHADE = 0.55    # pattern stripes/dots: the colour darkened to this (black lightened instead)
_BACKGROUND_PERIOD = 0.125
_OBJECT_PERIOD = 0.11
_SUBJECT_SCALE = 0.85   # subjects carry a feature outside the body, so their bodies are smaller
# Overlapping pairs (`sample_overlapping_scene`), measured at 32 x 32: the shared pixels of the two
# silhouettes, and what the farther object keeps in view of its silhouette and of the square around
# its anchor (a quarter of the side across), where its cell is read.
OVERLAP_PIXELS = 8
_FAR_VISIBLE = 0.7
_FAR_ANCHOR_VISIBLE = 0.75
_ANCHOR_WINDOW = 0.25
_OVERLAP_TRIES = 200
# Cells sharing a side: objects anchored in them can overlap while each anchor stays in its cell.
_NEIGHBOUR_CELLS = tuple((a, b) for a in range(9) for b in range(a + 1, 9)
                         if (b - a == 1 and a % 3 != 2) or b - a == 3)
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


# --------------------------------------------------------------------------------------------
# Scene model


@dataclass(frozen=True)
class Background:
    colour: str
    pattern: str = "plain"


@dataclass(frozen=True)
class SceneObject:
    """One object. `position` is the anchor (centre of the bounding box) in [0, 1] image units,
    x to the right and y down; `depth` is the distance in [0, 1] (0 nearest; the background is at
    1); `rotation` is in degrees. A subject instance has `subject` set and its body's shape, colour
    and pattern (see `Subject.instance`)."""

    shape: str
    colour: str
    pattern: str = "plain"
    size: str = "medium"
    position: tuple[float, float] = (0.5, 0.5)
    depth: float = 0.5
    rotation: float = 0.0
    subject: int | None = None

    @property
    def cell(self) -> int:
        """Index into CELLS of the grid cell holding the anchor."""
        column = min(2, max(0, int(self.position[0] * 3)))
        row = min(2, max(0, int(self.position[1] * 3)))
        return 3 * row + column

    @property
    def where(self) -> str:
        return position_phrase(self.cell)


@dataclass(frozen=True)
class Subject:
    """A composite object identified by `id`; `kind` is the only word captions use for it."""

    id: int
    kind: str
    shape: str
    colour: str
    pattern: str
    feature_shape: str
    feature_colour: str
    placement: str

    @property
    def name(self) -> str:
        return f"{self.kind} #{self.id}"

    def instance(self, **pose) -> SceneObject:
        """This subject as a SceneObject; `pose` sets size, position, depth and rotation."""
        return SceneObject(shape=self.shape, colour=self.colour, pattern=self.pattern, subject=self.id, **pose)


@dataclass(frozen=True)
class Style:
    """A whole-image rendering. `palette` is ("tint", multiply, add), ("saturate", k) or
    ("ramp", colours): colours in 0..1, the ramp mapping luminance dark to light. `texture` is
    "none", "grain" or "hatch"; `outline` an RGB colour in 0..1 or None; `posterize` a number of
    levels per channel or None."""

    id: int
    name: str
    palette: tuple
    texture: str = "none"
    outline: tuple[float, float, float] | None = None
    posterize: int | None = None


@dataclass(frozen=True)
class Scene:
    background: Background
    objects: tuple[SceneObject, ...]
    style: str | None = None
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> Scene:
        objects = tuple(
            SceneObject(**{**item, "position": tuple(item["position"])}) for item in data["objects"]
        )
        return cls(Background(**data["background"]), objects, data.get("style"), int(data.get("seed", 0)))


# kind, body shape, body colour, body pattern, feature shape, feature colour, placement.
# Kinds cycle, so the held-out last six hold one subject of every kind. Any two subjects differ in
# at least three of the six visual attributes, and no two share shapes, pattern and placement, so
# a subject stays identifiable when a style repaints its colours (tests/bench/test_scenes.py).
_SUBJECT_TABLE = (
    ("robot", "square", "blue", "plain", "triangle", "yellow", "hat"),
    ("critter", "circle", "orange", "plain", "circle", "black", "ears"),
    ("gadget", "diamond", "green", "striped", "circle", "white", "badge"),
    ("totem", "triangle", "purple", "plain", "square", "orange", "hat"),
    ("mascot", "ring", "red", "plain", "circle", "yellow", "badge"),
    ("beacon", "cross", "yellow", "plain", "circle", "red", "badge"),
    ("robot", "circle", "red", "dotted", "square", "blue", "hat"),
    ("critter", "square", "green", "plain", "triangle", "red", "ears"),
    ("gadget", "triangle", "orange", "striped", "diamond", "blue", "hat"),
    ("totem", "diamond", "blue", "plain", "square", "white", "badge"),
    ("mascot", "circle", "purple", "striped", "triangle", "yellow", "ears"),
    ("beacon", "square", "black", "striped", "circle", "yellow", "badge"),
    ("robot", "triangle", "green", "dotted", "circle", "purple", "hat"),
    ("critter", "ring", "blue", "plain", "triangle", "orange", "ears"),
    ("gadget", "square", "yellow", "striped", "square", "purple", "badge"),
    ("totem", "cross", "red", "plain", "diamond", "green", "hat"),
    ("mascot", "diamond", "orange", "plain", "triangle", "purple", "ears"),
    ("beacon", "circle", "green", "plain", "diamond", "red", "badge"),
    ("robot", "circle", "blue", "striped", "diamond", "orange", "hat"),
    ("critter", "triangle", "red", "striped", "circle", "white", "ears"),
    ("gadget", "ring", "purple", "dotted", "diamond", "yellow", "hat"),
    ("totem", "square", "orange", "dotted", "circle", "blue", "hat"),
    ("mascot", "cross", "green", "dotted", "square", "red", "ears"),
    ("beacon", "diamond", "purple", "striped", "circle", "yellow", "hat"),
)
SUBJECTS: tuple[Subject, ...] = tuple(Subject(i, *row) for i, row in enumerate(_SUBJECT_TABLE))
HELD_OUT_SUBJECTS: tuple[int, ...] = tuple(range(18, 24))
SEEN_SUBJECTS: tuple[int, ...] = tuple(range(18))

_DARK = (0.08, 0.08, 0.1)
STYLES: tuple[Style, ...] = (
    Style(0, "ember", ("tint", (1.12, 0.88, 0.6), (0.06, 0.0, 0.0)), texture="grain"),
    Style(1, "frost", ("tint", (0.7, 0.92, 1.1), (0.0, 0.04, 0.1)), outline=_DARK),
    Style(2, "charcoal", ("ramp", ((0.02, 0.02, 0.02), (1.0, 1.0, 0.97))), texture="hatch"),
    Style(3, "neon", ("ramp", ((0.1, 0.0, 0.25), (0.9, 0.1, 0.7), (0.2, 1.0, 0.95))), posterize=4),
    Style(4, "sepia", ("ramp", ((0.1, 0.05, 0.0), (0.78, 0.6, 0.4), (1.0, 0.97, 0.88))), texture="grain"),
    Style(5, "comic", ("saturate", 1.5), outline=_DARK, posterize=3),
    # Held out: seen ingredients in new combinations, and one new ramp.
    Style(6, "glacier", ("tint", (0.7, 0.92, 1.1), (0.0, 0.04, 0.1)), texture="hatch", posterize=3),
    Style(7, "toxic", ("ramp", ((0.0, 0.08, 0.0), (0.55, 0.85, 0.1), (1.0, 1.0, 0.7))), outline=_DARK),
)
HELD_OUT_STYLES: tuple[str, ...] = ("glacier", "toxic")
SEEN_STYLES: tuple[str, ...] = tuple(s.name for s in STYLES if s.name not in HELD_OUT_STYLES)
_STYLES_BY_NAME = {style.name: style for style in STYLES}


def style_by_name(name: str | Style | None) -> Style | None:
    if name is None or isinstance(name, Style):
        return name
    try:
        return _STYLES_BY_NAME[name]
    except KeyError:
        raise ValueError(f"style: unknown style {name!r}; known styles are {', '.join(_STYLES_BY_NAME)}") from None


def style_colours(style: str | Style | None, colours: np.ndarray) -> np.ndarray:
    """`colours` (..., 3) in 0..255 as the style paints them (palette and posterisation; the
    texture and outline are not colours of their own)."""
    rgb = np.asarray(colours, dtype=np.float32) / 255.0
    style = style_by_name(style)
    if style is not None:
        rgb = _posterize(_palette(style, rgb), style.posterize)
    return np.clip(rgb, 0.0, 1.0) * 255.0


# --------------------------------------------------------------------------------------------
# Sampling


def sample_scene(
    rng: np.random.Generator,
    *,
    num_objects: int | tuple[int, int] = (1, 2),
    subject: int | Subject | Sequence[int | Subject] | None = None,
    style: str | Style | None = None,
) -> Scene:
    """A random scene: `num_objects` (a count, or an inclusive range) objects in distinct cells.

    Given `subject` (one or several), those subjects are among the objects, placed first; the rest
    are plain objects. Colours are chosen to stand out from the background under the style.
    """
    style = style_by_name(style)
    subjects = _as_subjects(subject)
    if isinstance(num_objects, (int, np.integer)):
        count = int(num_objects)
    else:
        low, high = num_objects
        count = int(rng.integers(low, high + 1))
    count = max(count, len(subjects))
    if not 1 <= count <= 3:
        raise ValueError(f"num_objects: expected 1..3 objects, got {count}")
    background = _sample_background(rng, subjects, style)
    specs: list[tuple[str, str, str, int | None]] = [(s.shape, s.colour, s.pattern, s.id) for s in subjects]
    allowed = _contrasting_colours(background.colour, style)
    # Distinct colours where possible: two objects of one colour would hide which one is in front.
    order = [allowed[i] for i in rng.permutation(len(allowed))]
    for index in range(count - len(subjects)):
        colour = order[index % len(order)]
        pattern = OBJECT_PATTERNS[int(rng.choice(3, p=[0.5, 0.25, 0.25]))]
        if _min_contrast(_object_colours(colour, pattern), background.colour, style) < MIN_CONTRAST:
            pattern = "plain"  # the pattern's shade would melt into the background
        specs.append((SHAPES[int(rng.integers(len(SHAPES)))], colour, pattern, None))
    objects = _place(specs, rng)
    return Scene(background, tuple(objects), None if style is None else style.name, int(rng.integers(2**31)))


def vary_scene(scene: Scene, rng: np.random.Generator, *, move: bool = False) -> Scene:
    """A near neighbour of `scene`: the same objects (shapes, colours, subjects) in the same cells
    (other cells with `move`) and the same style, with new jitter, rotations, depths, possibly sizes and
    background pattern."""
    specs = [(o.shape, o.colour, o.pattern, o.subject) for o in scene.objects]
    sizes = [o.size if rng.random() < 0.7 else None for o in scene.objects]
    cells = None if move else [o.cell for o in scene.objects]
    try:
        objects = _place(specs, rng, cells=cells, sizes=sizes)
    except RuntimeError:
        objects = list(scene.objects)
    background = scene.background
    if rng.random() < 0.5:
        background = Background(background.colour, BACKGROUND_PATTERNS[int(rng.integers(4))])
    return Scene(background, tuple(objects), scene.style, int(rng.integers(2**31)))


def sample_overlapping_scene(rng: np.random.Generator, *, extra_object: float = 0.3) -> Scene:
    """A scene whose first two objects overlap: plain objects of clearly different colours (every
    colour of one at least MIN_CONTRAST from every colour of the other) in neighbouring cells, the
    nearer one hiding part of the farther one. With probability `extra_object` a third object
    stands apart in another cell.

    The pair shares at least OVERLAP_PIXELS of silhouette at 32 x 32, so a picture shows which one
    is in front, while the farther one keeps most of its silhouette and of the square around its
    anchor in view, so its shape and colour can still be read at its cell. Which of the two is
    nearer, and which one the caption names first, are drawn at random.
    """
    count = 3 if rng.random() < extra_object else 2
    for _ in range(_OVERLAP_TRIES):
        background = _sample_background(rng, [], None)
        depths = _sample_depths(rng, count)
        pair = _overlapping_pair(rng, background, depths[:2])
        if pair is not None:
            break
    else:
        raise RuntimeError("could not place two overlapping objects")
    objects = list(pair)
    if count == 3:
        third = _object_apart(rng, background, objects, depths[2])
        objects += [] if third is None else [third]
    return Scene(background, tuple(objects), None, int(rng.integers(2**31)))


def _overlapping_pair(rng, background: Background, depths: list[float]) -> tuple[SceneObject, ...] | None:
    """Two objects at `depths` posed in a random pair of neighbouring cells, or None when the draw
    does not overlap as `sample_overlapping_scene` asks."""
    allowed = _contrasting_colours(background.colour, None)
    if len(allowed) < 2:
        return None
    cells = _NEIGHBOUR_CELLS[int(rng.integers(len(_NEIGHBOUR_CELLS)))]
    if rng.random() < 0.5:
        cells = cells[::-1]
    colours = [allowed[int(i)] for i in rng.choice(len(allowed), size=2, replace=False)]
    specs = [(colour, _object_pattern(rng, colour, background)) for colour in colours]
    if _distance_between(*specs) < MIN_CONTRAST:
        return None
    pair = tuple(_posed(SHAPES[int(rng.integers(len(SHAPES)))], colour, pattern, None,
                        list(SIZES)[int(rng.integers(len(SIZES)))], cell, depth, rng)
                 for (colour, pattern), cell, depth in zip(specs, cells, depths))
    return pair if _overlap_readable(Scene(background, pair)) else None


def _object_pattern(rng, colour: str, background: Background) -> str:
    pattern = OBJECT_PATTERNS[int(rng.choice(3, p=[0.5, 0.25, 0.25]))]
    if _min_contrast(_object_colours(colour, pattern), background.colour, None) < MIN_CONTRAST:
        return "plain"  # the pattern's shade would melt into the background
    return pattern


def _distance_between(first: tuple[str, str], second: tuple[str, str]) -> float:
    """The smallest contrast between a colour of one (colour, pattern) and a colour of the other."""
    return min(_contrast(a, b) for a in _object_colours(*first) for b in _object_colours(*second))


def _overlap_readable(scene: Scene) -> bool:
    """Whether the scene's two objects overlap enough to show their order, and the farther one stays in view."""
    pair = scene.objects
    plan = layout(scene, 32)
    if int((plan.object_masks[0] & plan.object_masks[1]).sum()) < OVERLAP_PIXELS:
        return False
    far = 0 if pair[0].depth > pair[1].depth else 1
    shown = plan.shown_object() == far
    if shown.sum() < _FAR_VISIBLE * plan.object_masks[far].sum():
        return False
    x, y = _grid(32)
    anchor = pair[far].position
    window = (np.abs(x - anchor[0]) < _ANCHOR_WINDOW / 2) & (np.abs(y - anchor[1]) < _ANCHOR_WINDOW / 2)
    return bool(shown[window].mean() >= _FAR_ANCHOR_VISIBLE)


def _object_apart(rng, background: Background, placed: list[SceneObject], depth: float) -> SceneObject | None:
    """A plain object in a free cell, in a colour of its own where the background leaves one,
    overlapping the placed ones no more than `sample_scene`'s objects do; None if none fits."""
    allowed = _contrasting_colours(background.colour, None)
    unused = [c for c in allowed if c not in {o.colour for o in placed}] or allowed
    colour = unused[int(rng.integers(len(unused)))]
    pattern = _object_pattern(rng, colour, background)
    for _ in range(16):
        candidate = _posed(SHAPES[int(rng.integers(len(SHAPES)))], colour, pattern, None,
                           list(SIZES)[int(rng.integers(len(SIZES)))], _free_cell(rng, placed), depth, rng)
        if all(_far_enough(candidate, other) for other in placed):
            return candidate
    return None


def overlaps(scene: Scene, size: int = 32) -> np.ndarray:
    """(objects, objects) int: the pixels each two objects' full silhouettes share at `size` (the
    diagonal holds each silhouette's own pixels)."""
    masks = layout(scene, size).object_masks.reshape(len(scene.objects), -1).astype(np.int64)
    return masks @ masks.T


def _as_subjects(subject) -> list[Subject]:
    if subject is None:
        return []
    items = [subject] if isinstance(subject, (int, np.integer, Subject)) else list(subject)
    result = []
    for item in items:
        if isinstance(item, Subject):
            result.append(item)
        elif isinstance(item, (int, np.integer)) and 0 <= int(item) < len(SUBJECTS):
            result.append(SUBJECTS[int(item)])
        else:
            raise ValueError(f"subject: expected a Subject or an id in 0..{len(SUBJECTS) - 1}, got {item!r}")
    return result


def _contrast(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def _background_pair(colour: str, style: Style | None) -> np.ndarray:
    base = np.asarray(BACKGROUND_COLOURS[colour], dtype=np.float32)
    return style_colours(style, np.stack([base, _background_shade(base)]))


def _object_colours(colour: str, pattern: str = "plain") -> list[np.ndarray]:
    """The colours an object's part is painted in: its own, and its pattern's shade."""
    base = np.asarray(COLOURS[colour], dtype=np.float32)
    return [base] if pattern == "plain" else [base, _pattern_shade(base)]


def _min_contrast(colours: list[np.ndarray], background: str, style: Style | None) -> float:
    painted = style_colours(style, np.stack(colours))
    return min(_contrast(p, b) for p in painted for b in _background_pair(background, style))


def _sample_background(rng: np.random.Generator, subjects: list[Subject], style: Style | None) -> Background:
    """A background the subjects stand out from: body, pattern and feature colours if possible,
    else body and pattern, else the body colour as well as can be. (A luminance-ramp style can
    leave no background that suits a mid-grey body's pattern: its stripes then show little.)"""
    names = list(BACKGROUND_COLOURS)
    if subjects:
        def contrast(colours):
            return np.array([_min_contrast(colours, name, style) for name in names])

        main = contrast([c for s in subjects for c in _object_colours(s.colour)])
        body = contrast([c for s in subjects for c in _object_colours(s.colour, s.pattern)])
        feature = contrast([c for s in subjects for c in _object_colours(s.feature_colour)])
        for good in (np.minimum(body, feature) >= MIN_CONTRAST, body >= MIN_CONTRAST, main >= main.max()):
            if good.any():
                break
        names = [name for name, ok in zip(names, good) if ok]
    colour = names[int(rng.integers(len(names)))]
    return Background(colour, BACKGROUND_PATTERNS[int(rng.integers(len(BACKGROUND_PATTERNS)))])


def _contrasting_colours(background: str, style: Style | None) -> list[str]:
    scores = {name: _min_contrast(_object_colours(name), background, style) for name in COLOURS}
    good = [name for name, score in scores.items() if score >= MIN_CONTRAST]
    return good or [max(scores, key=scores.get)]


def _place(specs, rng, cells=None, sizes=None) -> list[SceneObject]:
    """Objects for (shape, colour, pattern, subject) specs in distinct cells, overlapping little.

    Objects are placed one by one; when one finds no room the whole layout starts again (with
    small sizes only, after a few tries), since earlier objects may have taken the room it needs.
    """
    for round_ in range(24):
        placed = _try_place(specs, rng, cells, sizes, small_only=round_ >= 8)
        if placed is not None:
            return placed
    raise RuntimeError("could not place the objects without heavy overlap")


def _try_place(specs, rng, cells, sizes, small_only: bool) -> list[SceneObject] | None:
    placed: list[SceneObject] = []
    depths = _sample_depths(rng, len(specs))
    for index, (shape, colour, pattern, subject) in enumerate(specs):
        for _ in range(16):
            cell = cells[index] if cells else _free_cell(rng, placed)
            size = (sizes[index] if sizes and sizes[index] else None) or list(SIZES)[int(rng.integers(3))]
            candidate = _posed(shape, colour, pattern, subject, "small" if small_only else size, cell,
                               depths[index], rng)
            if all(_far_enough(candidate, other) for other in placed):
                placed.append(candidate)
                break
        else:
            return None
    return placed


def _free_cell(rng: np.random.Generator, placed: list[SceneObject]) -> int:
    used = {o.cell for o in placed}
    free = [c for c in range(9) if c not in used]
    return free[int(rng.integers(len(free)))]


def _sample_depths(rng: np.random.Generator, count: int) -> list[float]:
    # Evenly spread slots, shuffled and jittered: distinct objects are always clearly ordered.
    if count == 1:
        return [float(rng.uniform(0.2, 0.8))]
    slots = np.linspace(0.2, 0.8, count)[rng.permutation(count)]
    return [float(d + rng.uniform(-0.05, 0.05)) for d in slots]


def _posed(shape, colour, pattern, subject, size, cell, depth, rng) -> SceneObject:
    column, row = cell % 3, cell // 3
    rotation = float(rng.uniform(-_MAX_ROTATION, _MAX_ROTATION))
    x = _CELL_ANCHORS[column] + float(rng.uniform(-_JITTER, _JITTER))
    y = _CELL_ANCHORS[row] + float(rng.uniform(-_JITTER, _JITTER))
    obj = SceneObject(shape, colour, pattern, size, (0.5, 0.5), depth, rotation, subject)
    half_x, half_y = _extent(obj)
    # Clamped into the frame; the anchors and sizes are such that it stays inside its cell.
    x = min(max(x, half_x + 0.01), 0.99 - half_x)
    y = min(max(y, half_y + 0.01), 0.99 - half_y)
    return replace(obj, position=(round(x, 4), round(y, 4)))


def _far_enough(a: SceneObject, b: SceneObject) -> bool:
    # Some overlap is allowed (the nearer object then hides part of the farther one: what depth
    # maps are for), but never so much that either is unrecognisable.
    distance = math.dist(a.position, b.position)
    return distance >= 0.75 * (_radius(a) + _radius(b))


# --------------------------------------------------------------------------------------------
# Geometry: every part of an object as polygons in image units


@dataclass(frozen=True)
class _Part:
    object_index: int
    role: str  # "body" or "feature"
    shape: str
    colour: str
    pattern: str
    centre: tuple[float, float]
    rotation: float
    polygons: tuple[np.ndarray, ...]  # outer outline first; a ring's hole second


def _outline(shape: str, r: float) -> tuple[np.ndarray, ...]:
    """Polygons of `shape` with half-extent `r`, centred on the origin, y down."""
    if shape in ("circle", "ring"):
        angles = np.linspace(0.0, 2 * np.pi, 48, endpoint=False)
        unit = np.stack([np.cos(angles), np.sin(angles)], axis=1)
        return (unit * r, unit * 0.52 * r) if shape == "ring" else (unit * r,)
    if shape == "square":
        s = 0.86 * r
        return (np.array([[-s, -s], [s, -s], [s, s], [-s, s]]),)
    if shape == "triangle":
        angles = np.radians([-90.0, 30.0, 150.0])
        return (np.stack([np.cos(angles), np.sin(angles)], axis=1) * 1.16 * r,)
    if shape == "diamond":
        return (np.array([[0.0, -1.18], [0.74, 0.0], [0.0, 1.18], [-0.74, 0.0]]) * r,)
    if shape == "cross":
        a, w = 1.0, 0.36
        points = [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a), (-w, w), (-a, w),
                  (-a, -w), (-w, -w)]
        return (np.array(points) * r,)
    raise ValueError(f"shape: unknown shape {shape!r}; known shapes are {', '.join(SHAPES)}")


def _local_parts(obj: SceneObject) -> list[tuple[str, str, str, str, tuple[float, float], float]]:
    """(role, shape, colour, pattern, offset from the body centre, half-extent), body first."""
    if obj.subject is None:
        return [("body", obj.shape, obj.colour, obj.pattern, (0.0, 0.0), SIZES[obj.size])]
    subject = SUBJECTS[obj.subject]
    r = SIZES[obj.size] * _SUBJECT_SCALE
    body = ("body", subject.shape, subject.colour, subject.pattern, (0.0, 0.0), r)
    top = float(-np.min(_outline(subject.shape, r)[0][:, 1]))
    if subject.placement == "hat":
        f = 0.5 * r
        features = [(0.0, -(top + 0.55 * f))]
    elif subject.placement == "badge":
        f = 0.42 * r
        features = [(0.0, 0.0)]
    else:  # ears
        f = 0.36 * r
        features = [(-0.62 * r, -(top + 0.2 * f)), (0.62 * r, -(top + 0.2 * f))]
    return [body] + [("feature", subject.feature_shape, subject.feature_colour, "plain", at, f) for at in features]


@lru_cache(maxsize=4096)
def _parts(obj: SceneObject, object_index: int = 0) -> tuple[_Part, ...]:
    """The object's parts placed in the image: rotated about the body, the bounding box centred
    on `obj.position`."""
    theta = math.radians(obj.rotation)
    rotate = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    placed = []
    for role, shape, colour, pattern, offset, r in _local_parts(obj):
        centre = rotate @ np.asarray(offset)
        polygons = tuple(p @ rotate.T + centre for p in _outline(shape, r))
        placed.append((role, shape, colour, pattern, centre, polygons))
    points = np.concatenate([polygons[0] for *_, polygons in placed])
    middle = (points.min(axis=0) + points.max(axis=0)) / 2.0
    shift = np.asarray(obj.position) - middle
    return tuple(
        _Part(object_index, role, shape, colour, pattern, tuple(centre + shift), obj.rotation,
              tuple(p + shift for p in polygons))
        for role, shape, colour, pattern, centre, polygons in placed
    )


def _extent(obj: SceneObject) -> tuple[float, float]:
    points = np.concatenate([part.polygons[0] for part in _parts(obj)])
    half = (points.max(axis=0) - points.min(axis=0)) / 2.0
    return float(half[0]), float(half[1])


def _radius(obj: SceneObject) -> float:
    points = np.concatenate([part.polygons[0] for part in _parts(obj)])
    return float(np.max(np.linalg.norm(points - np.asarray(obj.position), axis=1)))


# --------------------------------------------------------------------------------------------
# Rasterising


@dataclass(frozen=True)
class Layout:
    """What covers each pixel of a scene rendered at `size`.

    `labels` (size, size) int: 0 for the background, k >= 1 for `parts[k - 1]`, each pixel taking
    the label that covers most of it. Parts are numbered in drawing order (far objects first), so
    a higher label is drawn on top. `object_masks` (objects, size, size) bool: each object's full
    silhouette as if nothing hid it, at the same majority rule.
    """

    size: int
    labels: np.ndarray
    parts: tuple[_Part, ...]
    object_masks: np.ndarray
    labels_fine: np.ndarray  # the same at SUPERSAMPLE x size

    def shown_object(self) -> np.ndarray:
        """(size, size) int: the index of the object each pixel shows (the nearer one where two overlap), -1 on
        the background."""
        return np.array([-1] + [part.object_index for part in self.parts])[self.labels]

    def shown_masks(self) -> np.ndarray:
        """(objects, size, size) bool: the pixels where each object is seen, what a depth map shows of it."""
        return self.shown_object()[None] == np.arange(len(self.object_masks))[:, None, None]


@lru_cache(maxsize=256)
def layout(scene: Scene, size: int = 32) -> Layout:
    """The label map of `scene` at `size` (cached; treat the arrays as read-only)."""
    _check_size(size)
    fine = size * SUPERSAMPLE
    order = sorted(range(len(scene.objects)), key=lambda i: (-scene.objects[i].depth, i))
    labels_fine = np.zeros((fine, fine), dtype=np.uint8)
    parts: list[_Part] = []
    object_fine = np.zeros((len(scene.objects), fine, fine), dtype=bool)
    for index in order:
        for part in _parts(scene.objects[index], index):
            mask = _rasterise(part.polygons, fine)
            parts.append(part)
            labels_fine[mask] = len(parts)
            object_fine[index] |= mask
    labels = _majority(labels_fine, len(parts) + 1)
    object_masks = _block_mean(object_fine.astype(np.float32).transpose(1, 2, 0)) > 0.5
    for array in (labels, labels_fine):
        array.setflags(write=False)
    masks = np.ascontiguousarray(object_masks.transpose(2, 0, 1))
    masks.setflags(write=False)
    return Layout(size, labels, tuple(parts), masks, labels_fine)


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 8 <= size <= 1024:
        raise ValueError(f"size: expected an integer in 8..1024, got {size!r}")


def _rasterise(polygons: tuple[np.ndarray, ...], side: int) -> np.ndarray:
    canvas = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(canvas)
    for index, polygon in enumerate(polygons):
        # PIL puts integer coordinates on pixel centres; image units put 0 on the left edge.
        points = [(float(x) * side - 0.5, float(y) * side - 0.5) for x, y in polygon]
        draw.polygon(points, fill=255 if index == 0 else 0)
    return np.asarray(canvas) > 0


def _block_mean(array: np.ndarray) -> np.ndarray:
    """The mean of each SUPERSAMPLE x SUPERSAMPLE block (of the first two axes)."""
    height, width = array.shape[0] // SUPERSAMPLE, array.shape[1] // SUPERSAMPLE
    # Summing strided slices is several times faster than mean() over the two block axes.
    rows = array.reshape(height, SUPERSAMPLE, *array.shape[1:])
    rows = sum(rows[:, k] for k in range(SUPERSAMPLE))
    blocks = rows.reshape(height, width, SUPERSAMPLE, *array.shape[2:])
    return sum(blocks[:, :, k] for k in range(SUPERSAMPLE)) / float(SUPERSAMPLE * SUPERSAMPLE)


def _majority(labels_fine: np.ndarray, count: int) -> np.ndarray:
    side = labels_fine.shape[0] // SUPERSAMPLE
    block = (np.arange(labels_fine.shape[0]) // SUPERSAMPLE)
    block_index = block[:, None] * side + block[None, :]
    coverage = np.bincount((block_index * count + labels_fine).ravel(), minlength=side * side * count)
    # Ties go to the label drawn later (on top): argmax over the labels in reverse order.
    coverage = coverage.reshape(side, side, count)[..., ::-1]
    return (count - 1 - np.argmax(coverage, axis=-1)).astype(np.int32)


@lru_cache(maxsize=8)
def _grid(side: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in image units (read-only, shared)."""
    coords = (np.arange(side, dtype=np.float32) + 0.5) / side
    x, y = np.meshgrid(coords, coords)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def _background_shade(rgb: np.ndarray) -> np.ndarray:
    offset = _BACKGROUND_SHADE if float(rgb @ _LUMA) < 128 else -_BACKGROUND_SHADE
    return np.clip(rgb + offset, 0, 255)


def _pattern_shade(rgb: np.ndarray) -> np.ndarray:
    if float(rgb @ _LUMA) > 60:
        return rgb * _OBJECT_SHADE
    return rgb + (255.0 - rgb) * (1.0 - _OBJECT_SHADE)


def _paint_background(background: Background, side: int) -> np.ndarray:
    base = np.asarray(BACKGROUND_COLOURS[background.colour], dtype=np.float32)
    shade = _background_shade(base)
    x, y = _grid(side)
    if background.pattern == "plain":
        return np.broadcast_to(base, (side, side, 3)).copy()
    if background.pattern == "stripes":
        weight = (np.floor((x + y) / _BACKGROUND_PERIOD) % 2).astype(np.float32)
    elif background.pattern == "checker":
        weight = ((np.floor(x / _BACKGROUND_PERIOD) + np.floor(y / _BACKGROUND_PERIOD)) % 2).astype(np.float32)
    elif background.pattern == "gradient":
        weight = y
    else:
        raise ValueError(f"background.pattern: unknown pattern {background.pattern!r}")
    return base + (shade - base) * weight[..., None]


def _paint_part(canvas: np.ndarray, part: _Part, where: np.ndarray) -> None:
    colour = np.asarray(COLOURS[part.colour], dtype=np.float32)
    if part.pattern == "plain":
        canvas[where] = colour
        return
    x, y = (axis[where] for axis in _grid(canvas.shape[0]))
    theta = math.radians(part.rotation)
    # Pattern coordinates in the part's own frame, so stripes turn with the object.
    u = math.cos(theta) * (x - part.centre[0]) + math.sin(theta) * (y - part.centre[1])
    v = -math.sin(theta) * (x - part.centre[0]) + math.cos(theta) * (y - part.centre[1])
    if part.pattern == "striped":
        marked = np.floor(v / _OBJECT_PERIOD) % 2 == 1
    elif part.pattern == "dotted":
        period = 1.3 * _OBJECT_PERIOD
        du, dv = (u % period) - period / 2, (v % period) - period / 2
        marked = du * du + dv * dv < (0.3 * period) ** 2
    else:
        raise ValueError(f"pattern: unknown pattern {part.pattern!r}")
    canvas[where] = np.where(marked[:, None], _pattern_shade(colour), colour)


def _palette(style: Style, rgb: np.ndarray) -> np.ndarray:
    kind = style.palette[0]
    if kind == "tint":
        return rgb * np.asarray(style.palette[1], np.float32) + np.asarray(style.palette[2], np.float32)
    if kind == "saturate":
        mean = rgb.mean(axis=-1, keepdims=True)
        return mean + style.palette[1] * (rgb - mean)
    if kind == "ramp":
        stops = np.asarray(style.palette[1], dtype=np.float32)
        position = np.clip(rgb @ _LUMA, 0.0, 1.0) * (len(stops) - 1)
        low = np.minimum(np.floor(position).astype(int), len(stops) - 2)
        t = (position - low)[..., None]
        return stops[low] * (1 - t) + stops[low + 1] * t
    raise ValueError(f"style.palette: unknown palette kind {kind!r}")


def _posterize(rgb: np.ndarray, levels: int | None) -> np.ndarray:
    if levels is None:
        return rgb
    return np.round(np.clip(rgb, 0.0, 1.0) * (levels - 1)) / (levels - 1)


_HATCH_DARKEN = 0.85
_GRAIN = 0.03


@lru_cache(maxsize=8)
def _hatch(side: int) -> np.ndarray:
    x, y = _grid(side)
    return ((x - y) % 0.1) < 0.035


def _boundaries(labels: np.ndarray) -> np.ndarray:
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[:, :-1] |= labels[:, 1:] != labels[:, :-1]
    edge[1:] |= labels[1:] != labels[:-1]
    edge[:-1] |= labels[1:] != labels[:-1]
    return edge


def _dilate(mask: np.ndarray, size: int) -> np.ndarray:
    if size <= 1:
        return mask
    image = Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(size))
    return np.asarray(image) > 0


def _finish(canvas: np.ndarray, scene: Scene, labels_fine: np.ndarray | None, grain: bool = True) -> Image.Image:
    """Style, downsample, quantise. `labels_fine` None paints no outlines (background only)."""
    style = style_by_name(scene.style)
    rgb = canvas / 255.0
    side = canvas.shape[0]
    if style is not None:
        rgb = _palette(style, rgb)
        if style.texture == "hatch":
            rgb = np.where(_hatch(side)[..., None], rgb * _HATCH_DARKEN, rgb)
        if style.outline is not None and labels_fine is not None:
            width = max(1, round(0.02 * side)) | 1  # about one output pixel: small rings stay open
            outline = _dilate(_boundaries(labels_fine), width)
            rgb = np.where(outline[..., None], np.asarray(style.outline, np.float32), rgb)
    small = _block_mean(rgb)
    if style is not None:
        small = _posterize(small, style.posterize)
        if style.texture == "grain" and grain:
            noise = np.random.default_rng([scene.seed, 7]).normal(0.0, _GRAIN, small.shape[:2])
            small = small + noise[..., None].astype(np.float32)
    return Image.fromarray(np.round(np.clip(small, 0.0, 1.0) * 255.0).astype(np.uint8), "RGB")


# --------------------------------------------------------------------------------------------
# Rendering


def render(scene: Scene, size: int = 32) -> Image.Image:
    """The scene as an RGB image of `size` x `size`."""
    plan = layout(scene, size)
    canvas = _paint_background(scene.background, size * SUPERSAMPLE)
    for label, part in enumerate(plan.parts, start=1):
        where = plan.labels_fine == label
        if where.any():
            _paint_part(canvas, part, where)
    return _finish(canvas, scene, plan.labels_fine)


def render_background(scene: Scene, size: int = 32, *, grain: bool = False) -> Image.Image:
    """The scene's background alone, styled (without grain unless asked: grain is per pixel noise
    that no other picture shares, so the metrics compare against the grain-free background)."""
    _check_size(size)
    return _finish(_paint_background(scene.background, size * SUPERSAMPLE), scene, None, grain)


@dataclass(frozen=True)
class ScenePalette:
    """Every colour a scene is painted in, after its style (0..255 floats): `background` (K, 3)
    the background's colours; `parts` (M, 3) the parts' colours with `labels` (M,) their labels
    in `layout(scene)` (one past the last part for an outline colour). Under hatching each colour
    comes twice, plain and darkened. Grain is not a colour and is left out."""

    background: np.ndarray
    parts: np.ndarray
    labels: np.ndarray


def scene_palette(scene: Scene, size: int = 32) -> ScenePalette:
    style = style_by_name(scene.style)

    def painted(colours: list[np.ndarray]) -> np.ndarray:
        result = style_colours(style, np.stack(colours))
        if style is not None and style.texture == "hatch":
            result = np.concatenate([result, result * _HATCH_DARKEN])
        return result

    base = np.asarray(BACKGROUND_COLOURS[scene.background.colour], dtype=np.float32)
    colours, labels = [], []
    parts = layout(scene, size).parts
    for label, part in enumerate(parts, start=1):
        for colour in painted(_object_colours(part.colour, part.pattern)):
            colours.append(colour)
            labels.append(label)
    if style is not None and style.outline is not None:
        colours.append(np.asarray(style.outline, dtype=np.float32) * 255.0)
        labels.append(len(parts) + 1)
    return ScenePalette(painted([base, _background_shade(base)]), np.asarray(colours, np.float32), np.asarray(labels))


def render_edges(scene: Scene, size: int = 32) -> Image.Image:
    """Exact boundaries, white (255) on black: a pixel is an edge where a 4-neighbour has another
    label and its own label is drawn on top of that neighbour's (so each boundary is one pixel
    wide, on the side of the nearer region). The frame's border is no boundary."""
    return Image.fromarray(edge_pixels(layout(scene, size).labels).astype(np.uint8) * 255, "L")


def edge_pixels(labels: np.ndarray) -> np.ndarray:
    """The edge rule of `render_edges` on any label map where higher labels are drawn on top."""
    labels = np.asarray(labels)
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:, 1:] |= labels[:, 1:] > labels[:, :-1]
    edge[:, :-1] |= labels[:, :-1] > labels[:, 1:]
    edge[1:] |= labels[1:] > labels[:-1]
    edge[:-1] |= labels[:-1] > labels[1:]
    return edge


def render_mask(scene: Scene, size: int = 32) -> Image.Image:
    """Object silhouettes (every part, as seen) white (255) on black."""
    return Image.fromarray((layout(scene, size).labels > 0).astype(np.uint8) * 255, "L")


def render_depth(scene: Scene, size: int = 32) -> Image.Image:
    """Depth as "L", near bright: each object's pixels hold round(255 * (1 - depth)), the
    background (depth 1) is 0. Values are constant per object, with no anti-aliasing."""
    plan = layout(scene, size)
    values = np.zeros(len(plan.parts) + 1, dtype=np.uint8)
    for label, part in enumerate(plan.parts, start=1):
        values[label] = round(255 * (1.0 - scene.objects[part.object_index].depth))
    return Image.fromarray(values[plan.labels], "L")


def render_sketch(scene: Scene, size: int = 32) -> Image.Image:
    """A pencil sketch: black strokes on white along every part's outline, each redrawn with a
    small random offset, scale and turn (seeded by the scene) and hidden where a part drawn over
    it covers it. Looser than `render_edges`, as a hand drawing is."""
    plan = layout(scene, size)
    fine = size * SUPERSAMPLE
    rng = np.random.default_rng([scene.seed, 11])
    width = max(2, round(0.045 * fine))
    strokes = np.zeros((fine, fine), dtype=bool)
    for label, part in enumerate(plan.parts, start=1):
        canvas = Image.new("L", (fine, fine), 0)
        draw = ImageDraw.Draw(canvas)
        for polygon in part.polygons:
            wobbly = _wobble(polygon, np.asarray(part.centre), rng)
            points = [(float(x) * fine - 0.5, float(y) * fine - 0.5) for x, y in wobbly]
            draw.line(points + points[:1], fill=255, width=width, joint="curve")
        # Hidden where a part drawn later (nearer, or a feature on its body) covers it.
        strokes |= (np.asarray(canvas) > 0) & (plan.labels_fine <= label)
    ink = _block_mean(strokes.astype(np.float32))
    return Image.fromarray(np.round(255.0 * (1.0 - ink)).astype(np.uint8), "L")


def _wobble(polygon: np.ndarray, centre: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    turn = math.radians(float(rng.uniform(-4.0, 4.0)))
    rotate = np.array([[math.cos(turn), -math.sin(turn)], [math.sin(turn), math.cos(turn)]])
    scale = float(rng.uniform(0.94, 1.06))
    shift = rng.uniform(-0.012, 0.012, size=2)
    return (polygon - centre) @ rotate.T * scale + centre + shift


def sample_hole(scene: Scene, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """An inpainting hole, "L" 255 inside: a rectangle (30-50% of each side) over part of one of
    the scene's objects, so that filling it needs the caption or the rest of the object."""
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    width, height = (round(size * float(rng.uniform(0.3, 0.5))) for _ in range(2))
    cx = obj.position[0] * size + float(rng.uniform(-0.15, 0.15)) * size
    cy = obj.position[1] * size + float(rng.uniform(-0.15, 0.15)) * size
    left = int(min(max(round(cx - width / 2), 0), size - width))
    top = int(min(max(round(cy - height / 2), 0), size - height))
    hole = np.zeros((size, size), dtype=np.uint8)
    hole[top : top + height, left : left + width] = 255
    return Image.fromarray(hole, "L")


def render_masked(scene: Scene, hole: Image.Image, size: int = 32) -> Image.Image:
    """The render with `hole` painted grey, as the inpainting task shows it (`controls.apply_mask`)."""
    from instruct_core.controls import apply_mask

    return apply_mask(render(scene, size), hole)


def render_subject_reference(subject: int | Subject, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """The subject alone on a plain background, in a random pose (cell, size, turn)."""
    (chosen,) = _as_subjects(subject)
    scene = sample_scene(rng, num_objects=1, subject=chosen)
    scene = replace(scene, background=Background(scene.background.colour, "plain"))
    return render(scene, size)


def render_style_reference(style: str | Style, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """Other content (one or two random plain objects) in the given style."""
    chosen = style_by_name(style)
    if chosen is None:
        raise ValueError("style: a style reference needs a style")
    return render(sample_scene(rng, num_objects=(1, 2), style=chosen), size)


# --------------------------------------------------------------------------------------------
# Captions

CAPTION_TEMPLATES = (
    "{objects} on {background}",
    "{background} with {objects}",
    "{objects}, against {background}",
)
_PATTERN_WORDS = {"plain": "", "striped": "striped ", "dotted": "dotted "}
_BACKGROUND_WORDS = {"plain": "a plain {c} background", "stripes": "a striped {c} background",
                     "checker": "a checkered {c} background", "gradient": "a {c} gradient background"}


def position_phrase(cell: int) -> str:
    column, row = CELLS[cell]
    if row == "middle":
        return "in the center" if column == "center" else f"on the {column}"
    if column == "center":
        return f"at the {row}"
    return f"at the {row} {column}"


def object_phrase(obj: SceneObject, marker: str | None = None) -> str:
    """ "a large striped red circle", "a small robot", or with a marker "a small [ref#1]"."""
    if obj.subject is not None:
        return f"a {obj.size} {marker or SUBJECTS[obj.subject].kind}"
    return f"a {obj.size} {_PATTERN_WORDS[obj.pattern]}{obj.colour} {obj.shape}"


def placed_phrase(obj: SceneObject, marker: str | None = None) -> str:
    """An object as captions name it, with its place: "a large red circle on the left"."""
    return f"{object_phrase(obj, marker)} {obj.where}"


def find_placed_phrases(text: str, objects) -> list[tuple[int, int]] | None:
    """(start, end) in `text` of each object's `placed_phrase`, each after the one before; None when one is
    missing."""
    spans, search_from = [], 0
    for obj in objects:
        phrase = placed_phrase(obj)
        at = text.find(phrase, search_from)
        if at < 0:
            return None
        spans.append((at, at + len(phrase)))
        search_from = at + len(phrase)
    return spans


def caption(scene: Scene, template_rng: np.random.Generator | None = None,
            markers: Mapping[int, str] | None = None) -> str:
    """A one-line description; `markers` maps object indices to "[ref#k]" to name subjects by.

    The phrasing is drawn from CAPTION_TEMPLATES by `template_rng` (the first one without it).
    Styles are never named: a style comes from its reference image.
    """
    markers = markers or {}
    phrases = [placed_phrase(o, markers.get(i)) for i, o in enumerate(scene.objects)]
    objects = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    background = _BACKGROUND_WORDS[scene.background.pattern].format(c=scene.background.colour)
    index = 0 if template_rng is None else int(template_rng.integers(len(CAPTION_TEMPLATES)))
    return CAPTION_TEMPLATES[index].format(objects=objects, background=background)
