"""Stage-2 task data: control images, task builders, phrasing splits, the mixture, JSONL instructions."""

import json
import pickle
import re

import numpy as np
import pytest
from PIL import Image, ImageDraw

from instruct_core import controls
from instruct_core.train.data import ImageTextItem
from instruct_core.instruction import DEFAULT_MODALITIES, parse_markers
from instruct_core.train.instruction_tasks import (
    PAPER_MIX,
    TASKS,
    InstructionJsonlDataset,
    Task,
    TaskMixture,
    check_mix,
    parse_mix,
)

SIZE = (64, 48)  # width, height
COLOURS = {"red": (220, 40, 40), "blue": (40, 60, 220), "yellow": (230, 210, 40), "white": (245, 245, 245)}
BACKGROUNDS = {"green": (40, 150, 70), "grey": (110, 110, 110), "black": (15, 15, 15)}


def _picture(colour, background, box, ellipse=False, noise_seed=None):
    image = Image.new("RGB", SIZE, BACKGROUNDS[background])
    if noise_seed is not None:
        noise = np.random.default_rng(noise_seed).normal(0, 5, (SIZE[1], SIZE[0], 3))
        image = Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    (draw.ellipse if ellipse else draw.rectangle)(box, fill=COLOURS[colour])
    return image


def _save(image, folder, name):
    path = folder / name
    image.save(path)
    return path


def _depth_16bit(folder, name):
    ramp = np.linspace(1000, 3000, SIZE[0])[None, :].repeat(SIZE[1], axis=0).astype(np.uint16)
    return _save(Image.fromarray(ramp), folder, name)


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    folder = tmp_path_factory.mktemp("items")
    specs = [
        # colour, background, box, extra
        ("red", "green", (10, 8, 40, 30), {"subject": "toy", "subject_name": "plush toy"}),
        ("red", "grey", (20, 10, 50, 40), {"subject": "toy", "subject_name": "plush toy"}),
        ("red", "black", (5, 5, 30, 25), {"subject": "toy", "subject_name": "plush toy"}),
        ("red", "green", (30, 20, 60, 45), {"subject": "toy", "subject_name": "plush toy", "style": "flat"}),
        ("blue", "grey", (12, 12, 44, 36), {"style": "flat"}),
        ("blue", "black", (8, 6, 56, 40), {"style": "flat"}),
        ("yellow", "green", (16, 4, 48, 28), {"style": "neon"}),
        ("yellow", "black", (4, 16, 36, 44), {"style": "neon", "depth": "depth_0.png"}),
        ("white", "green", (20, 14, 52, 34), {"depth": "depth_1.png"}),
        ("white", "grey", (6, 6, 26, 42), {}),
    ]
    result = []
    for index, (colour, background, box, extra) in enumerate(specs):
        path = _save(_picture(colour, background, box, ellipse=index % 2 == 1), folder, f"item_{index}.png")
        if "depth" in extra:
            extra = dict(extra, depth=_depth_16bit(folder, extra["depth"]))
        caption = f"a {colour} shape on a {background} background"
        result.append(ImageTextItem(key=f"item_{index}", caption=caption, path=path, extra=extra))
    # Unusable for every task: no caption.
    result.append(ImageTextItem(key="blank", caption="  ", image=_picture("red", "grey", (1, 1, 9, 9))))
    return result


def _template_pattern(template, captions):
    fields = {
        "caption": "(?:" + "|".join(re.escape(c) for c in captions) + ")",
        "ref": r"\[ref#\d+\]",
        "content": r"\[ref#\d+\]",
        "style": r"\[ref#\d+\]",
        "refs": r"\[ref#\d+\](?:(?:, | and )\[ref#\d+\])*",
        "name": r"[a-z ]+",
    }
    pieces = re.split(r"(\{\w+\})", template)
    return re.compile("".join(fields[p[1:-1]] if p.startswith("{") else re.escape(p) for p in pieces))


def _build_many(task, items, phrasings, count):
    units = task.units(items)
    examples = []
    for seed in range(count):
        rng = np.random.default_rng(seed)
        example = task.build(units[int(rng.integers(len(units)))], rng, phrasings)
        if example is not None:
            examples.append(example)
    return examples


# --------------------------------------------------------------------------------------------
# Task builders


@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_builds_examples_that_validate(items, name):
    task = TASKS[name]
    assert len(task.templates) >= 3
    examples = _build_many(task, items, "all", 12)
    assert len(examples) >= 10
    for example in examples:
        instruction = example.instruction
        assert example.task == name
        assert instruction.validate(known_modalities=DEFAULT_MODALITIES) == []
        ids = [context.id for context in instruction.contexts]
        assert ids == list(range(1, len(ids) + 1))
        # Every context is named in the text, and its marker text names only itself.
        assert sorted(instruction.referenced_ids()) == ids
        for context in instruction.contexts:
            assert context.modality in task.modalities
            assert context.text.startswith(context.marker)
            assert parse_markers(context.text) == [context.id]
        assert example.target.mode == "RGB" and example.target.size == SIZE


def test_context_counts_and_modalities_per_task(items):
    for name, counts in [("text_to_image", {0}), ("edge_to_image", {1}), ("sketch_to_image", {1}),
                         ("mask_to_image", {1}), ("depth_to_image", {1}), ("inpainting", {1}),
                         ("subject", {1, 2, 3}), ("styled_generation", {1, 2}), ("style_transfer", {2})]:
        seen = {len(example.instruction.contexts) for example in _build_many(TASKS[name], items, "all", 40)}
        assert seen == counts, name
    transfer = _build_many(TASKS["style_transfer"], items, "all", 5)[0].instruction
    assert [c.modality for c in transfer.contexts] == ["edge", "style"]
    subject = _build_many(TASKS["subject"], items, "all", 1)[0].instruction
    assert subject.contexts[0].text == "[ref#1] plush toy"


def test_group_tasks_never_use_the_target_as_its_own_reference(items):
    for name in ("subject", "styled_generation"):
        for example in _build_many(TASKS[name], items, "all", 20):
            target = np.asarray(example.target)
            assert all(not np.array_equal(np.asarray(c.image), target) for c in example.instruction.contexts)


def test_units_follow_the_data(items):
    assert len(TASKS["text_to_image"].units(items)) == 10  # the caption-less item is out
    assert len(TASKS["depth_to_image"].units(items)) == 2
    assert [group.label for group in TASKS["subject"].units(items)] == ["toy"]
    assert sorted(len(group.items) for group in TASKS["styled_generation"].units(items)) == [2, 3]


@pytest.mark.parametrize("name", list(TASKS))
def test_train_phrasings_never_use_the_held_out_one_and_test_only_it(items, name):
    task = TASKS[name]
    captions = {item.caption for item in items if item.caption.strip()}
    patterns = [_template_pattern(template, captions) for template in task.templates]
    held_out = len(patterns) - 1

    def matches(text):
        return {i for i, pattern in enumerate(patterns) if pattern.fullmatch(text)}

    used = set()
    for example in _build_many(task, items, "train", 40):
        found = matches(example.instruction.text)
        assert found and held_out not in found, example.instruction.text
        used |= found
    assert used == set(range(held_out))  # every training phrasing gets used
    for example in _build_many(task, items, "test", 8):
        assert held_out in matches(example.instruction.text), example.instruction.text
    assert task.phrasing_table("all") == task.templates


def test_unknown_phrasing_split_is_refused(items):
    with pytest.raises(ValueError, match="phrasings"):
        TaskMixture({"text_to_image": 1.0}, items, phrasings="valid")
    with pytest.raises(ValueError, match="phrasings"):
        TASKS["text_to_image"].phrasing_table("holdout")


# --------------------------------------------------------------------------------------------
# Mixture


def _fingerprint(example):
    contexts = [(c.id, c.modality, c.text, np.asarray(c.image).tobytes()) for c in example.instruction.contexts]
    return example.task, example.instruction.text, contexts, np.asarray(example.target).tobytes()


def test_mixture_is_deterministic_for_a_seed_and_independent_of_order(items):
    first = TaskMixture(PAPER_MIX, items, seed=7, length=30)
    second = TaskMixture(PAPER_MIX, items, seed=7, length=30)
    forward = [_fingerprint(first[i]) for i in range(30)]
    backward = [_fingerprint(second[i]) for i in reversed(range(30))][::-1]
    assert forward == backward
    other = TaskMixture(PAPER_MIX, items, seed=8, length=30)
    assert [_fingerprint(other[i]) for i in range(30)] != forward
    assert _fingerprint(first[-1]) == forward[-1]
    # DataLoader workers get a pickled copy; it must draw the same examples.
    assert _fingerprint(pickle.loads(pickle.dumps(first))[4]) == forward[4]
    with pytest.raises(IndexError):
        first[30]


def test_mixture_frequencies_follow_the_weights(items):
    weights = {"text_to_image": 0.5, "edge_to_image": 0.3, "subject": 0.2}
    mixture = TaskMixture({name: 10 * w for name, w in weights.items()}, items, seed=3, length=2000)
    counts = {name: 0 for name in weights}
    for index in range(len(mixture)):
        counts[mixture.task_for(index)] += 1
    for name, weight in weights.items():
        assert abs(counts[name] / 2000 - weight) < 0.035, (name, counts)
    assert all(mixture[i].task == mixture.task_for(i) for i in range(0, 2000, 250))


def test_tasks_without_data_are_disabled_and_weights_renormalised(items):
    plain = [ImageTextItem(key=i.key, caption=i.caption, path=i.path) for i in items if i.path]
    mixture = TaskMixture(PAPER_MIX, plain, seed=0, length=20)
    report = mixture.report
    assert set(report["disabled"]) == {"depth_to_image", "subject", "styled_generation", "style_transfer"}
    assert "depth" in report["disabled"]["depth_to_image"]
    assert "subject" in report["disabled"]["subject"]
    assert abs(sum(report["weights"].values()) - 1.0) < 1e-9
    assert report["weights"]["text_to_image"] == pytest.approx(0.30 / 0.60)
    assert all(mixture[i].task not in report["disabled"] for i in range(20))
    with pytest.raises(ValueError, match="depth_to_image"):
        TaskMixture({"text_to_image": 1.0, "depth_to_image": 0.5}, plain, strict=True)
    with pytest.raises(ValueError, match="subject"):
        TaskMixture({"subject": 1.0}, plain)  # nothing left to draw from


class _EveryOtherItem(Task):
    name = "every_other"
    templates = ("Draw: {caption}", "Paint: {caption}", "Show: {caption}")

    def build(self, unit, rng, phrasings="train"):
        if int(unit.key.rsplit("_", 1)[-1]) % 2:
            return None
        return self.example(self.phrase(rng, phrasings, caption=unit.caption), [], unit.load())


def test_mixture_retries_unusable_units_and_counts_skips(items):
    registry = {"every_other": _EveryOtherItem()}
    usable = [item for item in items if item.path]
    mixture = TaskMixture({"every_other": 1.0}, usable, seed=1, length=40, registry=registry)
    assert all(mixture[i].task == "every_other" for i in range(40))
    report = mixture.report
    assert report["built"] == {"every_other": 40} and report["skipped"]["every_other"] > 0
    odd_only = [item for item in usable if int(item.key.rsplit("_", 1)[-1]) % 2]
    hopeless = TaskMixture({"every_other": 1.0}, odd_only, registry=registry, max_draws=3)
    with pytest.raises(RuntimeError, match="every_other"):
        hopeless[0]
    assert hopeless.report["skipped"] == {"every_other": 3}


def test_parse_mix_and_its_checks():
    assert parse_mix(" text_to_image=0.3, edge_to_image=0.2 ") == {"text_to_image": 0.3, "edge_to_image": 0.2}
    assert parse_mix("paper") == PAPER_MIX
    assert set(PAPER_MIX) == set(TASKS) and sum(PAPER_MIX.values()) == pytest.approx(1.0)
    assert PAPER_MIX["text_to_image"] == max(PAPER_MIX.values())
    with pytest.raises(ValueError, match=r'edge_to_imgae: unknown task \(did you mean "edge_to_image"'):
        parse_mix("text_to_image=0.3,edge_to_imgae=0.2")
    with pytest.raises(ValueError, match="inpainting.*>= 0"):
        parse_mix("text_to_image=1,inpainting=-0.1")
    with pytest.raises(ValueError, match="subject"):
        parse_mix("subject=lots")
    with pytest.raises(ValueError, match="name=weight"):
        parse_mix("subject")
    with pytest.raises(ValueError, match="positive"):
        check_mix({"subject": 0.0})
    with pytest.raises(ValueError, match="style_transfer"):
        check_mix({"style_transfer": float("nan")})


# --------------------------------------------------------------------------------------------
# Control images


def _rectangle_scene():
    image = _picture("red", "green", (16, 12, 47, 35), noise_seed=0)
    truth = np.zeros((SIZE[1], SIZE[0]), dtype=bool)
    truth[12:36, 16:48] = True
    near = np.zeros_like(truth)
    near[10:38, 14:50] = True
    inside = np.zeros_like(truth)
    inside[14:34, 18:46] = True
    return image, truth, near & ~inside  # the image, the shape, a band 2 px either side of its border


def test_canny_edges_are_binary_and_lie_on_the_shape_border():
    image, _, band = _rectangle_scene()
    edges = np.asarray(controls.canny_edges(image))
    assert set(np.unique(edges)) <= {0, 255}
    on = edges > 0
    assert on[band].sum() / on.sum() > 0.95
    assert on[band].sum() >= 0.8 * 2 * (32 + 24)  # most of the perimeter is traced


def test_hed_like_edges_are_soft_and_strongest_on_the_border():
    image, _, band = _rectangle_scene()
    soft = np.asarray(controls.hed_like_edges(image)).astype(float)
    assert len(np.unique(soft)) > 10  # graded, not binary
    assert soft[band].mean() > 4 * soft[~band].mean()
    flat = np.asarray(controls.hed_like_edges(Image.new("RGB", SIZE, (90, 90, 90))))
    assert flat.max() == 0


def test_sketch_is_dark_strokes_on_white_along_the_border():
    image, _, band = _rectangle_scene()
    drawing = np.asarray(controls.sketch(image))
    assert set(np.unique(drawing)) <= {0, 255}
    strokes = drawing == 0
    assert strokes.mean() < 0.25  # mostly white paper
    assert strokes[band].sum() / strokes.sum() > 0.9


def test_shape_mask_finds_the_drawn_shape():
    image = _picture("yellow", "grey", (14, 8, 50, 40), ellipse=True, noise_seed=1)
    truth = np.asarray(_picture("white", "black", (14, 8, 50, 40), ellipse=True).convert("L")) > 128
    found = np.asarray(controls.shape_mask(image)) > 0
    assert (found & truth).sum() / (found | truth).sum() > 0.8
    assert not np.asarray(controls.shape_mask(Image.new("RGB", SIZE, (90, 90, 90)))).any()


def test_shape_mask_uses_a_supplied_segmentation():
    image = _picture("red", "green", (16, 12, 47, 35))
    labels = np.zeros((SIZE[1] // 2, SIZE[0] // 2), dtype=np.uint8)
    labels[2:10, 3:12] = 2  # a label map at half size: label 2 is foreground
    mask = np.asarray(controls.shape_mask(image, Image.fromarray(labels)))
    assert mask.shape == (SIZE[1], SIZE[0]) and set(np.unique(mask)) == {0, 255}
    assert mask[4:20, 6:24].all() and mask.sum() == 255 * 16 * 18


def test_depth_map_normalises_16_bit_input(tmp_path):
    item = ImageTextItem(key="d", caption="c", extra={"depth": _depth_16bit(tmp_path, "depth.png")})
    depth = controls.depth_map(item)
    values = np.asarray(depth).astype(int)
    assert depth.mode == "L" and values.min() == 0 and values.max() == 255
    assert (np.diff(values[0]) >= 0).all() and len(np.unique(values)) > 50  # a ramp, not clipped white
    assert controls.depth_map(item, (32, 24)).size == (32, 24)
    eight_bit = np.full((4, 4), 100, dtype=np.uint8)
    eight_bit[0, 0] = 200
    eight_bit_item = ImageTextItem(key="e", caption="c", extra={"depth": Image.fromarray(eight_bit)})
    stretched = np.asarray(controls.depth_map(eight_bit_item))
    assert stretched[0, 0] == 255 and stretched[1, 1] == 0
    assert controls.depth_map(ImageTextItem(key="f", caption="c")) is None


def test_depth_task_skips_items_without_a_readable_map(items):
    task = TASKS["depth_to_image"]
    rng = np.random.default_rng(0)
    no_depth = next(item for item in items if "depth" not in item.extra and item.path)
    assert task.build(no_depth, rng) is None
    broken = ImageTextItem(key="b", caption="c", path=no_depth.path, extra={"depth": "/nonexistent/d.png"})
    assert task.build(broken, rng) is None
    example = task.build(next(item for item in items if "depth" in item.extra), rng)
    depth = np.asarray(example.instruction.contexts[0].image)
    assert depth.min() == 0 and depth.max() == 255


def test_inpainting_mask_is_deterministic_and_applied_where_expected():
    first = controls.inpainting_mask(SIZE, np.random.default_rng(5))
    again = controls.inpainting_mask(SIZE, np.random.default_rng(5))
    assert first.size == SIZE and np.array_equal(np.asarray(first), np.asarray(again))
    hole = np.asarray(first) > 0
    assert 0 < hole.mean() < 0.9
    image = _picture("blue", "green", (10, 10, 40, 30))
    masked = np.asarray(controls.apply_mask(image, first))
    assert (masked[hole] == 127).all()
    assert np.array_equal(masked[~hole], np.asarray(image)[~hole])


def test_inpainting_context_is_the_target_with_a_grey_hole(items):
    for example in _build_many(TASKS["inpainting"], items, "all", 6):
        (context,) = example.instruction.contexts
        assert context.modality == "image" and context.mask is None
        shown, target = np.asarray(context.image), np.asarray(example.target)
        changed = (shown != target).any(axis=2)
        assert changed.any() and (shown[changed] == 127).all()


# --------------------------------------------------------------------------------------------
# JSONL instructions


def test_jsonl_dataset_loads_good_lines_and_counts_bad_ones(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    _save(_picture("red", "green", (5, 5, 30, 30)), images, "ref.png")
    _save(_picture("blue", "grey", (10, 10, 40, 40)), images, "target.png")
    context = {"id": 1, "modality": "subject", "text": "[ref#1] a toy", "image": "images/ref.png"}
    instruction = {"version": 1, "text": "Draw [ref#1] on a beach", "contexts": [context]}
    unreferenced = dict(instruction, text="Draw a beach")
    lines = [
        json.dumps({"instruction": instruction, "target": "images/target.png"}),  # 1: wrapped
        json.dumps(dict(instruction, target="images/target.png")),  # 2: keys at top level
        "{not json",  # 3
        "",  # blank: ignored, not counted
        json.dumps({"instruction": instruction}),  # 5: no target
        json.dumps({"instruction": instruction, "target": "images/missing.png"}),  # 6
        json.dumps({"instruction": dict(instruction, contexts=[dict(context, modality="stlye")]),
                    "target": "images/target.png"}),  # 7: unknown modality
        json.dumps({"instruction": unreferenced, "target": "images/target.png"}),  # 8: kept, with a warning
        json.dumps({"instruction": instruction, "target": "images/target.png", "task": "x"}),  # 9
    ]
    path = tmp_path / "instructions.jsonl"
    body = ("\n".join(lines) + "\n").encode("utf-8")
    path.write_bytes(b"\xef\xbb\xbf" + body + b'{"text": "\xff"}\n')  # BOM first; bad UTF-8 on line 10
    dataset = InstructionJsonlDataset(path)
    assert len(dataset) == 3
    assert [number for number, _ in dataset.bad_lines] == [3, 5, 6, 7, 9, 10] and dataset.skipped == 6
    messages = dict(dataset.bad_lines)
    assert "target" in messages[5] and "missing.png" in messages[6] and "modality" in messages[7]
    assert [number for number, _ in dataset.warnings] == [8]
    target = np.asarray(Image.open(images / "target.png").convert("RGB"))
    for example in dataset:
        assert example.task == "instruction"
        assert np.array_equal(np.asarray(example.target), target)
    assert dataset[0].instruction == dataset[1].instruction
    assert dataset[0].instruction.contexts[0].modality == "subject"
