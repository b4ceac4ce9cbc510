"""Benchmark tasks on procedural scenes: instructions with exact targets, splits, training data.

Every example is a `BenchExample`: a multi-modal instruction (contexts as the product makes them:
`Context(id, modality, "[ref#k] ...", image)`), the target image, and the `Scene` it was rendered
from, which the metrics (`metrics`) read their ground truth from.

Tasks (`BENCH_TASKS`):

    in-domain (stage-2 training)   text_to_image, edge_to_image, sketch_to_image, mask_to_image,
                                   depth_to_image, subject, styled_generation, style_transfer,
                                   inpainting
    zero-shot (never trained)      subject_style    subject ref + style ref + text
                                   multi_subject    two subject refs + text
                                   control_subject  edge map + subject ref + text
                                   control_style    sketch, mask or depth map + style ref + text

Depth-to-image scenes hold two overlapping objects (`scenes.sample_overlapping_scene`), so that the depth map
decides which one is in front; `swap_depths` gives the same example with the other one in front.

Edge map + style reference is already the in-domain `style_transfer` (content given as its edge
map, as `tasks.StyleTransfer` does), so `control_style` composes a style with the *other* controls.

Subjects enter the text through their marker: the caption says "a large [ref#1] on the left"
where a plain object would be "a large red circle on the left", so several subjects bind to their
places in one sentence. Style contexts are called "[ref#k] a style reference" and no text names a
style: it can only be read from the image.

Splits: example i of a split is drawn from `np.random.default_rng([seed, split code, task code,
i])`, with different split codes for "train" and "test" (and for the training mixture and the
stage-1 items), so train and test streams never share a draw. Phrasings: each task's last
template is held out; a split uses its own phrasings by default ("train" never the held-out one,
"test" only it). Entities: in-domain tasks use the seen subjects and styles in both splits; the
zero-shot tasks use the held-out subjects and styles (`HELD_OUT_SUBJECTS`, `HELD_OUT_STYLES`) in
"test" and the seen ones in "train" (a diagnostic split; no training mixture may contain a
zero-shot task unless asked to). Nothing outside a zero-shot test split ever shows a held-out
subject or style.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image

from instruct_core.instruction import DEFAULT_MODALITIES, Context, InstructionError, MultiModalInstruction
from instruct_core.train.data import ImageTextItem, TrainingExample

from . import scenes
from .scenes import Scene

__all__ = [
    "BENCH_MIX",
    "BENCH_TASKS",
    "IN_DOMAIN_TASKS",
    "SPLITS",
    "ZERO_SHOT_TASKS",
    "BenchExample",
    "BenchTask",
    "BenchmarkTaskDataset",
    "make_example",
    "make_split",
    "stage1_items",
    "swap_depths",
]

SPLITS = ("train", "test")
_STREAMS = {"train": 1, "test": 2, "mixture": 3, "stage1": 4}


@dataclass
class BenchExample:
    """One benchmark instance. `meta` holds what scoring needs beyond the scene: "task",
    "split", "index", "template" (index into the task's templates), "subjects" (ids in the
    target), "style", "control" (the control modality, if any), "hole" (inpainting: "L", 255 in
    the hole) and "zero_shot"."""

    task: str
    instruction: MultiModalInstruction
    target: Image.Image
    scene: Scene
    meta: dict = field(default_factory=dict)

    def training_example(self) -> TrainingExample:
        """The example for the trainer; its scene goes along (`annotations["scene"]`) for losses that read it."""
        return TrainingExample(instruction=self.instruction, target=self.target, task=self.task,
                               annotations={"scene": self.scene})


@dataclass(frozen=True)
class _Pools:
    subjects: tuple[int, ...]
    styles: tuple[str, ...]


_SEEN = _Pools(scenes.SEEN_SUBJECTS, scenes.SEEN_STYLES)
_HELD_OUT = _Pools(scenes.HELD_OUT_SUBJECTS, scenes.HELD_OUT_STYLES)


@dataclass
class _Draft:
    """What a task builder returns: the target's scene, contexts, template fields and extra meta."""

    scene: Scene
    contexts: list[Context]
    fields: dict[str, str]
    meta: dict = field(default_factory=dict)
    target: Image.Image | None = None  # the scene's render unless set


@dataclass(frozen=True)
class BenchTask:
    """A task: its phrasing templates (the last one held out for testing) and its builder."""

    name: str
    templates: tuple[str, ...]
    builder: Callable[[np.random.Generator, _Pools, int], _Draft]
    zero_shot: bool = False

    def phrasing_table(self, phrasings: str) -> tuple[str, ...]:
        if phrasings == "train":
            return self.templates[:-1]
        if phrasings == "test":
            return self.templates[-1:]
        if phrasings == "all":
            return self.templates
        raise ValueError(f"phrasings: expected train, test or all, got {phrasings!r}")


# --------------------------------------------------------------------------------------------
# Builders


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _caption(scene: Scene, rng, markers=None) -> str:
    return scenes.caption(scene, rng, markers)


def _text_to_image(rng, pools, size):
    scene = scenes.sample_scene(rng)
    return _Draft(scene, [], {"caption": _caption(scene, rng)})


_CONTROLS = {
    "edge": (scenes.render_edges, "an edge map"),
    "sketch": (scenes.render_sketch, "a sketch"),
    "mask": (scenes.render_mask, "a shape mask"),
    "depth": (scenes.render_depth, "a depth map"),
}


def _control_context(modality: str, scene: Scene, size: int, context_id: int) -> Context:
    draw, words = _CONTROLS[modality]
    return Context(id=context_id, modality=modality, text=f"[ref#{context_id}] {words}", image=draw(scene, size))


def _control_task(modality, sample_scene=scenes.sample_scene):
    def build(rng, pools, size):
        scene = sample_scene(rng)
        context = _control_context(modality, scene, size, 1)
        return _Draft(scene, [context], {"ref": context.marker, "caption": _caption(scene, rng)},
                      {"control": modality})

    return build


def _subject_context(subject: int, rng, size: int, context_id: int) -> Context:
    kind = scenes.SUBJECTS[subject].kind
    image = scenes.render_subject_reference(subject, rng, size)
    return Context(id=context_id, modality="subject", text=f"[ref#{context_id}] a {kind}", image=image)


def _style_context(style: str, rng, size: int, context_id: int) -> Context:
    image = scenes.render_style_reference(style, rng, size)
    return Context(id=context_id, modality="style", text=f"[ref#{context_id}] a style reference", image=image)


def _subject_scene(rng, subjects, style=None, extra_object=0.3):
    # Sometimes a plain object shares the picture, so the marker has to be bound to its place.
    count = len(subjects) + (1 if len(subjects) == 1 and rng.random() < extra_object else 0)
    return scenes.sample_scene(rng, num_objects=count, subject=list(subjects), style=style)


def _subject(rng, pools, size):
    subject = _pick(rng, pools.subjects)
    scene = _subject_scene(rng, [subject])
    context = _subject_context(subject, rng, size, 1)
    return _Draft(scene, [context], {"ref": context.marker, "caption": _caption(scene, rng, {0: context.marker})},
                  {"subjects": [subject]})


def _styled_generation(rng, pools, size):
    style = _pick(rng, pools.styles)
    scene = scenes.sample_scene(rng, style=style)
    context = _style_context(style, rng, size, 1)
    return _Draft(scene, [context], {"style": context.marker, "caption": _caption(scene, rng)}, {"style": style})


def _style_transfer(rng, pools, size):
    style = _pick(rng, pools.styles)
    scene = scenes.sample_scene(rng, style=style)
    content = _control_context("edge", scene, size, 1)
    reference = _style_context(style, rng, size, 2)
    fields = {"content": content.marker, "style": reference.marker, "caption": _caption(scene, rng)}
    return _Draft(scene, [content, reference], fields, {"style": style, "control": "edge"})


def _inpainting(rng, pools, size):
    scene = scenes.sample_scene(rng)
    hole = scenes.sample_hole(scene, rng, size)
    context = Context(id=1, modality="image", text="[ref#1] a masked image",
                      image=scenes.render_masked(scene, hole, size))
    return _Draft(scene, [context], {"ref": context.marker, "caption": _caption(scene, rng)}, {"hole": hole})


def _subject_style(rng, pools, size):
    subject, style = _pick(rng, pools.subjects), _pick(rng, pools.styles)
    scene = _subject_scene(rng, [subject], style)
    ref = _subject_context(subject, rng, size, 1)
    reference = _style_context(style, rng, size, 2)
    fields = {"ref": ref.marker, "style": reference.marker, "caption": _caption(scene, rng, {0: ref.marker})}
    return _Draft(scene, [ref, reference], fields, {"subjects": [subject], "style": style})


def _multi_subject(rng, pools, size):
    first, second = (int(s) for s in rng.choice(pools.subjects, size=2, replace=False))
    scene = _subject_scene(rng, [first, second])
    refs = [_subject_context(s, rng, size, k) for k, s in enumerate((first, second), start=1)]
    markers = {0: refs[0].marker, 1: refs[1].marker}
    fields = {"ref": refs[0].marker, "ref2": refs[1].marker, "caption": _caption(scene, rng, markers)}
    return _Draft(scene, refs, fields, {"subjects": [first, second]})


def _control_subject(rng, pools, size):
    subject = _pick(rng, pools.subjects)
    scene = _subject_scene(rng, [subject])
    ref = _subject_context(subject, rng, size, 1)
    control = _control_context("edge", scene, size, 2)
    fields = {"ref": ref.marker, "control": control.marker, "caption": _caption(scene, rng, {0: ref.marker})}
    return _Draft(scene, [ref, control], fields, {"subjects": [subject], "control": "edge"})


def _control_style(rng, pools, size):
    style = _pick(rng, pools.styles)
    modality = _pick(rng, ("sketch", "mask", "depth"))
    scene = scenes.sample_scene(rng, style=style)
    control = _control_context(modality, scene, size, 1)
    reference = _style_context(style, rng, size, 2)
    fields = {"control": control.marker, "style": reference.marker, "caption": _caption(scene, rng)}
    return _Draft(scene, [control, reference], fields, {"style": style, "control": modality})


# --------------------------------------------------------------------------------------------
# The task table

_TASK_LIST = (
    BenchTask("text_to_image", (
        "{caption}",
        "Generate an image: {caption}",
        "Create a picture of {caption}",
        "Draw {caption}",
        "Paint {caption}",
        "An image showing {caption}",
        "Render the following scene: {caption}",
    ), _text_to_image),
    BenchTask("edge_to_image", (
        "Generate an image following the edges of {ref}: {caption}",
        "Create a picture whose outlines match {ref}: {caption}",
        "Use {ref} as the edge map and draw {caption}",
        "Trace the lines of {ref} to draw {caption}",
        "With the outlines from {ref}, show {caption}",
        "Paint an image that follows the contours in {ref}: {caption}",
    ), _control_task("edge")),
    BenchTask("sketch_to_image", (
        "Generate an image from the sketch {ref}: {caption}",
        "Turn the sketch {ref} into a finished picture: {caption}",
        "Colour in the drawing {ref} so that it shows {caption}",
        "Work the rough drawing {ref} up into {caption}",
        "Following the sketch in {ref}, draw {caption}",
        "Complete the pencil strokes of {ref} as {caption}",
    ), _control_task("sketch")),
    BenchTask("mask_to_image", (
        "Generate an image whose objects fill the shape of {ref}: {caption}",
        "Create a picture with the foreground shaped like {ref}: {caption}",
        "Use {ref} as the shape mask and draw {caption}",
        "Give the objects the silhouettes of {ref}: {caption}",
        "Following the mask in {ref}, draw {caption}",
        "Place the objects inside the white area of {ref}: {caption}",
    ), _control_task("mask")),
    BenchTask("depth_to_image", (
        "Generate an image with the depth layout of {ref}: {caption}",
        "Create a picture whose scene depth follows {ref}: {caption}",
        "Use {ref} as the depth map and draw {caption}",
        "Keep the near and far layers of {ref}: {caption}",
        "Following the depth in {ref}, draw {caption}",
        "Arrange near and far objects as in {ref}: {caption}",
    # Overlapping objects, so that the depth map decides which one a picture shows in front.
    ), _control_task("depth", scenes.sample_overlapping_scene)),
    BenchTask("subject", (
        "Generate an image of {caption}",
        "Create a picture with {caption}",
        "Show the subject of {ref} in a new scene: {caption}",
        "Redraw {ref} as follows: {caption}",
        "Draw {caption}",
        "Paint {caption}",
        "An image of {caption}",
        "Use the subject of {ref} here: {caption}",
        "Take {ref} and draw {caption}",
        "Same subject as {ref}, new scene: {caption}",
        "Put the object from {ref} into this picture: {caption}",
    ), _subject),
    BenchTask("styled_generation", (
        "Generate an image in the style of {style}: {caption}",
        "Create a picture painted like {style}: {caption}",
        "Draw {caption}, in the style of {style}",
        "Paint {caption}, looking like {style}",
        "With the palette and texture of {style}, draw {caption}",
        "Borrow the look of {style} for this picture: {caption}",
    ), _styled_generation),
    BenchTask("style_transfer", (
        "Render the content of {content} in the style of {style}: {caption}",
        "Transfer the style of {style} onto the layout of {content}: {caption}",
        "Keep the edges of {content} and paint them like {style}: {caption}",
        "Draw the outlines of {content} with the look of {style}: {caption}",
        "Lay out the picture as {content} and colour it like {style}: {caption}",
        "Restyle the scene outlined in {content} after {style}: {caption}",
    ), _style_transfer),
    BenchTask("inpainting", (
        "Fill in the grey region of {ref}: {caption}",
        "Complete the missing part of {ref}: {caption}",
        "Inpaint the masked area of {ref} so that it shows {caption}",
        "Paint over the grey patch in {ref}: {caption}",
        "Finish the unfinished image {ref}: {caption}",
        "Repair the hole in {ref}: {caption}",
    ), _inpainting),
    BenchTask("subject_style", (
        "Generate an image of {caption}, in the style of {style}",
        "Create a picture painted like {style} with {caption}",
        "Draw {caption}, borrowing the look of {style}",
        "Show the subject of {ref} in the manner of {style}: {caption}",
    ), _subject_style, zero_shot=True),
    BenchTask("multi_subject", (
        "Generate an image of {caption}",
        "Create a picture with {caption}",
        "Put {ref} and {ref2} together in one picture: {caption}",
        "Draw both {ref} and {ref2} as follows: {caption}",
    ), _multi_subject, zero_shot=True),
    BenchTask("control_subject", (
        "Generate an image of {caption}, following the edges of {control}",
        "Create a picture whose outlines match {control}: {caption}",
        "Use {control} as the edge map and draw {caption}",
        "Draw {ref} along the contours of {control}: {caption}",
    ), _control_subject, zero_shot=True),
    BenchTask("control_style", (
        "Generate an image following {control}, in the style of {style}: {caption}",
        "Create a picture laid out like {control} and painted like {style}: {caption}",
        "Use {control} for the layout and {style} for the look: {caption}",
        "Draw {caption} on the plan of {control}, borrowing the look of {style}",
    ), _control_style, zero_shot=True),
)

BENCH_TASKS: dict[str, BenchTask] = {task.name: task for task in _TASK_LIST}
IN_DOMAIN_TASKS: tuple[str, ...] = tuple(t.name for t in _TASK_LIST if not t.zero_shot)
ZERO_SHOT_TASKS: tuple[str, ...] = tuple(t.name for t in _TASK_LIST if t.zero_shot)
_TASK_CODES = {name: code for code, name in enumerate(BENCH_TASKS)}

# Stage-2 weights for the benchmark's own training run, after tasks.PAPER_MIX: text-to-image keeps
# the largest share, the controls a quarter, then subjects, styles and inpainting.
BENCH_MIX: dict[str, float] = {
    "text_to_image": 0.25,
    "edge_to_image": 0.08,
    "sketch_to_image": 0.06,
    "mask_to_image": 0.06,
    "depth_to_image": 0.06,
    "subject": 0.17,
    "styled_generation": 0.12,
    "style_transfer": 0.10,
    "inpainting": 0.10,
}


# --------------------------------------------------------------------------------------------
# Building examples and splits


def make_example(
    task: str,
    rng: np.random.Generator,
    *,
    size: int = 32,
    phrasings: str = "train",
    entities: str = "seen",
    meta: Mapping | None = None,
) -> BenchExample:
    """One example of `task` drawn from `rng`; `entities` is "seen" or "held_out" (the subject
    and style pools); `meta` is merged into the example's meta."""
    bench_task = _task(task)
    table = bench_task.phrasing_table(phrasings)
    pools = {"seen": _SEEN, "held_out": _HELD_OUT}.get(entities)
    if pools is None:
        raise ValueError(f"entities: expected seen or held_out, got {entities!r}")
    draft = bench_task.builder(rng, pools, size)
    choice = int(rng.integers(len(table)))
    text = table[choice].format(**draft.fields)
    instruction = MultiModalInstruction(text=text, contexts=draft.contexts)
    unreferenced = instruction.validate(known_modalities=DEFAULT_MODALITIES)
    if unreferenced:  # a template that forgot a marker: a bug here, not bad data
        raise InstructionError(f"{task}: {unreferenced[0]}")
    target = draft.target if draft.target is not None else scenes.render(draft.scene, size)
    subjects = [o.subject for o in draft.scene.objects if o.subject is not None]
    info = {
        "task": task,
        "template": bench_task.templates.index(table[choice]),
        "phrasings": phrasings,
        "entities": entities,
        "zero_shot": bench_task.zero_shot,
        "subjects": subjects,
        "style": draft.scene.style,
        "control": None,
        "size": size,
        **draft.meta,
        **(meta or {}),
    }
    return BenchExample(task, instruction, target, draft.scene, info)


def make_split(
    task: str,
    split: str = "train",
    n: int = 100,
    seed: int = 0,
    size: int = 32,
    *,
    phrasings: str | None = None,
    entities: str | None = None,
) -> list[BenchExample]:
    """`n` examples of `task` for `split` ("train" or "test"), deterministic in (seed, split, i).

    `phrasings` defaults to the split's own; `entities` to "held_out" for a zero-shot task's test
    split and "seen" otherwise (see the module notes).
    """
    if split not in SPLITS:
        raise ValueError(f"split: expected train or test, got {split!r}")
    bench_task = _task(task)
    _check_count(n, "n")
    phrasings = split if phrasings is None else phrasings
    if entities is None:
        entities = "held_out" if bench_task.zero_shot and split == "test" else "seen"
    return [
        make_example(task, _rng(seed, split, task, i), size=size, phrasings=phrasings, entities=entities,
                     meta={"split": split, "index": i, "seed": seed})
        for i in range(n)
    ]


def swap_depths(example: BenchExample) -> BenchExample:
    """`example` with the depths of its two most overlapping objects exchanged: the same text and
    the same objects in the same places, the other one in front. Its depth map and target are
    drawn from the swapped scene, so an image generated for each (`metrics.depth_swap`) tells
    whether a model puts in front what the depth map says, or always the same object."""
    size = example.target.height
    shared = scenes.overlaps(example.scene, size)
    np.fill_diagonal(shared, 0)
    depth_contexts = [c for c in example.instruction.contexts if c.modality == "depth"]
    if not depth_contexts:
        raise ValueError(f"example: {example.task} example {example.meta.get('index')} has no depth map")
    if shared.max() == 0:
        raise ValueError(f"example: no two objects overlap in {example.task} example {example.meta.get('index')}")
    a, b = (int(i) for i in np.unravel_index(np.argmax(shared), shared.shape))
    objects = list(example.scene.objects)
    objects[a], objects[b] = (replace(objects[a], depth=objects[b].depth),
                              replace(objects[b], depth=objects[a].depth))
    scene = replace(example.scene, objects=tuple(objects))
    depth = scenes.render_depth(scene, size)
    contexts = [replace(c, image=depth) if c.modality == "depth" else c for c in example.instruction.contexts]
    return BenchExample(example.task, replace(example.instruction, contexts=contexts), scenes.render(scene, size), scene,
                        {**example.meta, "depths_swapped": (a, b)})


def _rng(seed: int, stream: str, task: str | None, index: int) -> np.random.Generator:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed: expected an integer >= 0, got {seed!r}")
    code = -1 if task is None else _TASK_CODES[task]
    return np.random.default_rng([int(seed), _STREAMS[stream], code + 1, int(index)])


def _task(name: str) -> BenchTask:
    try:
        return BENCH_TASKS[name]
    except KeyError:
        raise ValueError(f"task: unknown task {name!r}; known tasks are {', '.join(BENCH_TASKS)}") from None


def _check_count(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name}: expected an integer >= 0, got {value!r}")


# --------------------------------------------------------------------------------------------
# Training data


class BenchmarkTaskDataset:
    """An indexable, deterministic stream of stage-2 `TrainingExample`s from weighted tasks.

    Example `i` depends only on (seed, i): its own rng draws the task by weight, then the task
    builds an example with training phrasings and seen subjects and styles. Zero-shot tasks are
    refused unless `allow_zero_shot` (they are for testing compositions never trained on).
    """

    def __init__(
        self,
        tasks: Mapping[str, float] | None = None,
        length: int = 10_000,
        seed: int = 0,
        size: int = 32,
        *,
        phrasings: str = "train",
        allow_zero_shot: bool = False,
    ):
        mix = dict(BENCH_MIX if tasks is None else tasks)
        for name, weight in mix.items():
            bench_task = _task(name)
            if bench_task.zero_shot and not allow_zero_shot:
                raise ValueError(f"{name}: a zero-shot task; pass allow_zero_shot=True to train on it")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
                raise ValueError(f"{name}: weight must be a number >= 0, got {weight!r}")
        mix = {name: float(w) for name, w in mix.items() if w > 0}
        if not mix:
            raise ValueError("tasks: at least one task needs a positive weight")
        _check_count(length, "length")
        _rng(seed, "mixture", None, 0)  # checks the seed
        self.names = list(mix)
        total = sum(mix.values())
        self.weights = {name: mix[name] / total for name in self.names}
        self._probabilities = np.array([self.weights[name] for name in self.names])
        self.length, self.seed, self.size, self.phrasings = int(length), int(seed), size, phrasings

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> TrainingExample:
        return self.example(index).training_example()

    def __iter__(self) -> Iterator[TrainingExample]:
        return (self[i] for i in range(self.length))

    def example(self, index: int) -> BenchExample:
        """Item `index` with its scene and meta."""
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"index: expected an integer, got {type(index).__name__}")
        position = index + self.length if index < 0 else index
        if not 0 <= position < self.length:
            raise IndexError(f"index {index} is out of range for {self.length} examples")
        rng = _rng(self.seed, "mixture", None, position)
        name = self.names[int(rng.choice(len(self.names), p=self._probabilities))]
        return make_example(name, rng, size=self.size, phrasings=self.phrasings, entities="seen",
                            meta={"split": "train", "index": int(position), "seed": self.seed})


def stage1_items(n: int, seed: int = 0, size: int = 32, *, variants: int = 4,
                 move_objects: bool = True) -> list[ImageTextItem]:
    """`n` captioned images for stage-1 retrieval training, with near-neighbour structure.

    Items come in groups of `variants`: one base scene and its variations (`vary_scene`: same
    objects, subjects and style; new jitter, turns, depths, sometimes sizes and background
    pattern). With `move_objects` the variations put the objects in other cells, so a neighbour
    tells what to draw and the caption where: neighbours in the same cells teach the context layers
    to copy a context's layout, which the spatial controls (an edge map is not a picture) then
    have to unlearn. A fifth of the bases hold a seen subject and a fifth a seen style; held-out ones
    never appear. `item.image` holds the render; `extra` has "base" (the group) and, where present,
    "subject" and "style" labels (so `tasks.TaskMixture` can group them too).
    """
    _check_count(n, "n")
    if isinstance(variants, bool) or not isinstance(variants, int) or variants < 1:
        raise ValueError(f"variants: expected an integer >= 1, got {variants!r}")
    items: list[ImageTextItem] = []
    base_index = 0
    while len(items) < n:
        rng = _rng(seed, "stage1", None, base_index)
        subject = _pick(rng, scenes.SEEN_SUBJECTS) if rng.random() < 0.2 else None
        style = _pick(rng, scenes.SEEN_STYLES) if rng.random() < 0.2 else None
        scene = scenes.sample_scene(rng, subject=subject, style=style)
        for variant in range(min(variants, n - len(items))):
            if variant:
                scene = scenes.vary_scene(scene, rng, move=move_objects)
            extra = {"base": base_index}
            subject_ids = [o.subject for o in scene.objects if o.subject is not None]
            if subject_ids:
                extra["subject"] = f"subject-{subject_ids[0]}"
                extra["subject_name"] = scenes.SUBJECTS[subject_ids[0]].kind
            if scene.style is not None:
                extra["style"] = scene.style
            items.append(ImageTextItem(key=f"bench-{base_index:06d}-{variant}", caption=scenes.caption(scene, rng),
                                       image=scenes.render(scene, size), extra=extra))
        base_index += 1
    return items
