"""`python -m instruct_core demo`: the bundled example instructions, each generated and written beside its
contexts, and a contact sheet of them all.

The examples ship with the package (`default_model/examples/<task>/instruction.json` and its context images: one
held-out example of every benchmark task the bundled model was measured on). Each gets a folder `OUT/<task>/`
holding `instruction.json` (loadable by `generate` and the nodes), its context images and `result.png`; an example
that carries a ground truth (the harness's `python -m instruct_bench demo` renders them) also gets
`ground_truth.png`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw

from .guidance import GuidanceConfig
from .models import DEFAULT_MODEL_DIR, DEFAULT_TEXT_SCALE
from .pipeline import save_png, tensor_to_pil

EXAMPLES_DIR = DEFAULT_MODEL_DIR / "examples"
CELL = 132         # contact-sheet cell size: 128x128 results at their own size, 32x32 contexts enlarged 4x
LABEL_WIDTH = 150
MAX_CONTEXT_COLUMNS = 3


@dataclasses.dataclass
class DemoExample:
    name: str
    instruction: object  # MultiModalInstruction
    ground_truth: Image.Image | None = None


@dataclasses.dataclass
class DemoItem:
    name: str
    folder: Path
    text: str
    contexts: list[Image.Image]
    result: Image.Image
    ground_truth: Image.Image | None


def shipped_example_names(folder: Path = EXAMPLES_DIR) -> list[str]:
    return sorted(p.parent.name for p in folder.glob("*/instruction.json"))


def shipped_examples(names: list[str], folder: Path = EXAMPLES_DIR) -> list[DemoExample]:
    """The named example instructions shipped with the package, loaded and checked like any user's."""
    from .instruction import load_instruction

    return [DemoExample(name, load_instruction(folder / name / "instruction.json", root=folder / name))
            for name in names]


def run_demo(pipe, out_dir: Path, examples: list[DemoExample], *, seed: int = 0, steps: int = 12,
             text_scale: float = DEFAULT_TEXT_SCALE, context_scale: float = GuidanceConfig.context_scale,
             log: Callable[[str], None] = print, progress=None, upscale: bool = True) -> Path:
    """Generate every example with `pipe`, write the folders and return the contact sheet's path. The guidance
    scales default to those the bundled model was measured with. `progress(done, total)` follows the examples;
    `upscale` runs the model's super-resolution stage (where it has one) on every result."""
    size = pipe.native_size
    guidance = GuidanceConfig(text_scale, context_scale)
    items = []
    for done, example in enumerate(examples):
        cond = pipe.encode_instruction(example.instruction, (size, size))
        images = pipe.sample(cond, seed=seed, steps=steps, guidance=guidance, width=size, height=size,
                             upscale=upscale).images
        item = write_example_folder(out_dir / example.name, example, tensor_to_pil(images[0]))
        items.append(item)
        log(f"{example.name}: {item.folder / 'result.png'}")
        if progress is not None:
            progress(done + 1, len(examples))
    return write_contact_sheet(items, out_dir / "contact_sheet.png")


def save_example(folder: Path, instruction) -> list[Image.Image]:
    """`instruction.json` and its context images (and masks) in `folder`; returns the context images."""
    from .instruction import save_instruction

    folder.mkdir(parents=True, exist_ok=True)
    contexts = []
    for context in instruction.contexts:
        name = f"context_{context.id}_{context.modality}.png"
        save_png(context.image, folder / name)
        mask_name = None
        if context.mask is not None:
            mask_name = f"context_{context.id}_mask.png"
            save_png(context.mask, folder / mask_name)
        contexts.append(dataclasses.replace(context, image_source=name, mask_source=mask_name))
    save_instruction(dataclasses.replace(instruction, contexts=contexts, base_dir=folder.absolute()),
                     folder / "instruction.json")
    return [context.image for context in contexts]


def write_example_folder(folder: Path, example: DemoExample, result: Image.Image) -> DemoItem:
    contexts = save_example(folder, example.instruction)
    save_png(result, folder / "result.png")
    if example.ground_truth is not None:
        save_png(example.ground_truth, folder / "ground_truth.png")
    return DemoItem(example.name, folder, example.instruction.text, contexts, result, example.ground_truth)


def write_contact_sheet(items: list[DemoItem], path: Path) -> Path:
    """Rows: example and instruction | up to three contexts | result | ground truth (where the examples have one)."""
    with_truth = any(item.ground_truth is not None for item in items)
    titles = ["context"] * MAX_CONTEXT_COLUMNS + ["result"] + (["ground truth"] if with_truth else [])
    header = 20
    sheet = Image.new("RGB", (LABEL_WIDTH + len(titles) * CELL, header + len(items) * CELL), "white")
    draw = ImageDraw.Draw(sheet)
    for column, title in enumerate(titles):
        draw.text((LABEL_WIDTH + column * CELL + 4, 4), title, fill="black")
    for row, item in enumerate(items):
        top = header + row * CELL
        draw.text((4, top + 4), item.name, fill="black")
        for line, chunk in enumerate(wrap_words(item.text, 24)[:6]):
            draw.text((4, top + 20 + 12 * line), chunk, fill=(90, 90, 90))
        cells = item.contexts[:MAX_CONTEXT_COLUMNS] + [None] * (MAX_CONTEXT_COLUMNS - len(item.contexts))
        cells += [item.result] + ([item.ground_truth] if with_truth else [])
        for column, image in enumerate(cells):
            if image is not None:
                sheet.paste(image.convert("RGB").resize((CELL - 4, CELL - 4), Image.NEAREST),
                            (LABEL_WIDTH + column * CELL + 2, top + 2))
    save_png(sheet, path)
    return path


def wrap_words(text: str, width: int) -> list[str]:
    lines, current = [], ""
    for word in text.split():
        if current and len(current) + 1 + len(word) > width:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}".strip()
    return lines + ([current] if current else [])
