"""The demo with the benchmark's ground truth: `python -m instruct_bench demo` generates the first test example of
every benchmark task (held-out phrasings; held-out entities for zero-shot tasks) and writes each beside the
benchmark's exact render of what was asked (`ground_truth.png`). `python -m instruct_bench demo-examples` writes
the same instructions into the package, where `python -m instruct_core demo` finds them without the harness.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from instruct_core.demo import EXAMPLES_DIR, DemoExample, save_example

from .tasks import make_split


def benchmark_examples(tasks: list[str], seed: int, size: int) -> list[DemoExample]:
    """The first test example of every task, with its ground truth."""
    examples = [make_split(task, "test", n=1, seed=seed, size=size)[0] for task in tasks]
    return [DemoExample(e.task, e.instruction, e.target) for e in examples]


def write_shipped_examples(tasks: list[str], seed: int, size: int, folder: Path = EXAMPLES_DIR) -> list[Path]:
    """Replace the package's example instructions with the benchmark's (instruction and contexts only)."""
    if folder.exists():
        shutil.rmtree(folder)
    written = []
    for example in benchmark_examples(tasks, seed, size):
        save_example(folder / example.name, example.instruction)
        written.append(folder / example.name / "instruction.json")
    return written
