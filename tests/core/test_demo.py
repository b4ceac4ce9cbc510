"""The demo: one folder per example with a loadable instruction, its contexts and result (and the benchmark's
ground truth where the harness renders the examples)."""

import json

import numpy as np
import pytest
from PIL import Image

from instruct_bench.demo import benchmark_examples
from instruct_core.cli import main
from instruct_core.demo import CELL, EXAMPLES_DIR, run_demo, shipped_example_names, shipped_examples
from instruct_core.instruction import load_instruction
from instruct_core.pipeline import InstructImagen
from instruct_core.tiny import build_tiny_base


@pytest.fixture(scope="module")
def pipe():
    return InstructImagen.from_base(build_tiny_base())


def test_each_example_folder_holds_a_loadable_instruction_and_its_images(pipe, tmp_path):
    tasks = ["edge_to_image", "multi_subject"]
    sheet = run_demo(pipe, tmp_path, benchmark_examples(tasks, seed=3, size=pipe.native_size), seed=3, steps=2,
                     log=lambda line: None)
    size = pipe.native_size
    for task in tasks:
        folder = tmp_path / task
        instruction = load_instruction(folder / "instruction.json", root=folder)
        assert [p.name for p in sorted(folder.glob("context_*.png"))] == sorted(
            json.loads((folder / "instruction.json").read_text())["contexts"][i]["image"]
            for i in range(len(instruction.contexts)))
        assert Image.open(folder / "result.png").size == (size, size)
        assert Image.open(folder / "ground_truth.png").size == (size, size)
        saved = np.asarray(Image.open(folder / instruction.contexts[0].image_source).convert("RGB"))
        assert np.array_equal(saved, np.asarray(instruction.contexts[0].image))
    assert len(load_instruction(tmp_path / "multi_subject" / "instruction.json").contexts) == 2
    image = Image.open(sheet)
    assert image.height == 20 + len(tasks) * CELL
    row = np.asarray(image.convert("RGB"))[20 + CELL // 2]
    assert (row < 250).any()  # the row holds pictures, not only white


def test_demo_is_reproducible_for_a_seed(pipe, tmp_path):
    for name in ("a", "b"):
        run_demo(pipe, tmp_path / name, shipped_examples(["subject"]), seed=5, steps=2, log=lambda line: None)
    first, second = (np.asarray(Image.open(tmp_path / n / "subject" / "result.png")) for n in ("a", "b"))
    assert np.array_equal(first, second)


def test_the_shipped_examples_are_the_benchmarks_demo_instructions():
    # `python -m instruct_bench demo-examples` writes them; a changed benchmark must be written again
    from instruct_bench.tasks import IN_DOMAIN_TASKS, ZERO_SHOT_TASKS

    assert shipped_example_names() == sorted(IN_DOMAIN_TASKS + ZERO_SHOT_TASKS)
    shipped = shipped_examples(["control_subject"])[0].instruction
    fresh = benchmark_examples(["control_subject"], seed=0, size=32)[0].instruction
    assert shipped.text == fresh.text
    assert [np.asarray(c.image).tolist() for c in shipped.contexts] == [np.asarray(c.image).tolist()
                                                                        for c in fresh.contexts]


def test_cli_demo_runs_the_shipped_examples_without_ground_truth_and_refuses_unknown_names(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--model", "tiny", "--out", str(out), "--tasks", "sketch_to_image", "--steps", "1"]) == 0
    assert (out / "contact_sheet.png").is_file() and (out / "sketch_to_image" / "result.png").is_file()
    assert not (out / "sketch_to_image" / "ground_truth.png").exists()
    assert (EXAMPLES_DIR / "sketch_to_image" / "instruction.json").is_file()
    assert main(["demo", "--model", "tiny", "--out", str(out), "--tasks", "sketch_to_imag"]) == 2
    assert "sketch_to_imag" in capsys.readouterr().err
    assert main(["demo", "--model", "tiny", "--out", str(out), "--steps", "0"]) == 2


def test_harness_demo_adds_the_ground_truth(tmp_path):
    from instruct_bench.cli import main as bench_main

    out = tmp_path / "demo"
    assert bench_main(["demo", "--model", "tiny", "--out", str(out), "--tasks", "subject", "--steps", "1"]) == 0
    assert (out / "subject" / "ground_truth.png").is_file()
