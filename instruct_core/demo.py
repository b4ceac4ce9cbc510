"""`python -m instruct_core demo`: one generated image per benchmark task, each beside its instruction and
contexts, and a contact sheet of them all.

Each task gets a folder `OUT/<task>/` holding `instruction.json` (loadable by `generate` and the nodes),
its context images, `result.png` and `ground_truth.png` (the benchmark's exact render of what was asked).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from PIL import Image, ImageDraw

from .evaluation import EvalSettings
from .pipeline import save_png, tensor_to_pil

CELL = 96          # contact-sheet cell size; the default model draws 32x32, enlarged without smoothing
LABEL_WIDTH = 150
MAX_CONTEXT_COLUMNS = 3


@dataclasses.dataclass
class DemoItem:
    task: str
    folder: Path
    text: str
    contexts: list[Image.Image]
    result: Image.Image
    ground_truth: Image.Image


def demo_examples(tasks: list[str], seed: int, size: int):
    """The first test example of every task (held-out phrasings; held-out entities for zero-shot tasks)."""
    from .bench_tasks import make_split

    return [make_split(task, "test", n=1, seed=seed, size=size)[0] for task in tasks]


def run_demo(pipe, out_dir: Path, tasks: list[str], *, seed: int = 0, steps: int = 12,
             text_scale: float = EvalSettings.text_scale, context_scale: float = EvalSettings.context_scale,
             log=print) -> Path:
    """Generate every task's example with `pipe`, write the folders and return the contact sheet's path. The
    guidance scales are the evaluation's (docs/RESULTS.md), so the demo shows what the tables measure."""
    from .guidance import GuidanceConfig

    size = pipe.native_size
    guidance = GuidanceConfig(text_scale, context_scale)
    items = []
    for example in demo_examples(tasks, seed, size):
        cond = pipe.encode_instruction(example.instruction, (size, size))
        images = pipe.sample(cond, seed=seed, steps=steps, guidance=guidance, width=size, height=size).images
        result = tensor_to_pil(images[0])
        item = write_task_folder(out_dir / example.task, example, result)
        items.append(item)
        log(f"{example.task}: {item.folder / 'result.png'}")
    return write_contact_sheet(items, out_dir / "contact_sheet.png")


def write_task_folder(folder: Path, example, result: Image.Image) -> DemoItem:
    from .instruction import save_instruction

    folder.mkdir(parents=True, exist_ok=True)
    contexts = []
    for context in example.instruction.contexts:
        name = f"context_{context.id}_{context.modality}.png"
        save_png(context.image, folder / name)
        mask_name = None
        if context.mask is not None:
            mask_name = f"context_{context.id}_mask.png"
            save_png(context.mask, folder / mask_name)
        contexts.append(dataclasses.replace(context, image_source=name, mask_source=mask_name))
    instruction = dataclasses.replace(example.instruction, contexts=contexts, base_dir=folder.absolute())
    save_instruction(instruction, folder / "instruction.json")
    save_png(result, folder / "result.png")
    save_png(example.target, folder / "ground_truth.png")
    return DemoItem(example.task, folder, example.instruction.text, [c.image for c in contexts], result,
                    example.target)


def write_contact_sheet(items: list[DemoItem], path: Path) -> Path:
    """Rows: task and instruction | up to three contexts | result | ground truth."""
    columns = MAX_CONTEXT_COLUMNS + 2
    header = 20
    sheet = Image.new("RGB", (LABEL_WIDTH + columns * CELL, header + len(items) * CELL), "white")
    draw = ImageDraw.Draw(sheet)
    for column, title in enumerate(["context"] * MAX_CONTEXT_COLUMNS + ["result", "ground truth"]):
        draw.text((LABEL_WIDTH + column * CELL + 4, 4), title, fill="black")
    for row, item in enumerate(items):
        top = header + row * CELL
        draw.text((4, top + 4), item.task, fill="black")
        for line, chunk in enumerate(_wrap(item.text, 24)[:6]):
            draw.text((4, top + 20 + 12 * line), chunk, fill=(90, 90, 90))
        cells = item.contexts[:MAX_CONTEXT_COLUMNS] + [None] * (MAX_CONTEXT_COLUMNS - len(item.contexts))
        for column, image in enumerate(cells + [item.result, item.ground_truth]):
            if image is not None:
                sheet.paste(image.convert("RGB").resize((CELL - 4, CELL - 4), Image.NEAREST),
                            (LABEL_WIDTH + column * CELL + 2, top + 2))
    save_png(sheet, path)
    return path


def _wrap(text: str, width: int) -> list[str]:
    lines, current = [], ""
    for word in text.split():
        if current and len(current) + 1 + len(word) > width:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}".strip()
    return lines + ([current] if current else [])
