"""Stage-2 instruction tuning data: task builders, a weighted task mixture, and JSONL instructions.

Instruct-Imagen's second stage tunes the model on a mix of tasks, each a way of turning ordinary
image-text data into a multi-modal instruction and the image it should produce. A `Task` does
that on the fly: `build(unit, rng, phrasings)` picks one of its phrasings, makes its context
images (edge maps, masks, reference images) and returns a `TrainingExample`, or None when the
unit cannot be used. `TaskMixture` draws tasks by weight into a deterministic dataset.

Units are single `ImageTextItem`s, or for the group tasks an `ItemGroup` of items sharing a label.
Item `extra` keys the tasks read:

- "depth": a depth map (path or PIL image) aligned with the image; `depth_to_image` uses only
  these, it never estimates depth.
- "mask": a segmentation mask (path or PIL image, white object); else `mask_to_image` finds the
  object by colour difference from the border (`controls.shape_mask`).
- "subject" / "style": group labels for `subject`, `styled_generation` and `style_transfer`;
  "subject_name" / "style_name" give the words put in marker texts (default: the label).

Paths in `extra` are used as they are: dataset readers resolve them. Every task needs a caption
(an empty one, or one containing "[ref#" look-alikes, makes the item unusable).

Phrasings: each task keeps its templates in one table (`Task.templates`, at least three). The
last template of every task is held out: `phrasings="train"` never uses it, `"test"` uses only
it, `"all"` uses every template.

Inpainting: the one context is the target with a hole painted grey (`controls.apply_mask`),
modality "image" ("[ref#1] a masked image"). Its `Context.mask` stays None, because that field
says where a context applies in the target and this context applies everywhere: the kept pixels
must be reproduced and the grey marks what to invent. The "mask" modality keeps its single
meaning, a shape mask of the object to generate, and is not reused for holes.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .. import controls
from .data import ImageTextItem, TrainingExample
from ..instruction import (
    DEFAULT_MODALITIES,
    IMAGE_FORMATS,
    Context,
    InstructionError,
    MultiModalInstruction,
    parse_markers,
    to_rgb,
)

__all__ = [
    "PAPER_MIX",
    "PHRASING_SPLITS",
    "TASKS",
    "DepthToImage",
    "EdgeToImage",
    "Inpainting",
    "InstructionJsonlDataset",
    "ItemGroup",
    "MaskToImage",
    "SketchToImage",
    "StyleTransfer",
    "StyledGeneration",
    "SubjectGeneration",
    "Task",
    "TaskMixture",
    "TextToImage",
    "check_mix",
    "parse_mix",
]

PHRASING_SPLITS = ("train", "test", "all")


@dataclass(frozen=True)
class ItemGroup:
    """Items sharing one `extra` label (one subject, one style), in dataset order."""

    label: str
    name: str
    items: tuple[ImageTextItem, ...]


# --------------------------------------------------------------------------------------------
# Tasks


class Task:
    """One way of turning data into (instruction, target) pairs.

    Subclasses set `name`, `modalities` (of their contexts), `templates` (the phrasing table; the
    last one is held out for testing) and `requirement` (what data they need, for messages), and
    implement `units` and `build`.
    """

    name: str = ""
    modalities: tuple[str, ...] = ()
    templates: tuple[str, ...] = ()
    requirement: str = "items with a caption"

    def units(self, items: Sequence[ImageTextItem]) -> list[Any]:
        """What `build` accepts, drawn from `items`: the items (or groups) this task can use."""
        return [item for item in items if _usable_caption(item.caption)]

    def build(self, unit: Any, rng: np.random.Generator, phrasings: str = "train") -> TrainingExample | None:
        raise NotImplementedError

    def phrasing_table(self, phrasings: str = "train") -> tuple[str, ...]:
        """The templates a split may use."""
        _check_phrasings(phrasings)
        if phrasings == "train":
            return self.templates[:-1]
        return self.templates[-1:] if phrasings == "test" else self.templates

    def phrase(self, rng: np.random.Generator, phrasings: str, **fields: str) -> str:
        table = self.phrasing_table(phrasings)
        return table[int(rng.integers(len(table)))].format(**fields)

    def example(self, text: str, contexts: list[Context], target: Image.Image) -> TrainingExample:
        instruction = MultiModalInstruction(text=text, contexts=contexts)
        unreferenced = instruction.validate(known_modalities=DEFAULT_MODALITIES)
        if unreferenced:  # a template that forgot a marker: a bug here, not bad data
            raise InstructionError(f"{self.name}: {unreferenced[0]}")
        return TrainingExample(instruction=instruction, target=target, task=self.name)


class TextToImage(Task):
    name = "text_to_image"
    templates = (
        "{caption}",
        "Generate an image: {caption}",
        "Create a picture from this description: {caption}",
        "Render the following scene: {caption}",
    )

    def build(self, unit, rng, phrasings="train"):
        return self.example(self.phrase(rng, phrasings, caption=_caption(unit)), [], unit.load())


class _ControlTask(Task):
    """A control map made from (or supplied with) the target, as the single context [ref#1]."""

    modality: str = ""

    def control(self, item: ImageTextItem, target: Image.Image, rng) -> tuple[Image.Image, str] | None:
        """The control image and its marker text, or None if the item gives none."""
        raise NotImplementedError

    def build(self, unit, rng, phrasings="train"):
        target = unit.load()
        made = self.control(unit, target, rng)
        if made is None:
            return None
        image, marker_text = made
        context = Context(id=1, modality=self.modality, text=marker_text, image=image)
        text = self.phrase(rng, phrasings, ref=context.marker, caption=_caption(unit))
        return self.example(text, [context], target)


class EdgeToImage(_ControlTask):
    name = "edge_to_image"
    modality = "edge"
    modalities = ("edge",)
    templates = (
        "Generate an image following the edges of {ref}: {caption}",
        "Create a picture whose outlines match {ref}: {caption}",
        "Use {ref} as the edge map and render: {caption}",
        "Paint an image that follows the contours in {ref}: {caption}",
    )

    def control(self, item, target, rng):
        return _edge_control(target, rng, 1)


class SketchToImage(_ControlTask):
    name = "sketch_to_image"
    modality = "sketch"
    modalities = ("sketch",)
    templates = (
        "Generate an image from the sketch {ref}: {caption}",
        "Turn the sketch {ref} into a finished picture: {caption}",
        "Create an image that follows the pencil strokes of {ref}: {caption}",
        "Complete the drawing {ref} as a detailed image: {caption}",
    )

    def control(self, item, target, rng):
        strokes = controls.sketch(target)
        if _coverage(255 - np.asarray(strokes)) < _MIN_EDGE_COVERAGE:
            return None
        return strokes, "[ref#1] a sketch"


class MaskToImage(_ControlTask):
    name = "mask_to_image"
    modality = "mask"
    modalities = ("mask",)
    templates = (
        "Generate an image whose main object fills the shape of {ref}: {caption}",
        "Create a picture with the foreground shaped like {ref}: {caption}",
        "Use {ref} as the shape mask of the object: {caption}",
        "Place the subject inside the white area of {ref}: {caption}",
    )

    def control(self, item, target, rng):
        supplied = item.extra.get("mask")
        try:
            segmentation = None if supplied is None else controls.load_control_image(supplied)
        except (OSError, ValueError, TypeError):
            return None
        mask = controls.shape_mask(target, segmentation)
        # No object found, or "object" is the whole frame: nothing to learn a shape from.
        if not 0.01 <= _coverage(np.asarray(mask)) <= 0.95:
            return None
        return mask, "[ref#1] a shape mask"


class DepthToImage(_ControlTask):
    name = "depth_to_image"
    modality = "depth"
    modalities = ("depth",)
    requirement = 'items with a caption and a supplied extra["depth"] map'
    templates = (
        "Generate an image with the depth layout of {ref}: {caption}",
        "Create a picture whose scene depth follows {ref}: {caption}",
        "Use {ref} as the depth map and render: {caption}",
        "Render a scene matching the near and far regions of {ref}: {caption}",
    )

    def units(self, items):
        return [item for item in super().units(items) if item.extra.get("depth") is not None]

    def control(self, item, target, rng):
        try:
            depth = controls.depth_map(item, target.size)
        except (OSError, ValueError, TypeError):  # unreadable or malformed map: skip, counted
            return None
        return None if depth is None else (depth, "[ref#1] a depth map")


class Inpainting(_ControlTask):
    name = "inpainting"
    modality = "image"
    modalities = ("image",)
    templates = (
        "Fill in the grey region of {ref}: {caption}",
        "Complete the missing part of {ref}: {caption}",
        "Inpaint the masked area of {ref} so that it shows: {caption}",
        "Repair the hole in {ref}: {caption}",
    )

    def control(self, item, target, rng):
        hole = controls.inpainting_mask(target.size, rng)
        return controls.apply_mask(target, hole), "[ref#1] a masked image"


class _GroupTask(Task):
    """Target and references drawn from one `ItemGroup` (items sharing an `extra` label)."""

    label_key: str = ""
    most_references: int = 1

    def units(self, items):
        groups: dict[str, list[ImageTextItem]] = {}
        for item in super().units(items):
            label = item.extra.get(self.label_key)
            if label is not None and str(label).strip():
                groups.setdefault(str(label), []).append(item)
        units = []
        for label, members in groups.items():
            name = str(members[0].extra.get(f"{self.label_key}_name") or label).strip()
            # A target plus at least one reference needs two items.
            if len(members) >= 2 and _usable_caption(name):
                units.append(ItemGroup(label=label, name=name, items=tuple(members)))
        return units

    def marker_words(self, name: str) -> str:
        """What a reference's marker text says besides [ref#k]."""
        return name

    def build(self, unit, rng, phrasings="train"):
        """A target and references of its group, each a context of the task's modality."""
        target, references = self.draw(unit, rng, self.most_references)
        contexts = [
            Context(id=k, modality=self.modalities[0], text=f"[ref#{k}] {self.marker_words(unit.name)}",
                    image=item.load())
            for k, item in enumerate(references, start=1)
        ]
        text = self.phrase(rng, phrasings, refs=_join_markers(contexts), name=unit.name, caption=_caption(target))
        return self.example(text, contexts, target.load())

    def draw(self, group: ItemGroup, rng, most_references: int) -> tuple[ImageTextItem, list[ImageTextItem]]:
        """A target and 1..most_references other items of the group, all distinct."""
        count = int(rng.integers(1, min(most_references, len(group.items) - 1) + 1))
        chosen = rng.choice(len(group.items), size=count + 1, replace=False)
        return group.items[chosen[0]], [group.items[i] for i in chosen[1:]]


class SubjectGeneration(_GroupTask):
    name = "subject"
    label_key = "subject"
    modalities = ("subject",)
    most_references = 3
    requirement = 'at least two captioned items sharing an extra["subject"] label'
    templates = (
        "Generate an image of {refs}: {caption}",
        "Create a picture of the {name} shown in {refs}: {caption}",
        "Show {refs} in a new scene: {caption}",
        "Using {refs} as reference for the {name}, render: {caption}",
    )


class StyledGeneration(_GroupTask):
    name = "styled_generation"
    label_key = "style"
    modalities = ("style",)
    most_references = 2
    requirement = 'at least two captioned items sharing an extra["style"] label'
    templates = (
        "Generate an image in the style of {refs}: {caption}",
        "Create a picture painted like {refs}: {caption}",
        "Render in the artistic style of {refs}: {caption}",
        "Borrow the look of {refs} for this image: {caption}",
    )

    def marker_words(self, name: str) -> str:
        return _style_words(name)


class StyleTransfer(_GroupTask):
    """Content as the target's own edge map ([ref#1], "edge") plus a style image of the same
    style from another item ([ref#2], "style"): the target is that content in that style."""

    name = "style_transfer"
    label_key = "style"
    modalities = ("edge", "style")
    requirement = 'at least two captioned items sharing an extra["style"] label'
    templates = (
        "Render the content of {content} in the style of {style}: {caption}",
        "Transfer the style of {style} onto the layout of {content}: {caption}",
        "Keep the edges of {content} and paint them like {style}: {caption}",
        "Restyle the scene outlined in {content} after {style}: {caption}",
    )

    def build(self, unit, rng, phrasings="train"):
        target, (reference,) = self.draw(unit, rng, 1)
        target_image = target.load()
        made = _edge_control(target_image, rng, 1)
        if made is None:
            return None
        content = Context(id=1, modality="edge", text=made[1], image=made[0])
        style_text = f"[ref#2] {_style_words(unit.name)}"
        style = Context(id=2, modality="style", text=style_text, image=reference.load())
        markers = {"content": content.marker, "style": style.marker}
        text = self.phrase(rng, phrasings, **markers, caption=_caption(target))
        return self.example(text, [content, style], target_image)


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        TextToImage(),
        EdgeToImage(),
        SketchToImage(),
        MaskToImage(),
        DepthToImage(),
        SubjectGeneration(),
        StyledGeneration(),
        StyleTransfer(),
        Inpainting(),
    )
}

# Mixing ratios in the spirit of Instruct-Imagen's stage-2 mix (Table 1 of the paper): text-to-image
# keeps the largest single share so the base ability is not forgotten, the four control-to-image
# tasks together take a quarter (edges the most, being the most common control), subject-driven
# generation the largest multi-modal share, then styled generation, style transfer and inpainting.
# These are our own round numbers, an approximation of the paper's mix, not figures copied from it.
PAPER_MIX: dict[str, float] = {
    "text_to_image": 0.30,
    "edge_to_image": 0.10,
    "sketch_to_image": 0.05,
    "mask_to_image": 0.05,
    "depth_to_image": 0.05,
    "subject": 0.15,
    "styled_generation": 0.10,
    "style_transfer": 0.10,
    "inpainting": 0.10,
}


# --------------------------------------------------------------------------------------------
# Mixing


def check_mix(mix: Mapping[str, Any], registry: Mapping[str, Task] | None = None) -> dict[str, float]:
    """The mix as {task name: float weight}; raise ValueError naming the task at fault.

    Weights must be finite and non-negative, and at least one positive. They need not sum to 1.
    """
    known = TASKS if registry is None else registry
    if not isinstance(mix, Mapping):
        raise ValueError(f"mix: expected a mapping of task name to weight, got {type(mix).__name__}")
    weights = {}
    for name, weight in mix.items():
        if name not in known:
            close = difflib.get_close_matches(str(name)[:64], list(known), n=1)
            hint = f' (did you mean "{close[0]}"?)' if close else ""
            raise ValueError(f"{name}: unknown task{hint}; known tasks are {', '.join(known)}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ValueError(f"{name}: weight must be a number, got {type(weight).__name__}")
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"{name}: weight must be a finite number >= 0, got {weight}")
        weights[name] = float(weight)
    if not any(weight > 0 for weight in weights.values()):
        raise ValueError("mix: at least one task needs a positive weight")
    return weights


def parse_mix(text: str, registry: Mapping[str, Task] | None = None) -> dict[str, float]:
    """ "text_to_image=0.3,edge_to_image=0.2" (or "paper" for PAPER_MIX) as a checked mix."""
    if text.strip() == "paper":
        return dict(PAPER_MIX)
    mix: dict[str, float] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        name, sep, value = (piece.strip() for piece in part.partition("="))
        if not sep or not name:
            raise ValueError(f"mix: expected name=weight, got {part.strip()!r}")
        if name in mix:
            raise ValueError(f"{name}: given twice")
        try:
            mix[name] = float(value)
        except ValueError:
            raise ValueError(f"{name}: weight must be a number, got {value!r}") from None
    return check_mix(mix, registry)


class TaskMixture:
    """An indexable, deterministic dataset of TrainingExamples drawn from weighted tasks.

    Example `i` depends only on (seed, i): an rng seeded from both draws the task by weight, then
    a unit of that task uniformly (groups count once each, whatever their size), then the task
    builds it. A unit the task cannot use (None) is counted and another unit of the same task is
    drawn, up to `max_draws` times, so the task frequencies follow the weights.

    Tasks with no usable data (no depth maps, no shared subject labels, ...) are disabled with
    the reason recorded in `report["disabled"]` and the remaining weights renormalised; with
    `strict=True` that raises ValueError naming the task instead. The counts in `report` are
    per process: with DataLoader workers each worker keeps its own.
    """

    def __init__(
        self,
        tasks: Mapping[str, float] | str,
        items: Sequence[ImageTextItem],
        seed: int = 0,
        phrasings: str = "train",
        *,
        length: int | None = None,
        strict: bool = False,
        max_draws: int = 8,
        registry: Mapping[str, Task] | None = None,
    ):
        self.registry = TASKS if registry is None else registry
        mix = parse_mix(tasks, self.registry) if isinstance(tasks, str) else check_mix(tasks, self.registry)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed: expected an integer >= 0, got {seed!r}")
        _check_phrasings(phrasings)
        self.seed, self.phrasings, self.max_draws = int(seed), phrasings, max(1, int(max_draws))
        self.length = len(items) if length is None else int(length)
        if self.length < 0:
            raise ValueError(f"length: must be >= 0, got {length}")
        self.disabled: dict[str, str] = {}
        self.units: dict[str, list[Any]] = {}
        for name, weight in mix.items():
            if weight <= 0:
                continue
            task = self.registry[name]
            units = task.units(items)
            if units:
                self.units[name] = units
                continue
            reason = f"no usable data: needs {task.requirement}"
            if strict:
                raise ValueError(f"{name}: {reason}")
            self.disabled[name] = reason
        if not self.units:
            detail = "; ".join(f"{name}: {reason}" for name, reason in self.disabled.items())
            raise ValueError(f"mix: no task has usable data ({detail})")
        self.names = list(self.units)
        total = sum(mix[name] for name in self.names)
        self.weights = {name: mix[name] / total for name in self.names}
        self._probabilities = np.array([self.weights[name] for name in self.names])
        self._built: Counter[str] = Counter()
        self._skipped: Counter[str] = Counter()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> TrainingExample:
        rng = self._rng(index)
        name = self._draw_task(rng)
        task, units = self.registry[name], self.units[name]
        for _ in range(self.max_draws):
            example = task.build(units[int(rng.integers(len(units)))], rng, self.phrasings)
            if example is not None:
                self._built[name] += 1
                return example
            self._skipped[name] += 1
        raise RuntimeError(
            f"{name}: {self.max_draws} draws in a row gave no usable example (index {index}); "
            "check that task's data or lower its weight"
        )

    def __iter__(self) -> Iterator[TrainingExample]:
        return (self[i] for i in range(self.length))

    def task_for(self, index: int) -> str:
        """The task example `index` is drawn from, without building it."""
        return self._draw_task(self._rng(index))

    @property
    def report(self) -> dict[str, dict]:
        return {
            "weights": dict(self.weights),
            "disabled": dict(self.disabled),
            "units": {name: len(units) for name, units in self.units.items()},
            "built": dict(self._built),
            "skipped": dict(self._skipped),
        }

    def _rng(self, index: int) -> np.random.Generator:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"index: expected an integer, got {type(index).__name__}")
        position = index + self.length if index < 0 else index
        if not 0 <= position < self.length:
            raise IndexError(f"index {index} is out of range for {self.length} examples")
        return np.random.default_rng([self.seed, int(position)])

    def _draw_task(self, rng: np.random.Generator) -> str:
        return self.names[int(rng.choice(len(self.names), p=self._probabilities))]


# --------------------------------------------------------------------------------------------
# Ready-made instructions from JSONL


class InstructionJsonlDataset:
    """TrainingExamples (task "instruction") from a JSONL file of ready-made instructions.

    Each line is `{"instruction": {...instruction JSON v1...}, "target": "image.png"}`, or the
    instruction's own keys at top level plus "target". Relative paths (context images, masks,
    targets) resolve against the JSONL file's folder; given `root`, every path must stay inside it.

    Every line is parsed and its images decoded once on construction, so a bad line is found up
    front: it is skipped and recorded in `bad_lines` as (line number, message). Instruction warnings
    (an unreferenced context) keep the line and are recorded in `warnings`. Blank lines are ignored.
    """

    def __init__(self, path: str | os.PathLike, *, root: str | os.PathLike | None = None):
        self.path = Path(path)
        self.base_dir = self.path.absolute().parent
        self.root = None if root is None else Path(root)
        self.bad_lines: list[tuple[int, str]] = []
        self.warnings: list[tuple[int, str]] = []
        self._records: list[tuple[dict, str]] = []
        with open(self.path, "rb") as file:
            for number, raw in enumerate(file, start=1):
                if raw.strip():
                    self._scan(number, raw[3:] if number == 1 and raw.startswith(b"\xef\xbb\xbf") else raw)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> TrainingExample:
        document, target = self._records[index]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # already recorded in self.warnings
            instruction = self._instruction(document)
        return TrainingExample(instruction=instruction, target=self._target(target), task="instruction")

    def __iter__(self) -> Iterator[TrainingExample]:
        return (self[i] for i in range(len(self)))

    @property
    def skipped(self) -> int:
        return len(self.bad_lines)

    def _scan(self, number: int, line: bytes) -> None:
        try:
            # Decoded per line, so one line of bad UTF-8 costs that line, not the file.
            record = json.loads(line.decode("utf-8"), object_pairs_hook=_refuse_duplicate_keys)
            document, target = _split_record(record)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                self._instruction(document)
            self._target(target)
        except (ValueError, OSError) as error:  # InstructionError, JSON and UTF-8 errors included
            self.bad_lines.append((number, str(error)))
            return
        except RecursionError:
            self.bad_lines.append((number, "line: JSON is nested too deeply"))
            return
        self.warnings.extend((number, str(warning.message)) for warning in caught)
        self._records.append((document, target))

    def _instruction(self, document: dict) -> MultiModalInstruction:
        return MultiModalInstruction.from_json(document, base_dir=self.base_dir, root=self.root)

    def _target(self, target: str) -> Image.Image:
        path = os.path.join(self.base_dir, target)
        if self.root is not None:
            real, real_root = os.path.realpath(path), os.path.realpath(self.root)
            if os.path.commonpath([real_root, real]) != real_root:
                raise ValueError(f"target: path escapes the allowed root folder: {target}")
        try:
            with Image.open(path, formats=IMAGE_FORMATS) as image:
                image.load()
                return to_rgb(image)
        except FileNotFoundError:
            raise ValueError(f"target: file not found: {target}") from None
        except (OSError, Image.DecompressionBombError) as error:
            raise ValueError(f"target: not a readable image: {target} ({error})") from None


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    result: dict = {}
    for key, value in pairs:
        if key in result:  # json would keep the last silently; which one was meant is unknowable
            raise ValueError(f"line: duplicate key {key!r} in a JSON object")
        result[key] = value
    return result


def _split_record(record: Any) -> tuple[dict, str]:
    if not isinstance(record, dict):
        raise ValueError(f"line: expected a JSON object, got {type(record).__name__}")
    if "target" not in record:
        raise ValueError("target: missing required key")
    target = record["target"]
    if not isinstance(target, str) or not target:
        raise ValueError("target: expected a non-empty path string")
    if "instruction" in record:
        extra = sorted(set(record) - {"instruction", "target"})
        if extra:
            raise ValueError(f"line: unknown key {extra[0]!r} next to \"instruction\"")
        document = record["instruction"]
    else:
        document = {key: value for key, value in record.items() if key != "target"}
    if not isinstance(document, dict):
        raise ValueError(f"instruction: expected a JSON object, got {type(document).__name__}")
    return document, target


# --------------------------------------------------------------------------------------------
# Helpers

# Below this share of edge pixels the picture is nearly flat: no layout to follow.
_MIN_EDGE_COVERAGE = 0.001


def _edge_control(
    image: Image.Image, rng: np.random.Generator, context_id: int
) -> tuple[Image.Image, str] | None:
    """Canny or soft (HED-like) edges at even odds, with the marker text saying which."""
    marker = f"[ref#{context_id}]"
    if rng.random() < 0.5:
        edges, words = controls.canny_edges(image), "an edge map"
        coverage = _coverage(np.asarray(edges))
    else:
        edges, words = controls.hed_like_edges(image), "a soft edge map"
        coverage = _coverage(np.asarray(edges) >= 128)
    return None if coverage < _MIN_EDGE_COVERAGE else (edges, f"{marker} {words}")


def _check_phrasings(phrasings: Any) -> None:
    if phrasings not in PHRASING_SPLITS:
        raise ValueError(f"phrasings: expected one of {', '.join(PHRASING_SPLITS)}, got {phrasings!r}")


def _coverage(mask: np.ndarray) -> float:
    return float(np.count_nonzero(mask)) / max(1, mask.size)


def _caption(item: ImageTextItem) -> str:
    return item.caption.strip()


def _usable_caption(text: Any) -> bool:
    """Non-empty and free of markers (real or look-alike), which would confuse the instruction."""
    if not isinstance(text, str) or not text.strip():
        return False
    try:
        return not parse_markers(text)
    except InstructionError:
        return False


def _join_markers(contexts: list[Context]) -> str:
    """ "[ref#1]", "[ref#1] and [ref#2]", "[ref#1], [ref#2] and [ref#3]"."""
    markers = [context.marker for context in contexts]
    return markers[0] if len(markers) == 1 else ", ".join(markers[:-1]) + " and " + markers[-1]


def _style_words(name: str) -> str:
    return name if name.lower().endswith("style") else f"{name} style"
