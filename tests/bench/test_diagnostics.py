"""The diagnoses of what limits the bundled model: where its images put the named colours, and which object they
draw in front, read from the images themselves."""

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from instruct_bench import scenes, tasks
from instruct_bench.cli import main
from instruct_bench.diagnostics import colour_reading, drawing_report, drawn_depth_order
from instruct_bench.evaluation import EVALUATOR_FILE, EvalSettings, load_evaluator
from instruct_bench.metrics import EvaluatorOutput

needs_evaluator = pytest.mark.skipif(not EVALUATOR_FILE.is_file(), reason="no evaluator bundled")


def _reading(colours_at_cells: dict[int, str]) -> EvaluatorOutput:
    """An evaluator's reading of one image: the given colour at each given cell, nothing elsewhere."""
    colour = np.full((1, 9, len(scenes.COLOURS)), 0.01, dtype=np.float32)
    for cell, name in colours_at_cells.items():
        colour[0, cell, list(scenes.COLOURS).index(name)] = 0.9
    empty = np.zeros((1, 9, 2), dtype=np.float32)
    return EvaluatorOutput(shape=empty, colour=colour, size=empty, subject=empty, style=np.zeros((1, 2)),
                           clean=np.ones(1))


def _two_object_example(first: str, second: str):
    rng = np.random.default_rng(3)
    scene = scenes.sample_scene(rng, num_objects=2)
    objects = (replace(scene.objects[0], colour=first, subject=None),
               replace(scene.objects[1], colour=second, subject=None))
    scene = replace(scene, objects=objects, style=None)
    return tasks.BenchExample("text_to_image", None, None, scene, {})


def test_colour_reading_tells_colours_at_their_place_from_swapped_and_missing_ones():
    example = _two_object_example("red", "blue")
    first, second = (obj.cell for obj in example.scene.objects)
    right = colour_reading([example], _reading({first: "red", second: "blue"}))
    assert (right["at_place"], right["elsewhere"], right["absent"], right["objects"]) == (1.0, 0.0, 0.0, 2)
    assert right["at_place_2"] == 1.0
    swapped = colour_reading([example], _reading({first: "blue", second: "red"}))
    assert (swapped["at_place"], swapped["elsewhere"], swapped["absent"]) == (0.0, 1.0, 0.0)
    missing = colour_reading([example], _reading({first: "red", second: "green"}))
    assert (missing["at_place"], missing["elsewhere"], missing["absent"]) == (0.5, 0.0, 0.5)


def test_a_colour_two_objects_share_is_not_counted_as_drawn_on_the_other():
    example = _two_object_example("red", "red")
    first, second = (obj.cell for obj in example.scene.objects)
    reading = colour_reading([example], _reading({first: "green", second: "red"}))
    assert (reading["at_place"], reading["elsewhere"], reading["absent"]) == (0.5, 0.0, 0.5)


@pytest.fixture(scope="module")
def depth_examples():
    settings = EvalSettings()
    examples = tasks.make_split("depth_to_image", settings.split, 16, seed=settings.seed)
    return [e for e in examples if drawn_depth_order(e.target, e.scene) is not None]


def test_drawn_depth_order_reads_the_true_image_and_its_swap(depth_examples):
    assert len(depth_examples) >= 8
    for example in depth_examples:
        swapped = tasks.swap_depths(example)
        assert drawn_depth_order(example.target, example.scene) > 0.9
        # the other object drawn in front, judged against the scene that puts the first one in front
        assert drawn_depth_order(swapped.target, example.scene) < 0.1


def test_drawn_depth_order_needs_no_named_colour_but_two_drawn_ones(depth_examples):
    example = depth_examples[0]
    pixels = np.asarray(example.target).astype(np.int16)
    recoloured = Image.fromarray(np.clip(255 - pixels, 0, 255).astype(np.uint8))  # every colour changed
    assert drawn_depth_order(recoloured, example.scene) > 0.9
    flat = Image.new("RGB", example.target.size, (128, 128, 128))
    assert drawn_depth_order(flat, example.scene) is None


def test_drawn_depth_order_is_none_without_overlapping_objects():
    example = _two_object_example("red", "blue")
    apart = not np.triu(scenes.overlaps(example.scene), 1).any()
    assert apart and drawn_depth_order(scenes.render(example.scene, 32), example.scene) is None


@needs_evaluator
def test_the_drawing_report_on_the_true_images_reads_every_colour_and_order():
    report = drawing_report(None, load_evaluator(), EvalSettings(examples_per_task=6))
    assert set(report) == {"text_to_image", "edge_to_image", "sketch_to_image", "mask_to_image", "depth_to_image"}
    for task, reading in report.items():
        assert reading["at_place"] >= 0.9 and reading["elsewhere"] == 0.0, task
    depth = report["depth_to_image"]
    assert depth["depth_order"] > 0.95 and depth["drawn_depth_order"] > 0.95 and depth["drawn_swap"] == 1.0
    assert depth["drawn_readable"] >= 3 and depth["depth_order_readable"] == 6


def test_diagnose_refuses_the_true_images_without_examples(capsys):
    assert main(["diagnose", "--variants", "truth", "--examples", "0"]) == 2
    assert "truth" in capsys.readouterr().err
    assert main(["diagnose", "--examples", "-1"]) == 2
