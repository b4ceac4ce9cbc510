"""The procedural benchmark: scenes and their ground truth, tasks and splits, metrics, evaluator."""

import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from instruct_bench import metrics
from instruct_bench import scenes
from instruct_bench import tasks
from instruct_bench.scenes import Background, Scene, SceneObject
from instruct_core.train.data import ImageTextItem, TrainingExample
from instruct_core.instruction import parse_markers


def _scenes(count, seed=0, **kwargs):
    rng = np.random.default_rng(seed)
    return [scenes.sample_scene(rng, **kwargs) for _ in range(count)]


def _mixed_scenes(count, seed=0):
    """Plain scenes, scenes with subjects, and styled scenes (every style)."""
    rng = np.random.default_rng(seed)
    result = []
    for i in range(count):
        subject = int(rng.integers(len(scenes.SUBJECTS))) if i % 3 == 1 else None
        style = scenes.STYLES[i % len(scenes.STYLES)] if i % 3 == 2 else None
        result.append(scenes.sample_scene(rng, subject=subject, style=style))
    return result


OVERLAPPING = Scene(
    Background("beige", "plain"),
    (
        SceneObject("circle", "red", size="large", position=(0.3, 0.5), depth=0.3),
        SceneObject("square", "blue", size="large", position=(0.5, 0.5), depth=0.7),
    ),
)


# --------------------------------------------------------------------------------------------
# Scenes and rendering


@pytest.mark.parametrize("size", [32, 64])
def test_rendering_is_deterministic_and_sized(size):
    first, second = _mixed_scenes(12, seed=3), _mixed_scenes(12, seed=3)
    assert first == second
    for a, b in zip(first, second):
        for draw in (scenes.render, scenes.render_edges, scenes.render_sketch, scenes.render_mask,
                     scenes.render_depth):
            image_a, image_b = draw(a, size), draw(b, size)
            assert image_a.size == (size, size)
            assert np.array_equal(np.asarray(image_a), np.asarray(image_b))
    assert scenes.render(first[0], size).mode == "RGB"
    assert scenes.render_edges(first[0], size).mode == "L"


def test_other_seeds_give_other_scenes():
    assert _mixed_scenes(6, seed=1) != _mixed_scenes(6, seed=2)


def test_objects_stay_in_their_cells_and_in_the_frame():
    for scene in _mixed_scenes(200, seed=4):
        cells = [obj.cell for obj in scene.objects]
        assert len(set(cells)) == len(cells)
        for obj in scene.objects:
            column, row = obj.cell % 3, obj.cell // 3
            # Well inside the cell: an evaluator never has to guess which cell an anchor is in.
            assert abs(obj.position[0] - (0.25 + 0.25 * column)) <= 0.06
            assert abs(obj.position[1] - (0.25 + 0.25 * row)) <= 0.06
            half_x, half_y = scenes._extent(obj)
            assert half_x <= obj.position[0] <= 1 - half_x
            assert half_y <= obj.position[1] <= 1 - half_y


def test_edges_lie_exactly_on_label_boundaries():
    for scene in _mixed_scenes(40, seed=5):
        labels = scenes.layout(scene, 32).labels
        edges = np.asarray(scenes.render_edges(scene, 32)) > 0
        expected = np.zeros_like(edges)
        for axis in (0, 1):
            for step in (1, -1):
                neighbour = np.roll(labels, step, axis=axis)
                valid = np.ones_like(edges)
                index = [slice(None), slice(None)]
                index[axis] = 0 if step == 1 else -1
                valid[tuple(index)] = False  # np.roll wraps round; the frame is no boundary
                expected |= valid & (labels > neighbour)
        assert np.array_equal(edges, expected)
        assert edges.any()
        # Every boundary between two regions is marked on one side or the other.
        horizontal = labels[:, 1:] != labels[:, :-1]
        assert np.all(edges[:, 1:][horizontal] | edges[:, :-1][horizontal])


def test_mask_is_the_silhouettes_and_matches_the_picture():
    for scene in _scenes(40, seed=6):
        mask = np.asarray(scenes.render_mask(scene, 32)) > 0
        assert np.array_equal(mask, scenes.layout(scene, 32).labels > 0)
        picture, background = (np.asarray(draw(scene), float) for draw in (scenes.render, scenes.render_background))
        difference = np.abs(picture - background).max(axis=-1)
        assert difference[~mask].mean() < 20  # only anti-aliased rims differ off the objects
        assert difference[mask].mean() > 60


def test_depth_map_orders_objects_near_bright_and_background_black():
    for scene in _scenes(60, seed=7, num_objects=2) + [OVERLAPPING]:
        depth = np.asarray(scenes.render_depth(scene, 32)).astype(int)
        labels = scenes.layout(scene, 32).labels
        plan = scenes.layout(scene, 32)
        assert np.all(depth[labels == 0] == 0)
        values = {}
        for label, part in enumerate(plan.parts, start=1):
            shown = depth[labels == label]
            if shown.size:
                assert np.all(shown == shown[0])  # constant per object
                values[part.object_index] = int(shown[0])
        for a, value_a in values.items():
            for b, value_b in values.items():
                if scene.objects[a].depth < scene.objects[b].depth:
                    assert value_a > value_b


def test_nearer_object_hides_the_farther_one():
    labels = scenes.layout(OVERLAPPING, 32).labels
    masks = scenes.layout(OVERLAPPING, 32).object_masks
    overlap = masks[0] & masks[1]
    assert overlap.sum() > 10
    owners = np.array([-1] + [p.object_index for p in scenes.layout(OVERLAPPING, 32).parts])
    assert np.all(owners[labels[overlap]] == 0)  # the circle (depth 0.3) is in front
    swapped = replace(OVERLAPPING, objects=(replace(OVERLAPPING.objects[0], depth=0.7),
                                            replace(OVERLAPPING.objects[1], depth=0.3)))
    owners = np.array([-1] + [p.object_index for p in scenes.layout(swapped, 32).parts])
    assert np.all(owners[scenes.layout(swapped, 32).labels[overlap]] == 1)


def test_sketch_is_dark_strokes_on_white_near_the_edges():
    for scene in _scenes(30, seed=8):
        sketch = np.asarray(scenes.render_sketch(scene, 32))
        edges = np.asarray(scenes.render_edges(scene, 32)) > 0
        ink = sketch < 128
        assert ink.any() and np.median(sketch) == 255
        assert np.all(metrics.dilate(edges, 2)[ink])


def test_subject_catalogue():
    assert len(scenes.SUBJECTS) == 24 and len(scenes.HELD_OUT_SUBJECTS) == 6
    assert set(scenes.SEEN_SUBJECTS).isdisjoint(scenes.HELD_OUT_SUBJECTS)
    assert {scenes.SUBJECTS[i].kind for i in scenes.HELD_OUT_SUBJECTS} == set(scenes.SUBJECT_KINDS)
    visual = [(s.shape, s.colour, s.pattern, s.feature_shape, s.feature_colour, s.placement) for s in scenes.SUBJECTS]
    for i in range(len(visual)):
        for j in range(i + 1, len(visual)):
            assert sum(a != b for a, b in zip(visual[i], visual[j])) >= 3, (i, j)
    colourless = {(s.shape, s.pattern, s.feature_shape, s.placement) for s in scenes.SUBJECTS}
    assert len(colourless) == len(scenes.SUBJECTS)  # identifiable under a palette-remapping style
    for subject in scenes.SUBJECTS:
        body, feature = (np.asarray(scenes.COLOURS[c], float) for c in (subject.colour, subject.feature_colour))
        assert np.abs(body - feature).max() >= scenes.MIN_CONTRAST
    # Text alone does not pin a subject down: every kind names several subjects.
    assert all(sum(s.kind == kind for s in scenes.SUBJECTS) >= 4 for kind in scenes.SUBJECT_KINDS)


def test_subject_reference_shows_the_subject_alone_on_a_plain_background():
    image = scenes.render_subject_reference(3, np.random.default_rng(0), 32)
    pixels = np.asarray(image)
    corners = pixels[[0, 0, -1, -1], [0, -1, 0, -1]]
    assert image.size == (32, 32)
    assert np.all(corners == corners[0])  # plain: the corners agree
    with pytest.raises(ValueError, match="subject"):
        scenes.render_subject_reference(99, np.random.default_rng(0))


def test_styles_change_the_picture_but_not_the_layout():
    rng = np.random.default_rng(9)
    base = scenes.sample_scene(rng)
    plain = np.asarray(scenes.render(base), float)
    for style in scenes.STYLES:
        styled = replace(base, style=style.name)
        assert np.array_equal(scenes.layout(styled).labels, scenes.layout(base).labels)
        assert np.abs(np.asarray(scenes.render(styled), float) - plain).mean() > 5, style.name
    assert set(scenes.HELD_OUT_STYLES) < {s.name for s in scenes.STYLES}
    assert set(scenes.SEEN_STYLES).isdisjoint(scenes.HELD_OUT_STYLES)
    with pytest.raises(ValueError, match="style"):
        scenes.sample_scene(rng, style="watercolour")


def test_caption_describes_each_object():
    scene = OVERLAPPING
    text = scenes.caption(scene)
    assert text == "a large red circle on the left and a large blue square in the center on a plain beige background"
    phrasings = {scenes.caption(scene, np.random.default_rng(i)) for i in range(30)}
    assert len(phrasings) == len(scenes.CAPTION_TEMPLATES)
    subject_scene = Scene(Background("navy", "stripes"),
                          (scenes.SUBJECTS[0].instance(size="small", position=(0.75, 0.25)),))
    assert scenes.caption(subject_scene) == "a small robot at the top right on a striped navy background"
    assert scenes.caption(subject_scene, markers={0: "[ref#1]"}).startswith("a small [ref#1] at the top right")


def test_scene_round_trips_through_a_dict():
    for scene in _mixed_scenes(6, seed=10):
        assert Scene.from_dict(scene.to_dict()) == scene


def test_masked_render_is_grey_in_the_hole_only():
    scene = _scenes(1, seed=11)[0]
    hole = scenes.sample_hole(scene, np.random.default_rng(0), 32)
    inside = np.asarray(hole) > 0
    masked = np.asarray(scenes.render_masked(scene, hole, 32))
    assert 0.05 < inside.mean() < 0.3
    assert np.all(masked[inside] == 127)
    assert np.array_equal(masked[~inside], np.asarray(scenes.render(scene))[~inside])


def test_bad_sizes_and_counts_are_refused():
    with pytest.raises(ValueError, match="size"):
        scenes.render(OVERLAPPING, 4)
    with pytest.raises(ValueError, match="num_objects"):
        scenes.sample_scene(np.random.default_rng(0), num_objects=5)


# --------------------------------------------------------------------------------------------
# Tasks and splits


def _template_pattern(template: str) -> re.Pattern:
    parts = re.split(r"\{[a-z0-9]+\}", template)
    return re.compile("^" + ".+".join(re.escape(part) for part in parts) + "$", re.DOTALL)


@pytest.fixture(scope="module")
def splits():
    return {
        (name, split): tasks.make_split(name, split, 16, seed=0)
        for name in tasks.BENCH_TASKS
        for split in tasks.SPLITS
    }


def test_every_instruction_validates(splits):
    for (name, split), examples in splits.items():
        for example in examples:
            instruction = example.instruction
            assert instruction.validate() == [], (name, instruction.text)
            assert sorted(instruction.referenced_ids()) == sorted(c.id for c in instruction.contexts)
            for context in instruction.contexts:
                assert parse_markers(context.text) == [context.id]
                assert context.image.size == (32, 32)
            assert example.target.size == (32, 32) and example.target.mode == "RGB"
            assert np.array_equal(np.asarray(example.target), np.asarray(scenes.render(example.scene)))
            assert example.meta["task"] == name and example.meta["split"] == split


def test_contexts_follow_the_product_conventions(splits):
    expected = {
        "text_to_image": [], "edge_to_image": ["edge"], "sketch_to_image": ["sketch"], "mask_to_image": ["mask"],
        "depth_to_image": ["depth"], "subject": ["subject"], "styled_generation": ["style"],
        "style_transfer": ["edge", "style"], "inpainting": ["image"], "subject_style": ["subject", "style"],
        "multi_subject": ["subject", "subject"], "control_subject": ["subject", "edge"],
    }
    for (name, _), examples in splits.items():
        for example in examples:
            modalities = [c.modality for c in example.instruction.contexts]
            if name == "control_style":
                assert modalities[1] == "style" and modalities[0] in ("sketch", "mask", "depth")
            else:
                assert modalities == expected[name]
            edge = [c for c in example.instruction.contexts if c.modality == "edge"]
            if edge:
                shown = np.asarray(edge[0].image.convert("L"))  # contexts hold RGB
                assert np.array_equal(shown, np.asarray(scenes.render_edges(example.scene)))
            # No text names a style: it has to be read from the reference image.
            words = example.instruction.text + " ".join(c.text for c in example.instruction.contexts)
            assert not any(style.name in words for style in scenes.STYLES)


def test_splits_are_deterministic_and_disjoint():
    again = tasks.make_split("subject", "train", 24, seed=0)
    first = tasks.make_split("subject", "train", 24, seed=0)
    assert [e.instruction.text for e in again] == [e.instruction.text for e in first]
    assert all(np.array_equal(np.asarray(a.target), np.asarray(b.target)) for a, b in zip(again, first))
    for name in ("text_to_image", "subject"):
        train = {e.scene for e in tasks.make_split(name, "train", 100, seed=0)}
        test = {e.scene for e in tasks.make_split(name, "test", 100, seed=0)}
        assert len(train) == 100 and len(test) == 100 and train.isdisjoint(test)
    other_seed = tasks.make_split("subject", "train", 24, seed=1)
    assert {e.scene for e in other_seed}.isdisjoint({e.scene for e in first})


def test_held_out_phrasings_are_only_in_test(splits):
    for name, task in tasks.BENCH_TASKS.items():
        held_out = _template_pattern(task.templates[-1])
        assert all(held_out.match(e.instruction.text) for e in splits[name, "test"])
        assert not any(held_out.match(e.instruction.text) for e in splits[name, "train"])
        assert all(e.meta["template"] < len(task.templates) - 1 for e in splits[name, "train"])
        assert {e.meta["template"] for e in splits[name, "test"]} == {len(task.templates) - 1}


def _entities(example):
    subjects = {o.subject for o in example.scene.objects if o.subject is not None}
    styles = {example.scene.style} - {None}
    return subjects, styles


def test_held_out_subjects_and_styles_appear_only_in_zero_shot_tests(splits):
    held_subjects, held_styles = set(scenes.HELD_OUT_SUBJECTS), set(scenes.HELD_OUT_STYLES)
    for (name, split), examples in splits.items():
        zero_shot_test = name in tasks.ZERO_SHOT_TASKS and split == "test"
        for example in examples:
            subjects, styles = _entities(example)
            if zero_shot_test:
                assert subjects <= held_subjects and styles <= held_styles
            else:
                assert subjects.isdisjoint(held_subjects) and styles.isdisjoint(held_styles), (name, split)
    dataset = tasks.BenchmarkTaskDataset(length=150, seed=0)
    for index in range(len(dataset)):
        subjects, styles = _entities(dataset.example(index))
        assert subjects.isdisjoint(held_subjects) and styles.isdisjoint(held_styles)
    for item in tasks.stage1_items(120, seed=0):
        assert item.extra.get("style") not in held_styles
        assert item.extra.get("subject") not in {f"subject-{i}" for i in held_subjects}


def test_zero_shot_tests_use_every_held_out_entity():
    examples = tasks.make_split("subject_style", "test", 80, seed=0)
    assert {e.scene.style for e in examples} == set(scenes.HELD_OUT_STYLES)
    assert {s for e in examples for s in e.meta["subjects"]} == set(scenes.HELD_OUT_SUBJECTS)


def test_mixture_dataset_yields_training_examples_by_weight():
    dataset = tasks.BenchmarkTaskDataset({"text_to_image": 3, "subject": 1}, length=200, seed=5)
    example = dataset[0]
    assert isinstance(example, TrainingExample) and example.task in ("text_to_image", "subject")
    counts = {"text_to_image": 0, "subject": 0}
    for index in range(len(dataset)):
        counts[dataset.example(index).task] += 1
    assert 120 < counts["text_to_image"] < 180
    again = tasks.BenchmarkTaskDataset({"text_to_image": 3, "subject": 1}, length=200, seed=5)
    assert again[17].instruction.text == dataset[17].instruction.text
    assert np.array_equal(np.asarray(again[17].target), np.asarray(dataset[17].target))
    with pytest.raises(IndexError):
        dataset[200]
    with pytest.raises(ValueError, match="multi_subject: a zero-shot task"):
        tasks.BenchmarkTaskDataset({"multi_subject": 1.0})
    with pytest.raises(ValueError, match="unknown task"):
        tasks.BenchmarkTaskDataset({"text_to_imagen": 1.0})
    assert len(tasks.BenchmarkTaskDataset(length=3)) == 3


def test_stage1_items_have_near_neighbours():
    from instruct_core.train.retrieval import PixelEmbedder

    items = tasks.stage1_items(80, seed=0, variants=4, move_objects=False)
    assert len(items) == 80 and all(isinstance(i, ImageTextItem) and i.image is not None for i in items)
    assert len({i.key for i in items}) == 80
    vectors = PixelEmbedder().embed(items)
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -np.inf)
    bases = np.array([item.extra["base"] for item in items])
    nearest = similarity.argmax(axis=1)
    assert (bases[nearest] == bases).mean() > 0.6
    again = tasks.stage1_items(80, seed=0, move_objects=False)
    assert [i.caption for i in again] == [i.caption for i in items]


def test_stage1_neighbours_show_the_same_objects_elsewhere():
    import re

    places = ("top left", "top right", "bottom left", "bottom right", "top", "bottom", "left", "right", "center")
    where = re.compile("|".join(places))
    items = tasks.stage1_items(200, seed=0)
    groups = {}
    for item in items:
        groups.setdefault(item.extra["base"], []).append(item.caption)
    shape = re.compile("|".join(scenes.SHAPES))
    moved = 0
    for captions in groups.values():
        assert len({tuple(sorted(shape.findall(c))) for c in captions}) == 1  # the same objects
        moved += len({tuple(where.findall(c)) for c in captions}) > 1  # in other places
    assert moved / len(groups) > 0.8
    assert [i.caption for i in tasks.stage1_items(200, seed=0)] == [i.caption for i in items]


def test_bench_sizes_other_than_32():
    example = tasks.make_split("style_transfer", "test", 1, seed=0, size=64)[0]
    assert example.target.size == (64, 64)
    assert all(c.image.size == (64, 64) for c in example.instruction.contexts)


# --------------------------------------------------------------------------------------------
# Metrics from ground truth


def test_edge_f1_basics():
    truth = np.zeros((16, 16), bool)
    truth[4, 2:12] = True
    assert metrics.edge_f1(truth, truth) == 1.0
    assert metrics.edge_f1(np.roll(truth, 1, axis=0), truth) == 1.0  # within the 1-pixel tolerance
    assert metrics.edge_f1(np.roll(truth, 3, axis=0), truth) == 0.0
    assert metrics.edge_f1(np.zeros_like(truth), truth) == 0.0
    assert metrics.edge_f1(np.zeros_like(truth), np.zeros_like(truth)) == 1.0
    with pytest.raises(ValueError, match="shape"):
        metrics.edge_f1(truth, truth[:8])


def test_ground_truth_scores_itself_perfectly_and_blanks_score_nothing():
    rng = np.random.default_rng(0)
    plain, styled, empty, flat, noise = [], [], [], [], []
    for scene in _mixed_scenes(60, seed=12):
        truth = np.asarray(scenes.render_edges(scene)) > 0
        score = metrics.edge_f1(metrics.extract_edges(scenes.render(scene), scene), truth)
        (styled if scene.style else plain).append(score)
        empty.append(metrics.edge_f1(metrics.extract_edges(scenes.render_background(scene), scene), truth))
        for value in (0, 128, 255):
            blank = np.full((32, 32, 3), value, np.uint8)
            flat.append(metrics.edge_f1(metrics.extract_edges(blank, scene), truth))
        random = rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)
        noise.append(metrics.edge_f1(metrics.extract_edges(random, scene), truth))
    assert np.mean(plain) > 0.98 and min(plain) > 0.8
    assert np.mean(styled) > 0.85
    assert max(empty) == 0.0
    # A flat colour near a patterned background's second colour can cross the foreground
    # threshold along the pattern, so a few flat images score a little.
    assert np.mean(flat) < 0.1
    assert np.mean(noise) < 0.4


def test_mask_iou_and_depth_order_of_the_ground_truth():
    ious = [metrics.mask_iou(scenes.render(scene), scene) for scene in _scenes(60, seed=13)]
    assert np.mean(ious) > 0.9
    scene = _scenes(1, seed=14)[0]
    background = scenes.render_background(scene)
    assert metrics.mask_iou(background, scene) == 0.0
    assert metrics.depth_order(scenes.render(OVERLAPPING), OVERLAPPING) > 0.9
    swapped = replace(OVERLAPPING, objects=(replace(OVERLAPPING.objects[0], depth=0.7),
                                            replace(OVERLAPPING.objects[1], depth=0.3)))
    assert metrics.depth_order(scenes.render(swapped), OVERLAPPING) < 0.1
    apart = _scenes(1, seed=15, num_objects=1)[0]
    assert metrics.depth_order(scenes.render(apart), apart) is None


def test_hole_agreement():
    example = tasks.make_split("inpainting", "test", 1, seed=0)[0]
    hole = example.meta["hole"]
    assert metrics.hole_agreement(example.target, example.target, hole) == 1.0
    masked = example.instruction.contexts[0].image
    assert metrics.hole_agreement(masked, example.target, hole) < 0.5


# --------------------------------------------------------------------------------------------
# The evaluator and the scores


@pytest.fixture(scope="session")
def evaluator():
    # A short run: enough to check that it learns, not the full-accuracy instrument.
    return metrics.train_evaluator(seed=0, steps=250, batch_size=32, pool_size=1500, width=16)


def test_evaluator_learns_from_renders(evaluator):
    accuracy = metrics.evaluator_accuracy(evaluator, n=100)
    # Chance is 1/9 for the cell, 1/8 for colour, 1/6 for shape; the full run reaches over 0.95.
    assert accuracy["position"] > 0.9
    assert accuracy["colour"] > 0.9
    assert accuracy["shape"] > 0.35
    assert accuracy["clean"] > 0.6


def test_evaluator_training_is_deterministic():
    first = metrics.train_evaluator(seed=3, steps=4, batch_size=8, pool_size=32)
    second = metrics.train_evaluator(seed=3, steps=4, batch_size=8, pool_size=32)
    for a, b in zip(first.network.state_dict().values(), second.network.state_dict().values()):
        assert torch.equal(a, b)


def test_evaluator_round_trips_through_safetensors(evaluator, tmp_path):
    path = tmp_path / "evaluator.safetensors"
    evaluator.save(path)
    loaded = metrics.Evaluator.load(path)
    images = [scenes.render(s) for s in _mixed_scenes(4, seed=16)]
    a, b = evaluator.predict(images), loaded.predict(images)
    for name in ("shape", "colour", "size", "subject", "style", "clean"):
        assert np.allclose(getattr(a, name), getattr(b, name), atol=1e-6)
    assert a.shape.shape == (4, 9, len(scenes.SHAPES) + 1) and a.clean.shape == (4,)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a benchmark evaluator"):
        metrics.Evaluator.load(tmp_path / "other.safetensors")


def test_target_scores_higher_than_noise_on_every_task(evaluator):
    rng = np.random.default_rng(0)
    for name in tasks.BENCH_TASKS:
        examples = tasks.make_split(name, "test", 4, seed=2)
        noise = [Image.fromarray(rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)) for _ in examples]
        good = metrics.score_batch(examples, [e.target for e in examples], evaluator)
        bad = metrics.score_batch(examples, noise, evaluator)
        for score in good:
            assert set(metrics.SC_COMPONENTS[name]) <= set(score)
            assert 0.0 <= score["overall"] <= 1.0 and score["overall"] == np.sqrt(score["sc"] * score["pq"])
        # The test's evaluator is a short run, so compare means rather than every pair.
        assert np.mean([s["overall"] for s in good]) > np.mean([s["overall"] for s in bad]) + 0.1, name
        single = metrics.score_example(examples[0], examples[0].target.resize((64, 64)), evaluator)
        assert single["task"] == name and 0.0 <= single["sc"] <= 1.0
    summary = metrics.summarise(good + bad)
    assert summary[name]["count"] == 8


def test_control_metrics_score_the_ground_truth_perfectly(evaluator):
    for name, metric in (("edge_to_image", "edge_f1"), ("mask_to_image", "mask_iou"), ("inpainting", "hole")):
        examples = tasks.make_split(name, "test", 6, seed=3)
        scores = metrics.score_batch(examples, [e.target for e in examples], evaluator)
        assert np.mean([s[metric] for s in scores]) > 0.9, name
