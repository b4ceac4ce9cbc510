"""Benchmark metrics: control fidelity from exact ground truth, and a small evaluator network.

Reading a generated image. The scene behind every example is known, so its background and its
parts' colours (after the style) are known too. A pixel is *foreground* when it is far (max
channel difference > `FOREGROUND_THRESHOLD`) from the scene's background there and from every
background colour, or nearer to a part's colour than to any background colour; a foreground pixel
takes the label of the part whose colours it is nearest (`segment`). From that label map:

- edge F1 (`edge_f1`): the label map's boundaries against `render_edges`, a pixel counting as
  matched within `tolerance` (1) pixel, in the Chebyshev sense;
- mask IoU (`mask_iou`): foreground against the silhouettes of `render_mask`, pixels within
  `tolerance` of a silhouette's border left out;
- depth order (`depth_order`): where two objects overlap, the share of the overlap that shows the
  nearer one's colours (None when no two objects overlap by a few pixels);
- depth swap (`depth_swap`): for an image and the one generated, with the same seed, for the same
  instruction with the overlapping objects' depths exchanged (`tasks.swap_depths`), whether both
  show the nearer object in front: a model that draws one order whatever the depth map says
  scores 0, one that follows it 1;
- hole agreement (`hole_agreement`): for inpainting, the share of hole pixels within
  `HOLE_TOLERANCE` of the target, averaged over the hole's object and background pixels.

A small CNN, the `Evaluator`, reads what only a classifier can: for each of the 3 x 3 cells the
body shape (or "none"), colour, size and subject id (or "none"), and for the picture its style (or
"none") and whether it is a clean render. `train_evaluator` fits it to renders in under a minute
on a CPU. It sees every subject and style, held-out ones included: it is the measuring
instrument, not the model under test.

Scores (`score_example`): each task's semantic consistency SC in [0, 1] is the mean of its
components (`SC_COMPONENTS`): "text" (the mean of: the IoU of the cells the evaluator sees
occupied with the objects' cells, so clutter costs as much as absence; and each object's shape,
colour and size as read at its ground-truth cell, colour skipped under a style, which repaints
it, shape and colour skipped for subjects, whose identity "subject" measures), "control" (edge
F1 for edge and sketch controls, mask IoU for masks, mask IoU and depth order for depth),
"subject", "style" and "hole". Named colour at its place ("colour": the share of plain objects
whose colour the evaluator reads at their cell; None where the text names no object's colour, or a
style repaints it) is reported for every task, within "text" where the task has it and on its own
otherwise. The perceptual-quality proxy PQ is the evaluator's probability
that the image is a clean render (trained against noise, blur, ghosting and blob corruptions of
renders). The overall score follows Instruct-Imagen's O = sqrt(SC * PQ).

Scoring the targets themselves gives each task's ceiling, which is below 1 where the reading is
harder: a subject under a luminance-ramp style has lost the colours that tell some subjects
apart (see `evaluator_accuracy`'s "styled_subject"). Report model scores next to that ceiling.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from . import scenes
from .scenes import Scene

__all__ = [
    "EVALUATOR_SIZE",
    "FOREGROUND_THRESHOLD",
    "HOLE_TOLERANCE",
    "SC_COMPONENTS",
    "Evaluator",
    "EvaluatorOutput",
    "colour_at_place",
    "depth_order",
    "depth_swap",
    "edge_f1",
    "evaluator_accuracy",
    "extract_edges",
    "foreground",
    "hole_agreement",
    "mask_iou",
    "score_batch",
    "score_example",
    "segment",
    "summarise",
    "train_evaluator",
]

FOREGROUND_THRESHOLD = 50.0
HOLE_TOLERANCE = 40.0
_PART_MARGIN = 24.0
_MIN_OVERLAP = 4  # pixels at 32 x 32
EVALUATOR_SIZE = 32


# --------------------------------------------------------------------------------------------
# Reading a generated image against its scene


def pixels_of(image, size: int) -> np.ndarray:
    """`image` (PIL or (H, W, 3) uint8 array) as float32 (size, size, 3), resized if needed."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8), "RGB")
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BOX if image.width > size else Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float32)


def colour_distance(pixels: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Max-channel distance of every pixel (H, W, 3) to every colour (K, 3): (H, W, K)."""
    return np.abs(pixels[:, :, None, :] - colours[None, None]).max(axis=-1)


def foreground(image, scene: Scene, size: int | None = None, threshold: float = FOREGROUND_THRESHOLD) -> np.ndarray:
    """Pixels (bool, size x size) of objects: those that differ from the scene's background by
    more than `threshold` (whatever colour they are), and those nearer to one of the scene's
    part colours than to any background colour (a pale badge on a pale background)."""
    size = size or _size_of(image)
    pixels = pixels_of(image, size)
    palette = scenes.scene_palette(scene, size)
    background = np.asarray(scenes.render_background(scene, size), dtype=np.float32)
    here = np.abs(pixels - background).max(axis=-1)
    to_background = np.minimum(here, colour_distance(pixels, palette.background).min(axis=-1))
    far = (to_background > threshold)
    # Only part colours set apart from the background count, and only clearly nearer: a part
    # painted in the background's own colour (a style can do that) must not claim grain.
    distinct = colour_distance(palette.parts[None], palette.background).min(axis=-1)[0] > _PART_MARGIN
    if not distinct.any():
        return far
    to_parts = colour_distance(pixels, palette.parts[distinct]).min(axis=-1)
    return far | (to_parts + _PART_MARGIN / 2 < to_background)


def segment(image, scene: Scene, size: int | None = None) -> np.ndarray:
    """A label map (int, size x size) of a generated image in the scene's labels: 0 background,
    k the k-th part of `layout(scene)`, one more than the parts for outline colour."""
    size = size or _size_of(image)
    pixels = pixels_of(image, size)
    palette = scenes.scene_palette(scene, size)
    nearest = palette.labels[np.argmin(colour_distance(pixels, palette.parts), axis=-1)]
    return np.where(foreground(pixels, scene, size), nearest, 0)


def extract_edges(image, scene: Scene, size: int | None = None) -> np.ndarray:
    """Boundaries of `segment`: pixels with a 4-neighbour of another label (both sides). Under
    an outlining style the outline pixels are the edges, and the outline's own borders are not."""
    size = size or _size_of(image)
    labels = segment(image, scene, size)
    style = scenes.style_by_name(scene.style)
    if style is None or style.outline is None:
        return _boundaries(labels)
    outline = labels == len(scenes.layout(scene, size).parts) + 1
    return outline | _boundaries(labels, ignore=outline)


def edge_f1(predicted: np.ndarray, truth: np.ndarray, tolerance: int = 1) -> float:
    """F1 of two edge maps (truthy = edge), a pixel matching any within `tolerance` pixels.

    Both empty is a perfect 1; one empty is 0.
    """
    predicted, truth = np.asarray(predicted) > 0, np.asarray(truth) > 0
    if predicted.shape != truth.shape:
        raise ValueError(f"predicted: shape {predicted.shape} does not match truth's {truth.shape}")
    if not predicted.any() and not truth.any():
        return 1.0
    if not predicted.any() or not truth.any():
        return 0.0
    precision = float((predicted & dilate(truth, tolerance)).sum()) / float(predicted.sum())
    recall = float((truth & dilate(predicted, tolerance)).sum()) / float(truth.sum())
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def mask_iou(image, scene: Scene, size: int | None = None, tolerance: int = 1) -> float:
    """IoU of the image's foreground with the scene's silhouettes, leaving out pixels within
    `tolerance` of a silhouette's border (anti-aliasing and outlines blur exactly those)."""
    size = size or _size_of(image)
    predicted = foreground(image, scene, size)
    truth = scenes.layout(scene, size).labels > 0
    if tolerance > 0:
        keep = ~dilate(_boundaries(truth), tolerance - 1)
        predicted, truth = predicted[keep], truth[keep]
    union = float((predicted | truth).sum())
    return 1.0 if union == 0 else float((predicted & truth).sum()) / union


def depth_order(image, scene: Scene, size: int | None = None) -> float | None:
    """Where a nearer object covers part of a farther one, the share of those pixels whose
    label belongs to the nearer object; None when no two objects overlap (by at least a few
    pixels) or the overlapping ones share a colour."""
    size = size or _size_of(image)
    plan = scenes.layout(scene, size)
    labels = segment(image, scene, size)
    owner = np.array([-1] + [part.object_index for part in plan.parts] + [-1])
    shown = owner[labels]
    hits, total = 0, 0
    for a in range(len(scene.objects)):
        for b in range(len(scene.objects)):
            if scene.objects[a].depth >= scene.objects[b].depth or _alike(scene, size, a, b):
                continue  # a must be the nearer one, and look different from b
            overlap = plan.object_masks[a] & plan.object_masks[b]
            if overlap.sum() < _MIN_OVERLAP * (size / 32) ** 2:
                continue  # a pixel or two of anti-aliased rim says nothing about order
            hits += int((shown[overlap] == a).sum())
            total += int(overlap.sum())
    return None if total == 0 else hits / total


def depth_swap(image, scene: Scene, swapped_image, swapped_scene: Scene) -> float | None:
    """1.0 when `image` (for `scene`) and `swapped_image` (for `swapped_scene`, the same objects
    with the overlapping ones' depths exchanged) both show the nearer object in most of each
    overlap, else 0.0; None when either order is unreadable."""
    orders = (depth_order(image, scene), depth_order(swapped_image, swapped_scene))
    if None in orders:
        return None
    return float(all(order > 0.5 for order in orders))


def _alike(scene: Scene, size: int, a: int, b: int) -> bool:
    """Whether some colour of object a is within the foreground threshold of one of object b."""
    palette = scenes.scene_palette(scene, size)
    owner = {label: part.object_index for label, part in enumerate(scenes.layout(scene, size).parts, start=1)}
    objects = np.array([owner.get(int(label), -1) for label in palette.labels])
    gaps = colour_distance(palette.parts[objects == a][None], palette.parts[objects == b])
    return bool(gaps.size) and float(gaps.min()) <= FOREGROUND_THRESHOLD


def hole_agreement(image, target, hole, tolerance: float = HOLE_TOLERANCE, scene: Scene | None = None) -> float:
    """Share of the hole's pixels (hole "L" >= 128) within `tolerance` (max channel) of `target`.

    Given the scene, the share is taken separately over the hole's object pixels and its
    background pixels and the two averaged, so that filling a hole with background alone earns
    at most half.
    """
    hole = np.asarray(hole.convert("L") if isinstance(hole, Image.Image) else hole) >= 128
    size = hole.shape[0]
    close = np.abs(pixels_of(image, size) - pixels_of(target, size)).max(axis=-1) <= tolerance
    if not hole.any():
        return 1.0
    if scene is None:
        return float(close[hole].mean())
    objects = scenes.layout(scene, size).labels > 0
    regions = [region for region in (hole & objects, hole & ~objects) if region.any()]
    return float(np.mean([close[region].mean() for region in regions]))


def _size_of(image) -> int:
    if isinstance(image, Image.Image):
        return image.height
    return int(np.asarray(image).shape[0])


def _boundaries(labels: np.ndarray, ignore: np.ndarray | None = None) -> np.ndarray:
    edge = np.zeros(labels.shape, dtype=bool)
    horizontal = labels[:, 1:] != labels[:, :-1]
    vertical = labels[1:] != labels[:-1]
    if ignore is not None:
        horizontal &= ~(ignore[:, 1:] | ignore[:, :-1])
        vertical &= ~(ignore[1:] | ignore[:-1])
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    edge[1:] |= vertical
    edge[:-1] |= vertical
    return edge


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Chebyshev dilation by `radius` pixels."""
    out = mask.copy()
    for _ in range(radius):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        out = grown.copy()
        out[:, 1:] |= grown[:, :-1]
        out[:, :-1] |= grown[:, 1:]
    return out


# --------------------------------------------------------------------------------------------
# The evaluator

_NONE_SHAPE = len(scenes.SHAPES)
_NONE_SUBJECT = len(scenes.SUBJECTS)
_NONE_STYLE = len(scenes.STYLES)
_HEADS = {  # per-cell heads and their class counts
    "shape": len(scenes.SHAPES) + 1,
    "colour": len(scenes.COLOURS),
    "size": len(scenes.SIZES),
    "subject": len(scenes.SUBJECTS) + 1,
}
_PER_CELL = sum(_HEADS.values())
_GLOBAL = len(scenes.STYLES) + 1 + 1  # style (or none), clean logit
_IGNORE = -100


@dataclass
class EvaluatorOutput:
    """Probabilities for a batch of B images: per cell (B, 9, classes), per image (B, ...).
    The last class of `shape`, `subject` and `style` is "none"."""

    shape: np.ndarray
    colour: np.ndarray
    size: np.ndarray
    subject: np.ndarray
    style: np.ndarray
    clean: np.ndarray

    def occupied(self) -> np.ndarray:
        """(B, 9) bool: the evaluator sees an object in the cell."""
        return self.shape.argmax(-1) != _NONE_SHAPE


class _Network(nn.Module):
    """A small CNN read out at the 3 x 3 cells.

    The trunk brings 32 x 32 down to an 8 x 8 map; each cell's anchor region (a 2 x 2 window
    around where its objects are centred) is pooled and read by one head shared by all cells, so
    every cell's example teaches every cell. Style and cleanliness are read from the whole map.
    """

    def __init__(self, width: int = 24):
        super().__init__()

        def block(cin, cout, stride=1):
            return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.SiLU()]

        w = width
        self.trunk = nn.Sequential(
            *block(3, w * 3 // 4), *block(w * 3 // 4, w, 2),  # 16 x 16
            *block(w, w * 3 // 2), *block(w * 3 // 2, 2 * w, 2),  # 8 x 8
            *block(2 * w, 2 * w), *block(2 * w, 3 * w),
        )
        self.cells = nn.Sequential(nn.Conv2d(3 * w, 128, 1), nn.SiLU(), nn.Conv2d(128, _PER_CELL, 1))
        self.picture = nn.Sequential(nn.Linear(3 * w, 128), nn.SiLU(), nn.Linear(128, _GLOBAL))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.trunk(x * 2.0 - 1.0)
        # Cell anchors sit at 1/4, 1/2 and 3/4 of the side: rows and columns 1..2, 3..4, 5..6 of 8.
        anchors = F.avg_pool2d(features[:, :, 1:7, 1:7], 2)  # (B, C, 3, 3)
        cells = self.cells(anchors).flatten(2).transpose(1, 2)  # (B, 9, per cell), row-major
        out, start = {}, 0
        for name, count in _HEADS.items():
            out[name] = cells[..., start : start + count]
            start += count
        picture = self.picture(features.mean(dim=(2, 3)))
        out["style"], out["clean"] = picture[:, :-1], picture[:, -1]
        return out


class Evaluator:
    """The trained classifier; `predict` takes PIL images or (B, H, W, 3) uint8 arrays of any
    size (resized to 32 x 32)."""

    def __init__(self, network: _Network | None = None, width: int = 24):
        self.width = width
        self.network = (network or _Network(width)).eval()

    @torch.no_grad()
    def predict(self, images, batch_size: int = 256, threads: int | None = 1) -> EvaluatorOutput:
        batch = _to_tensor(images)
        parts: dict[str, list[np.ndarray]] = {}
        for start in range(0, batch.shape[0], batch_size):
            with _torch_threads(threads):
                logits = self.network(batch[start : start + batch_size])
            for name, value in logits.items():
                probability = torch.sigmoid(value) if name == "clean" else value.softmax(-1)
                parts.setdefault(name, []).append(probability.numpy())
        if not parts:
            empty = {name: np.zeros((0, 9, count), np.float32) for name, count in _HEADS.items()}
            return EvaluatorOutput(**empty, style=np.zeros((0, _NONE_STYLE + 1), np.float32),
                                   clean=np.zeros((0,), np.float32))
        return EvaluatorOutput(**{name: np.concatenate(values) for name, values in parts.items()})

    def save(self, path) -> None:
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous() for k, v in self.network.state_dict().items()}
        metadata = {"format": "bench-evaluator", "version": "1", "width": str(self.width),
                    "catalogue": json.dumps(_catalogue())}
        save_file(state, str(path), metadata=metadata)

    @classmethod
    def load(cls, path) -> Evaluator:
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("format") != "bench-evaluator":
            raise ValueError(f"{path}: not a benchmark evaluator file")
        if json.loads(metadata.get("catalogue", "null")) != _catalogue():
            raise ValueError(f"{path}: trained on another catalogue of shapes, colours, subjects or styles")
        evaluator = cls(width=int(metadata.get("width", 24)))
        evaluator.network.load_state_dict(load_file(str(path)))
        return evaluator


@contextmanager
def _torch_threads(count: int | None) -> Iterator[None]:
    """torch's CPU thread count set to `count` for the block (None: left alone).

    The network is small enough that one thread keeps up; on a busy machine a second one that
    spins waiting for a core costs far more than it gives (a hundredfold, measured).
    """
    if count is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _catalogue() -> dict:
    return {"shapes": list(scenes.SHAPES), "colours": list(scenes.COLOURS), "sizes": list(scenes.SIZES),
            "subjects": len(scenes.SUBJECTS), "styles": [s.name for s in scenes.STYLES]}


def _to_tensor(images) -> torch.Tensor:
    if isinstance(images, np.ndarray) and images.ndim == 4:
        arrays = [images[i] for i in range(images.shape[0])]
    else:
        arrays = list(images)
    stacked = np.stack([pixels_of(a, EVALUATOR_SIZE) for a in arrays]) if arrays else np.zeros((0, 32, 32, 3))
    return torch.from_numpy(stacked.astype(np.float32) / 255.0).permute(0, 3, 1, 2).contiguous()


# -- training data ------------------------------------------------------------------------------


def _evaluator_scene(rng: np.random.Generator) -> Scene:
    style = scenes.STYLES[int(rng.integers(len(scenes.STYLES)))] if rng.random() < 0.4 else None
    count = int(rng.choice([1, 2, 3], p=[0.5, 0.38, 0.12]))
    subjects = []
    if rng.random() < 0.5:
        subjects = [int(s) for s in rng.choice(len(scenes.SUBJECTS), size=int(rng.integers(1, min(count, 2) + 1)),
                                               replace=False)]
    return scenes.sample_scene(rng, num_objects=count, subject=subjects, style=style)


def _targets(scene: Scene) -> dict[str, np.ndarray]:
    shape = np.full(9, _NONE_SHAPE)
    colour = np.full(9, _IGNORE)
    size = np.full(9, _IGNORE)
    subject = np.full(9, _NONE_SUBJECT)
    for obj in scene.objects:
        cell = obj.cell
        shape[cell] = scenes.SHAPES.index(obj.shape)
        size[cell] = list(scenes.SIZES).index(obj.size)
        if scene.style is None:  # a style repaints colours; their names no longer apply
            colour[cell] = list(scenes.COLOURS).index(obj.colour)
        if obj.subject is not None:
            subject[cell] = obj.subject
    style = _NONE_STYLE if scene.style is None else scenes.style_by_name(scene.style).id
    return {"shape": shape, "colour": colour, "size": size, "subject": subject, "style": np.array(style),
            "clean": np.array(1.0)}


def _corrupt(rng: np.random.Generator, image: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, bool]:
    """A spoiled picture (float 0..1), standing in for what an undertrained generator draws, and
    whether its content is gone (blobs, pure noise: no object is left to read)."""
    kind = int(rng.integers(5))
    size = image.shape[0]
    if kind == 0:  # noise on top
        spoiled = image + rng.normal(0.0, rng.uniform(0.08, 0.35), image.shape)
    elif kind == 1:  # blur
        spoiled = _blur(image, float(rng.uniform(1.0, 2.5)))
    elif kind == 2:  # ghosting: two pictures mixed
        alpha = rng.uniform(0.3, 0.7)
        spoiled = alpha * image + (1 - alpha) * other
    elif kind == 3:  # smooth colour blobs, a little noise
        coarse = rng.uniform(0.0, 1.0, (int(rng.integers(2, 6)),) * 2 + (3,))
        blobs = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8), "RGB").resize(
            (size, size), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
        spoiled = blobs + rng.normal(0.0, 0.05, image.shape)
    else:
        spoiled = rng.uniform(0.0, 1.0, image.shape) if rng.random() < 0.5 else rng.normal(0.5, 0.25, image.shape)
    return np.clip(spoiled, 0.0, 1.0), kind >= 3


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    radius = int(math.ceil(2.5 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    padded = np.pad(image, ((radius, radius), (radius, radius), (0, 0)), mode="edge")
    rows = sum(w * padded[i : i + image.shape[0]] for i, w in enumerate(taps))
    return sum(w * rows[:, i : i + image.shape[1]] for i, w in enumerate(taps))


def _render_pool(rng: np.random.Generator, count: int, corrupt_share: float = 0.2):
    images = np.zeros((count, EVALUATOR_SIZE, EVALUATOR_SIZE, 3), dtype=np.float32)
    targets = {name: [] for name in ("shape", "colour", "size", "subject", "style", "clean")}
    for i in range(count):
        scene = _evaluator_scene(rng)
        images[i] = np.asarray(scenes.render(scene, EVALUATOR_SIZE), dtype=np.float32) / 255.0
        for name, value in _targets(scene).items():
            targets[name].append(value)
    for i in np.flatnonzero(rng.random(count) < corrupt_share):
        other = images[int(rng.integers(count))]
        images[i], destroyed = _corrupt(rng, images[i], other)
        for name in ("shape", "colour", "size", "subject"):
            targets[name][i] = np.full(9, _IGNORE)
        if destroyed:  # nothing left to read: every cell is empty
            targets["shape"][i] = np.full(9, _NONE_SHAPE)
            targets["subject"][i] = np.full(9, _NONE_SUBJECT)
        targets["style"][i] = np.array(_IGNORE)
        targets["clean"][i] = np.array(0.0)
    tensors = {name: torch.from_numpy(np.stack(values)) for name, values in targets.items()}
    tensors["clean"] = tensors["clean"].float()
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), tensors


def _loss(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    total = logits["clean"].new_zeros(())
    occupied = (targets["shape"] != _NONE_SHAPE) & (targets["shape"] != _IGNORE)
    for name in _HEADS:
        target = targets[name].reshape(-1)
        if (target != _IGNORE).any():
            total = total + F.cross_entropy(logits[name].reshape(-1, _HEADS[name]), target, ignore_index=_IGNORE)
        if name in ("shape", "subject") and occupied.any():
            # Most cells are empty; without this term "none" would outweigh telling shapes apart.
            total = total + F.cross_entropy(logits[name][occupied], targets[name][occupied])
    if (targets["style"] != _IGNORE).any():
        total = total + F.cross_entropy(logits["style"], targets["style"], ignore_index=_IGNORE)
    return total + F.binary_cross_entropy_with_logits(logits["clean"], targets["clean"])


def train_evaluator(
    seed: int = 0,
    steps: int = 900,
    *,
    batch_size: int = 48,
    pool_size: int = 6000,
    width: int = 24,
    learning_rate: float = 3e-3,
    threads: int | None = 1,
    log: Callable[[int, float], None] | None = None,
) -> Evaluator:
    """Train the evaluator on `pool_size` fresh renders (a fifth of them corrupted) for `steps`.

    Deterministic for a seed on one machine. Runs on `threads` CPU threads (see `_torch_threads`;
    None keeps torch's setting). `log(step, loss)` is called every 100 steps.
    """
    with _torch_threads(threads):
        return _train(seed, steps, batch_size, pool_size, width, learning_rate, log)


def _train(seed, steps, batch_size, pool_size, width, learning_rate, log) -> Evaluator:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 99])
    images, targets = _render_pool(rng, pool_size)
    network = _Network(width)
    optimizer = torch.optim.AdamW(network.parameters(), lr=learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=max(1, steps),
                                                   pct_start=0.15)
    network.train()
    for step in range(steps):
        index = torch.randint(0, pool_size, (batch_size,), generator=generator)
        logits = network(images[index])
        loss = _loss(logits, {name: value[index] for name, value in targets.items()})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if log is not None and (step % 100 == 0 or step == steps - 1):
            log(step, float(loss.detach()))
    return Evaluator(network.eval(), width)


def evaluator_accuracy(evaluator: Evaluator, n: int = 300, seed: int = 1) -> dict[str, float]:
    """Accuracy on fresh clean renders: shape, colour, size, position (the object's cell, and no
    other, seen as occupied) on single plain objects; subject id on single subjects, unstyled
    ("subject") and in every style in turn ("styled_subject": harder, as a style may repaint
    the colours that tell two subjects apart); style on styled scenes; and the clean/corrupted
    decision on renders and corruptions of them."""
    rng = np.random.default_rng([seed, 98])
    plain = [scenes.sample_scene(rng, num_objects=1) for _ in range(n)]
    subjects = [scenes.sample_scene(rng, num_objects=1, subject=int(rng.integers(len(scenes.SUBJECTS))))
                for _ in range(n)]
    styled = [scenes.sample_scene(rng, style=scenes.STYLES[i % len(scenes.STYLES)]) for i in range(n)]
    styled_subjects = [scenes.sample_scene(rng, num_objects=1, subject=int(rng.integers(len(scenes.SUBJECTS))),
                                           style=scenes.STYLES[i % len(scenes.STYLES)]) for i in range(n)]
    out = evaluator.predict([scenes.render(s) for s in plain + subjects + styled])
    styled_out = evaluator.predict([scenes.render(s) for s in styled_subjects])
    cells = np.array([s.objects[0].cell for s in plain + subjects])
    rows = np.arange(2 * n)
    truth = {
        "shape": np.array([scenes.SHAPES.index(s.objects[0].shape) for s in plain]),
        "colour": np.array([list(scenes.COLOURS).index(s.objects[0].colour) for s in plain]),
        "size": np.array([list(scenes.SIZES).index(s.objects[0].size) for s in plain]),
    }
    result = {name: float((getattr(out, name)[rows[:n], cells[:n]].argmax(-1) == value).mean())
              for name, value in truth.items()}
    expected = np.zeros((n, 9), dtype=bool)
    expected[np.arange(n), cells[:n]] = True
    result["position"] = float((out.occupied()[:n] == expected).all(axis=1).mean())
    subject_truth = np.array([s.objects[0].subject for s in subjects])
    result["subject"] = float((out.subject[rows[n:], cells[n:]].argmax(-1) == subject_truth).mean())
    styled_cells = [s.objects[0].cell for s in styled_subjects]
    styled_truth = np.array([s.objects[0].subject for s in styled_subjects])
    result["styled_subject"] = float((styled_out.subject[np.arange(n), styled_cells].argmax(-1) == styled_truth).mean())
    style_truth = np.array([scenes.style_by_name(s.style).id for s in styled])
    result["style"] = float((out.style[2 * n :].argmax(-1) == style_truth).mean())
    clean = np.asarray([np.asarray(scenes.render(s), dtype=np.float32) / 255.0 for s in plain])
    spoiled = [_corrupt(rng, clean[i], clean[(i + 1) % n])[0] for i in range(n)]
    spoiled_out = evaluator.predict(np.round(np.stack(spoiled) * 255).astype(np.uint8))
    result["clean"] = float(((out.clean[:n] > 0.5).mean() + (spoiled_out.clean < 0.5).mean()) / 2)
    return result


# --------------------------------------------------------------------------------------------
# Scores

SC_COMPONENTS: dict[str, tuple[str, ...]] = {
    "text_to_image": ("text",),
    "edge_to_image": ("control", "text"),
    "sketch_to_image": ("control", "text"),
    "mask_to_image": ("control", "text"),
    "depth_to_image": ("control", "text"),
    "subject": ("subject", "text"),
    "styled_generation": ("style", "text"),
    "style_transfer": ("control", "style"),
    "inpainting": ("hole",),
    "subject_style": ("subject", "style", "text"),
    "multi_subject": ("subject", "text"),
    "control_subject": ("control", "subject"),
    "control_style": ("control", "style"),
}


def score_example(example, generated_image, evaluator: Evaluator) -> dict:
    """The metrics of one generated image for one `BenchExample` (see `score_batch`)."""
    return score_batch([example], [generated_image], evaluator)[0]


def score_batch(examples: Sequence, images: Sequence, evaluator: Evaluator) -> list[dict]:
    """Per example: its metrics, "sc", "pq" and "overall" = sqrt(sc * pq), and "task".

    Generated images of another size are resized to the example's target size first. Metrics a
    task does not use are left out; a component that does not apply (depth order without
    overlapping objects) is None and left out of SC. Every example has "colour" (named colour at
    its place, None where no colour is named), which counts towards SC only within "text".
    """
    if len(examples) != len(images):
        raise ValueError(f"images: {len(images)} images for {len(examples)} examples")
    output = evaluator.predict(list(images))
    return [_score(example, image, output, i) for i, (example, image) in enumerate(zip(examples, images))]


def _score(example, image, output: EvaluatorOutput, row: int) -> dict:
    scene, size = example.scene, example.target.height
    pixels = pixels_of(image, size).astype(np.uint8)
    components = SC_COMPONENTS.get(example.task)
    if components is None:
        raise ValueError(f"task: no score defined for {example.task!r}")
    metrics: dict = {"task": example.task}
    parts: list[float] = []
    for component in components:
        if component == "text":
            metrics.update(_text_alignment(scene, output, row))
            parts.append(metrics["text"])
        elif component == "control":
            control = _control_scores(example.meta.get("control"), pixels, scene, size)
            metrics.update(control)
            values = [v for v in control.values() if v is not None]
            metrics["control"] = float(np.mean(values))
            parts.append(metrics["control"])
        elif component == "subject":
            hits = [output.subject[row, o.cell].argmax() == o.subject for o in scene.objects if o.subject is not None]
            metrics["subject"] = float(np.mean(hits))
            parts.append(metrics["subject"])
        elif component == "style":
            metrics["style"] = float(output.style[row].argmax() == scenes.style_by_name(scene.style).id)
            parts.append(metrics["style"])
        elif component == "hole":
            metrics["hole"] = hole_agreement(pixels, example.target, example.meta["hole"], scene=scene)
            kept = 255 - np.asarray(example.meta["hole"].convert("L"))
            metrics["kept"] = hole_agreement(pixels, example.target, kept)
            parts.append(metrics["hole"])
    metrics["colour"] = colour_at_place(scene, output, row)
    metrics["sc"] = float(np.mean(parts))
    metrics["pq"] = float(output.clean[row])
    metrics["overall"] = math.sqrt(metrics["sc"] * metrics["pq"])
    return metrics


def _control_scores(modality: str | None, pixels: np.ndarray, scene: Scene, size: int) -> dict:
    if modality in ("edge", "sketch"):
        truth = np.asarray(scenes.render_edges(scene, size)) > 0
        return {"edge_f1": edge_f1(extract_edges(pixels, scene, size), truth)}
    if modality == "mask":
        return {"mask_iou": mask_iou(pixels, scene, size)}
    if modality == "depth":
        return {"mask_iou": mask_iou(pixels, scene, size), "depth_order": depth_order(pixels, scene, size)}
    raise ValueError(f"meta.control: expected edge, sketch, mask or depth, got {modality!r}")


def _text_alignment(scene: Scene, output: EvaluatorOutput, row: int) -> dict:
    """Layout (IoU of the cells seen occupied with the objects' cells: a picture full of things
    scores as badly as an empty one) and, per object at its ground-truth cell, shape, colour and
    size; "text" is the mean of all these checks."""
    truth = np.zeros(9, dtype=bool)
    truth[[obj.cell for obj in scene.objects]] = True
    seen = output.occupied()[row]
    checks: dict[str, list[float]] = {"position": [float((seen & truth).sum() / (seen | truth).sum())],
                                      "shape": [], "colour": [], "size": []}
    for obj in scene.objects:
        cell = obj.cell
        checks["size"].append(float(output.size[row, cell].argmax() == list(scenes.SIZES).index(obj.size)))
        if obj.subject is not None:
            continue
        checks["shape"].append(float(output.shape[row, cell].argmax() == scenes.SHAPES.index(obj.shape)))
    checks["colour"] = _colour_checks(scene, output, row)
    result = {name: float(np.mean(values)) for name, values in checks.items() if values}
    result["text"] = float(np.mean([v for values in checks.values() for v in values]))
    return result


def colour_at_place(scene: Scene, output: EvaluatorOutput, row: int) -> float | None:
    """The share of the scene's plain objects whose colour the evaluator reads at their cell; None
    where there is none, or a style repaints their colours (the caption's names no longer apply)."""
    checks = _colour_checks(scene, output, row)
    return float(np.mean(checks)) if checks else None


def _colour_checks(scene: Scene, output: EvaluatorOutput, row: int) -> list[float]:
    if scene.style is not None:
        return []
    colours = list(scenes.COLOURS)
    return [float(output.colour[row, obj.cell].argmax() == colours.index(obj.colour))
            for obj in scene.objects if obj.subject is None]


def summarise(scores: Sequence[dict]) -> dict[str, dict[str, float]]:
    """Mean of every numeric metric per task (None values skipped), plus "count"."""
    grouped: dict[str, dict[str, list[float]]] = {}
    for score in scores:
        bucket = grouped.setdefault(score["task"], {})
        for name, value in score.items():
            if name != "task" and value is not None:
                bucket.setdefault(name, []).append(float(value))
    return {
        task: {"count": len(values["sc"]), **{name: float(np.mean(v)) for name, v in values.items()}}
        for task, values in grouped.items()
    }

