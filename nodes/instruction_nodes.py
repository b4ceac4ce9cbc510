"""Building instructions: context images, the [ref#N] text with its contexts, and the JSON form."""

from __future__ import annotations

import logging
import os

import folder_paths
from comfy_api.latest import io

from ..instruct_core.instruction import (
    DEFAULT_MAX_CONTEXTS,
    DEFAULT_MODALITIES,
    InstructionError,
    MultiModalInstruction,
    parse_markers,
)
from . import paths
from .common import (
    CATEGORY,
    ContextInput,
    ContextSocket,
    Instruction,
    image_to_pil,
    mask_to_pil,
    node_errors,
    with_search_aliases,
)

# Context slots: the context plugged into slot ref_N is [ref#N] in the text.
SLOT_NAMES = tuple(f"ref_{n}" for n in range(1, DEFAULT_MAX_CONTEXTS + 1))
CONTEXTS_INPUT = "contexts"


class ContextImage(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return with_search_aliases(io.Schema(
            node_id="ContextImage",
            display_name="Context Image (Instruct-Imagen)",
            category=CATEGORY,
            description="One image the instruction refers to, with its modality and a short text saying what it "
                        "shows. Plug it into InstructionBuilder's slot ref_N to make it [ref#N].",
            inputs=[
                io.Image.Input("image"),
                io.Combo.Input("modality", options=list(DEFAULT_MODALITIES), default="subject"),
                io.String.Input("text", default="", placeholder="what the image shows, e.g. a red round toy",
                                tooltip="The marker text. Its [ref#N] marker may be left out: the builder puts "
                                        "the marker of the slot it is plugged into in front."),
                io.Float.Input("weight", default=1.0, min=0.0, max=10.0, step=0.05,
                               tooltip="How strongly this context is attended to (1 = as trained)."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Where in the output this context applies (1 = applies)."),
            ],
            outputs=[ContextSocket.Output(display_name="context")],
        ), "reference image", "ip adapter", "image prompt", "controlnet image", "style reference",
           "subject reference")

    @classmethod
    def execute(cls, image, modality: str, text: str, weight: float, mask=None) -> io.NodeOutput:
        with node_errors():
            parse_markers(text, field="text")
        picture = image_to_pil(image, "image")
        context_mask = None if mask is None else mask_to_pil(mask, picture.size, "mask")
        return io.NodeOutput(ContextInput(modality, text, picture, context_mask, float(weight)))


def _contexts_input():
    # Not optional: ComfyUI 0.8 reads an Autogrow template from its "required" section only. An unplugged
    # slot is still no error, since the server expands only the slots a prompt uses.
    template = ContextSocket.Input("context")
    autogrow = getattr(io, "Autogrow", None)
    if autogrow is not None:
        return [autogrow.Input(CONTEXTS_INPUT, template=autogrow.TemplateNames(template, names=list(SLOT_NAMES),
                                                                                min=1))]
    # Older ComfyUI without Autogrow: the same names as fixed optional inputs, so workflows stay valid.
    return [ContextSocket.Input(f"{CONTEXTS_INPUT}.{name}", optional=True) for name in SLOT_NAMES]


def _slot_contexts(contexts, kwargs) -> dict[int, object]:
    """{N: value} for the contexts plugged into slots ref_N (Autogrow dict, or flat fallback inputs)."""
    found = dict(contexts or {})
    prefix = CONTEXTS_INPUT + "."
    found.update({key[len(prefix):]: value for key, value in kwargs.items() if key.startswith(prefix)})
    return {SLOT_NAMES.index(name) + 1: value for name, value in found.items() if name in SLOT_NAMES}


def check_references(instruction: str, negative: str, connected: set[int]) -> None:
    """What can be checked before the contexts exist: markers well formed and each naming a plugged slot."""
    referenced = parse_markers(instruction, field="instruction")
    dangling = sorted({n for n in referenced if n not in connected})
    if dangling:
        n = dangling[0]
        where = f"slot ref_{n} is empty" if n <= len(SLOT_NAMES) else f"there are only {len(SLOT_NAMES)} slots"
        raise InstructionError(f"instruction: [ref#{n}] has no context ({where}); plug a ContextImage into "
                               f"ref_{n} or remove the marker")
    if parse_markers(negative, field="negative"):
        raise InstructionError("negative: [ref#N] markers are not allowed in the negative prompt")


class InstructionBuilder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return with_search_aliases(io.Schema(
            node_id="InstructionBuilder",
            display_name="Instruction Builder (Instruct-Imagen)",
            category=CATEGORY,
            description="The instruction text with [ref#N] markers; the context in slot ref_N is [ref#N]. "
                        "A marker whose slot is empty is reported before the prompt runs.",
            inputs=[
                io.String.Input("instruction", multiline=True,
                                default="Generate an image of [ref#1] on a sunny beach",
                                tooltip="Refer to contexts as [ref#1], [ref#2], ... exactly."),
                io.String.Input("negative", multiline=True, default="",
                                tooltip="Negative prompt (text only, no markers)."),
                *_contexts_input(),
            ],
            outputs=[Instruction.Output(display_name="instruction")],
        ), "prompt", "multimodal prompt", "ref#")

    @classmethod
    def validate_inputs(cls, instruction: str, negative: str = "", contexts=None, **kwargs):
        # Runs before execution: linked contexts are not computed yet, but which slots are plugged is known.
        try:
            check_references(instruction, negative or "", set(_slot_contexts(contexts, kwargs)))
        except InstructionError as error:
            return str(error)
        return True

    @classmethod
    def execute(cls, instruction: str, negative: str = "", contexts=None, **kwargs) -> io.NodeOutput:
        slots = {n: value for n, value in _slot_contexts(contexts, kwargs).items() if value is not None}
        with node_errors():
            check_references(instruction, negative, set(slots))
            built = MultiModalInstruction(text=instruction, negative=negative,
                                          contexts=[slots[n].with_id(n) for n in sorted(slots)])
            for warning in built.validate():
                logging.warning("[Instruct-Imagen] %s", warning.replace("contexts[", "context ["))
        return io.NodeOutput(built)


class InstructionFromJSON(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return with_search_aliases(io.Schema(
            node_id="InstructionFromJSON",
            display_name="Instruction from JSON (Instruct-Imagen)",
            category=CATEGORY,
            description="An instruction in the JSON format (version 1). Image paths are relative to ComfyUI's "
                        "input directory and may not leave it; data: URIs are fine.",
            inputs=[io.String.Input("json", multiline=True, default="")],
            outputs=[Instruction.Output(display_name="instruction")],
        ), "load instruction", "json instruction")

    @classmethod
    def execute(cls, json: str) -> io.NodeOutput:
        root = folder_paths.get_input_directory()
        with node_errors():
            return io.NodeOutput(MultiModalInstruction.from_json(json, base_dir=root, root=root))


class InstructionToJSON(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return with_search_aliases(io.Schema(
            node_id="InstructionToJSON",
            display_name="Instruction to JSON (Instruct-Imagen)",
            category=CATEGORY,
            description="The instruction as JSON (version 1) with its images embedded, also saved to the output "
                        "directory when filename_prefix is not empty.",
            inputs=[
                Instruction.Input("instruction"),
                io.String.Input("filename_prefix", default="instruct_imagen/instruction",
                                tooltip="Saved as output/<prefix>_00001.json; empty: do not save."),
            ],
            outputs=[io.String.Output(display_name="json")],
            is_output_node=True,
        ), "save instruction", "export instruction")

    @classmethod
    def execute(cls, instruction: MultiModalInstruction, filename_prefix: str) -> io.NodeOutput:
        with node_errors():
            text = instruction.to_json(embed_images=True)
        if not filename_prefix.strip():
            return io.NodeOutput(text)
        path = _numbered_output(filename_prefix.strip(), ".json")
        path.write_text(text + "\n", encoding="utf-8")
        return io.NodeOutput(text, ui={"text": [os.path.relpath(path, folder_paths.get_output_directory())]})


def _numbered_output(prefix: str, suffix: str):
    """output/<prefix>_NNNNN<suffix>, the next free number, with the prefix kept inside the output folder."""
    from pathlib import Path

    folder, _, stem = prefix.replace("\\", "/").rpartition("/")
    stem = paths.check_plain_name(stem, "filename_prefix")
    root = os.path.realpath(folder_paths.get_output_directory())
    directory = Path(os.path.realpath(os.path.join(root, folder)))
    if os.path.commonpath([root, str(directory)]) != root:
        raise ValueError(f"filename_prefix: {prefix!r} leads outside the output directory")
    directory.mkdir(parents=True, exist_ok=True)
    number = 1 + max((int(p.stem[len(stem) + 1:]) for p in directory.glob(f"{stem}_*{suffix}")
                      if p.stem[len(stem) + 1:].isdigit()), default=0)
    return directory / f"{stem}_{number:05d}{suffix}"
