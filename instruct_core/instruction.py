"""Multi-modal instructions: a text with [ref#N] markers plus the image contexts they name.

An instruction such as "Render [ref#1] in the style of [ref#2]" comes with two contexts, each an
image with a modality ("subject", "style", "edge", ...) and a marker text ("[ref#1] a plush toy").
The JSON form (version 1) is the one interchange format; docs/INSTRUCTION_FORMAT.md describes it.

Loading validates everything and raises InstructionError, whose message starts with the field at
fault ("contexts[0].image: file not found: toy.png"). Documents may come from strangers, so
reading is bounded: document size, image pixels, image file formats and, given a `root`, the
folders image paths may reach are all limited.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import io
import json
import math
import os
import re
import stat
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .errors import InstructImagenError

__all__ = [
    "DEFAULT_MAX_CONTEXTS",
    "DEFAULT_MODALITIES",
    "FORMAT_VERSION",
    "IMAGE_FORMATS",
    "MAX_CONTEXT_ID",
    "MAX_DOCUMENT_BYTES",
    "MAX_IMAGE_FILE_BYTES",
    "MAX_IMAGE_PIXELS",
    "MAX_TEXT_CHARS",
    "RESIZE_POLICIES",
    "Context",
    "InstructionError",
    "InstructionWarning",
    "MultiModalInstruction",
    "load_instruction",
    "check_text",
    "normalize_markers",
    "parse_markers",
    "prepare_context_image",
    "prepare_mask",
    "read_image_file",
    "save_instruction",
    "to_mask",
    "to_rgb",
]

DEFAULT_MODALITIES = ("image", "subject", "style", "edge", "depth", "mask", "sketch")
FORMAT_VERSION = 1
DEFAULT_MAX_CONTEXTS = 16
MAX_CONTEXT_ID = 2**31 - 1
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_DOCUMENT_BYTES = 64 * 2**20
MAX_IMAGE_FILE_BYTES = 64 * 2**20
# Instruction, negative and context texts: checked in characters before tokenising. The encoder reads at
# most 8 windows of 75 tokens (pipeline.MAX_TEXT_WINDOWS); 16,384 characters leave room for long words.
MAX_TEXT_CHARS = 16384
# Surrogates are halves of UTF-16 pairs; alone they cannot be encoded as UTF-8 (JSON's "\ud800" makes one).
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# Only plain raster formats: Pillow's other plugins (EPS shells out to Ghostscript, for one)
# are more attack surface than an instruction needs.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
RESIZE_POLICIES = ("crop", "fit", "stretch")
# "crop" resizes the whole image, then cuts the target out of it, unless that intermediate image would hold more
# than this many times the target's pixels; then only the part that stays is resized (within a pixel of the same).
MAX_CROP_OVERSIZE = 4
# Frames a multi-frame file (GIF, TIFF) may declare; only the first is read.
MAX_IMAGE_FRAMES = 1024

_DATA_URI = re.compile(r"data:([^;,]*)((?:;[^;,]*)*),(.*)", re.DOTALL)

# Key -> required?
_DOCUMENT_KEYS = {"version": True, "text": True, "negative": False, "contexts": True}
_CONTEXT_KEYS = {
    "id": True,
    "modality": True,
    "text": False,
    "image": True,
    "mask": False,
    "weight": False,
}


class InstructionError(InstructImagenError, ValueError):
    """An instruction is malformed; the message starts with the field at fault."""


class InstructionWarning(UserWarning):
    """An instruction is valid but probably not what its author meant."""


# --------------------------------------------------------------------------------------------
# Data model


@dataclass
class Context:
    """One image the instruction refers to as [ref#id].

    `image` is converted to RGB and `mask` to L on construction (see `to_rgb`, `to_mask`).
    The mask, if any, has the image's size: white (255) where this context applies, black (0)
    where it does not, grey in between. `image_source`/`mask_source` keep the path or data URI
    the pixels came from, so writing the instruction back out reproduces its document.
    """

    id: int
    modality: str
    text: str
    image: Image.Image
    mask: Image.Image | None = None
    weight: float = 1.0
    # Where the pixels came from is not what the context means: two contexts with equal pixels
    # are equal whether read from a path or a data URI.
    image_source: str | None = dataclass_field(default=None, compare=False)
    mask_source: str | None = dataclass_field(default=None, compare=False)

    def __post_init__(self) -> None:
        self.text = normalize_markers(self.text)
        if isinstance(self.image, Image.Image):
            self.image = to_rgb(self.image)
        if isinstance(self.mask, Image.Image):
            self.mask = to_mask(self.mask)

    @property
    def marker(self) -> str:
        return f"[ref#{self.id}]"

    @property
    def marker_text(self) -> str:
        """The marker text as the context encoder should see it: always starts with its marker.

        Authors may leave the marker out of a context's text ("a plush toy"); it is put in front
        here rather than on load, so the stored text round-trips unchanged.
        """
        if self.id in parse_markers(self.text):
            return self.text
        return f"{self.marker} {self.text}".rstrip()


@dataclass
class MultiModalInstruction:
    """Instruction text with [ref#N] markers, the contexts they name, and a negative prompt.

    `base_dir` is the folder that relative image sources were resolved against; it is not part
    of the document and only lets `to_dict` rewrite those paths when saving elsewhere.
    """

    text: str
    contexts: list[Context]
    negative: str = ""
    base_dir: Path | None = dataclass_field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.text = normalize_markers(self.text)

    def referenced_ids(self) -> list[int]:
        """Context ids the text refers to, each once, in order of first appearance."""
        return list(dict.fromkeys(parse_markers(self.text)))

    def context_by_id(self, context_id: int) -> Context:
        for context in self.contexts:
            if context.id == context_id:
                return context
        raise KeyError(f"no context with id {context_id}")

    def validate(
        self,
        known_modalities: Iterable[str] | None = None,
        max_contexts: int | None = None,
    ) -> list[str]:
        """Raise InstructionError if the instruction is malformed; return its warnings.

        Warnings are returned, not emitted; `load_instruction` emits them as InstructionWarning.
        """
        known = DEFAULT_MODALITIES if known_modalities is None else tuple(known_modalities)
        limit = DEFAULT_MAX_CONTEXTS if max_contexts is None else max_contexts
        _require_prompt(self.text, "text", allow_empty=False)
        _require_prompt(self.negative, "negative")
        if not isinstance(self.contexts, list):
            raise InstructionError(f"contexts: expected a list, got {_type_name(self.contexts)}")
        _check_context_count(len(self.contexts), limit)
        for index, context in enumerate(self.contexts):
            _check_context(context, f"contexts[{index}]", known)
        _check_unique_ids(self.contexts)
        return _check_references(self)

    def to_dict(
        self,
        *,
        embed_images: bool = False,
        base_dir: str | os.PathLike | None = None,
    ) -> dict:
        """The JSON form (version 1) as a dict.

        Image sources are written as they were read. With `embed_images`, or for images built in
        code without a source, pixels are written as PNG data URIs. Given `base_dir` (the folder
        the document will live in), relative paths are rewritten to stay correct from there.
        """
        target_dir = None if base_dir is None else Path(base_dir)
        return {
            "version": FORMAT_VERSION,
            "text": self.text,
            "negative": self.negative,
            "contexts": [self._context_dict(c, embed_images, target_dir) for c in self.contexts],
        }

    def to_json(
        self,
        *,
        embed_images: bool = False,
        base_dir: str | os.PathLike | None = None,
        indent: int | None = 2,
    ) -> str:
        document = self.to_dict(embed_images=embed_images, base_dir=base_dir)
        return json.dumps(document, indent=indent, ensure_ascii=False, allow_nan=False)

    @classmethod
    def from_json(
        cls,
        source: str | bytes | Mapping[str, Any],
        *,
        base_dir: str | os.PathLike | None = None,
        root: str | os.PathLike | None = None,
        known_modalities: Iterable[str] = DEFAULT_MODALITIES,
        max_contexts: int = DEFAULT_MAX_CONTEXTS,
    ) -> MultiModalInstruction:
        """Parse JSON text (or its already-decoded dict) and validate it.

        Relative image paths resolve against `base_dir`, else `root`, else the working folder.
        """
        document = _parse_json_text(source) if isinstance(source, (str, bytes)) else source
        return _build(document, base_dir, root, known_modalities, max_contexts)

    def _context_dict(self, context: Context, embed: bool, target_dir: Path | None) -> dict:
        mask = None
        if context.mask is not None:
            mask = _image_reference(context.mask, context.mask_source, embed, self.base_dir, target_dir)
        return {
            "id": context.id,
            "modality": context.modality,
            "text": context.text,
            "image": _image_reference(context.image, context.image_source, embed, self.base_dir, target_dir),
            "mask": mask,
            "weight": float(context.weight),
        }


# --------------------------------------------------------------------------------------------
# Loading and saving


def load_instruction(
    source: str | os.PathLike | Mapping[str, Any],
    *,
    base_dir: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
    known_modalities: Iterable[str] = DEFAULT_MODALITIES,
    max_contexts: int = DEFAULT_MAX_CONTEXTS,
) -> MultiModalInstruction:
    """Load and validate an instruction from a JSON file path or an already-decoded dict.

    Relative image paths resolve against `base_dir`, which defaults to the JSON file's folder.
    Given `root`, every image path must resolve (symlinks followed) to a file inside it.
    Unreferenced contexts are reported as InstructionWarning; everything else wrong raises
    InstructionError.
    """
    if not isinstance(source, (str, os.PathLike)):
        # Anything else is taken as a decoded document; _build says what is wrong with it.
        return _build(source, base_dir, root, known_modalities, max_contexts)
    path = Path(source)
    document = _parse_json_text(_read_file(str(path), "instruction", str(path), MAX_DOCUMENT_BYTES))
    if base_dir is None:
        base_dir = path.absolute().parent
    return _build(document, base_dir, root, known_modalities, max_contexts)


def save_instruction(
    instruction: MultiModalInstruction,
    path: str | os.PathLike,
    *,
    embed_images: bool = False,
) -> None:
    """Write the instruction's JSON form to `path`, atomically.

    Relative image paths are rewritten relative to the new file's folder, so the saved document
    loads the same pixels wherever it is put.
    """
    path = Path(path)
    text = instruction.to_json(embed_images=embed_images, base_dir=path.absolute().parent)
    # Write a sibling temp file then rename, so a crash never leaves half a document behind.
    handle, temp_name = tempfile.mkstemp(dir=path.absolute().parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as temp_file:
            temp_file.write(text + "\n")
            temp_file.flush()
            os.fsync(temp_file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        os.unlink(temp_name)
        raise


def _build(
    document: Any,
    base_dir: str | os.PathLike | None,
    root: str | os.PathLike | None,
    known_modalities: Iterable[str],
    max_contexts: int,
) -> MultiModalInstruction:
    if base_dir is None:
        base_dir = root if root is not None else Path.cwd()
    reader = _SourceReader(Path(base_dir).absolute(), None if root is None else Path(root))
    instruction = _parse_document(document, reader, max_contexts)
    for message in instruction.validate(known_modalities, max_contexts):
        warnings.warn(message, InstructionWarning, stacklevel=3)
    return instruction


def _parse_json_text(text: str | bytes) -> Any:
    if len(text) > MAX_DOCUMENT_BYTES:
        raise InstructionError(f"instruction: document is over the {MAX_DOCUMENT_BYTES} byte limit")
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8-sig")
        return json.loads(text, object_pairs_hook=_refuse_duplicate_keys)
    except InstructionError:
        raise
    except RecursionError:
        raise InstructionError("instruction: JSON is nested too deeply") from None
    except json.JSONDecodeError as error:
        where = f"line {error.lineno} column {error.colno}"
        raise InstructionError(f"instruction: invalid JSON at {where}: {error.msg}") from None
    except ValueError as error:  # bad UTF-8, integers too long to convert
        raise InstructionError(f"instruction: invalid JSON: {error}") from None


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    # json keeps the last of repeated keys silently; which one the author meant is unknowable.
    result: dict = {}
    for key, value in pairs:
        if key in result:
            raise InstructionError(f"instruction: duplicate key {_short(key)} in a JSON object")
        result[key] = value
    return result


# --------------------------------------------------------------------------------------------
# Parsing the document into objects (types and shape; meaning is checked by validate)


def _parse_document(document: Any, reader: _SourceReader, max_contexts: int) -> MultiModalInstruction:
    if not isinstance(document, Mapping):
        raise InstructionError(f"instruction: expected a JSON object, got {_type_name(document)}")
    _check_keys(document, _DOCUMENT_KEYS, "instruction", "")
    _check_version(document["version"])
    text = _require_prompt(document["text"], "text")
    negative = _require_prompt(document.get("negative", ""), "negative")
    items = document["contexts"]
    if not isinstance(items, list):
        raise InstructionError(f"contexts: expected a list, got {_type_name(items)}")
    # Checked before any image is read, so an oversized document costs no decoding.
    _check_context_count(len(items), max_contexts)
    contexts = [_parse_context(item, f"contexts[{index}]", reader) for index, item in enumerate(items)]
    return MultiModalInstruction(text=text, contexts=contexts, negative=negative, base_dir=reader.base_dir)


def _parse_context(item: Any, where: str, reader: _SourceReader) -> Context:
    if not isinstance(item, Mapping):
        raise InstructionError(f"{where}: expected an object, got {_type_name(item)}")
    _check_keys(item, _CONTEXT_KEYS, where, f"{where}.")
    context_id = _require_id(item["id"], f"{where}.id")
    modality = _require_str(item["modality"], f"{where}.modality")
    text = _require_prompt(item.get("text", ""), f"{where}.text")
    weight = _require_weight(item.get("weight", 1.0), f"{where}.weight")
    image_source = item["image"]
    image = reader.load_image(image_source, f"{where}.image", to_rgb)
    mask_source = item.get("mask")
    mask = None if mask_source is None else reader.load_image(mask_source, f"{where}.mask", to_mask)
    return Context(
        id=context_id,
        modality=modality,
        text=text,
        image=image,
        mask=mask,
        weight=weight,
        image_source=image_source,
        mask_source=mask_source,
    )


def _check_keys(obj: Mapping, allowed: Mapping[str, bool], where: str, prefix: str) -> None:
    # Unknown keys are refused: a typo like "modailty" would otherwise be silently ignored.
    for key in obj:
        if key not in allowed:
            raise InstructionError(f"{where}: unknown key {_short(key)}{_suggestion(str(key), allowed)}")
    for key, required in allowed.items():
        if required and key not in obj:
            raise InstructionError(f"{prefix}{key}: missing required key")


def _check_version(version: Any) -> None:
    if isinstance(version, bool) or not isinstance(version, int):
        raise InstructionError(f"version: expected an integer, got {_type_name(version)}")
    if version != FORMAT_VERSION:
        raise InstructionError(
            f"version: unsupported version {_short(version)}; this reader knows version {FORMAT_VERSION}"
        )


# --------------------------------------------------------------------------------------------
# Validation


def _check_context(context: Any, where: str, known_modalities: tuple[str, ...]) -> None:
    if not isinstance(context, Context):
        raise InstructionError(f"{where}: expected a Context, got {type(context).__name__}")
    _require_id(context.id, f"{where}.id")
    _check_modality(context.modality, f"{where}.modality", known_modalities)
    _require_prompt(context.text, f"{where}.text")
    # A context's marker text may name only itself; "[ref#2] ..." on context 1 is a mix-up.
    foreign = [n for n in parse_markers(context.text, field=f"{where}.text") if n != context.id]
    if foreign:
        raise InstructionError(
            f"{where}.text: contains [ref#{foreign[0]}] but this context's id is {context.id}"
        )
    _require_weight(context.weight, f"{where}.weight")
    _check_image(context.image, f"{where}.image")
    if context.mask is not None:
        _check_image(context.mask, f"{where}.mask")
        if context.mask.size != context.image.size:
            mask_size, image_size = _size(context.mask.size), _size(context.image.size)
            raise InstructionError(f"{where}.mask: size {mask_size} does not match its image's size {image_size}")


def _check_modality(modality: Any, field: str, known_modalities: tuple[str, ...]) -> None:
    _require_str(modality, field)
    if modality not in known_modalities:
        hint = _suggestion(modality, known_modalities)
        known = ", ".join(known_modalities)
        raise InstructionError(f"{field}: unknown modality {_short(modality)}{hint}; this model knows {known}")


def _check_image(image: Any, field: str) -> None:
    if not isinstance(image, Image.Image):
        raise InstructionError(f"{field}: expected a PIL image, got {type(image).__name__}")
    width, height = image.size
    if width < 1 or height < 1:
        raise InstructionError(f"{field}: image is empty ({_size(image.size)})")
    _check_pixel_count(image.size, field)


def _check_pixel_count(size: tuple[int, int], field: str) -> None:
    if size[0] * size[1] > MAX_IMAGE_PIXELS:
        raise InstructionError(
            f"{field}: image is {_size(size)}, over the limit of {MAX_IMAGE_PIXELS} pixels"
        )


def _check_header(image: Image.Image, field: str) -> None:
    """Size and frame count as the file declares them, checked before any pixel is decoded."""
    width, height = image.size
    if width < 1 or height < 1:
        raise InstructionError(f"{field}: image is empty ({_size(image.size)})")
    _check_pixel_count(image.size, field)
    frames = getattr(image, "n_frames", 1)
    if frames > MAX_IMAGE_FRAMES:
        raise InstructionError(f"{field}: image declares {frames} frames, over the limit of {MAX_IMAGE_FRAMES}")


def read_image_file(path: str | os.PathLike, field: str, convert: Callable[[Image.Image], Image.Image] = None
                    ) -> Image.Image:
    """An image file read as instruction images are: a regular file (a FIFO, a device or a folder is refused
    without blocking), at most MAX_IMAGE_FILE_BYTES, its header checked before decoding; RGB by default."""
    source = os.fspath(path)
    return _decode_image(_read_file(source, field, source, MAX_IMAGE_FILE_BYTES), field, source, convert or to_rgb)


def _check_context_count(count: int, max_contexts: int) -> None:
    if count > max_contexts:
        raise InstructionError(f"contexts: {count} contexts, more than the maximum of {max_contexts}")


def _check_unique_ids(contexts: list[Context]) -> None:
    first_index: dict[int, int] = {}
    for index, context in enumerate(contexts):
        if context.id in first_index:
            first = f"contexts[{first_index[context.id]}]"
            raise InstructionError(f"contexts[{index}].id: duplicate id {context.id} (also used by {first})")
        first_index[context.id] = index


def _check_references(instruction: MultiModalInstruction) -> list[str]:
    """Raise for markers with no context; return a warning per context the text never uses."""
    ids = {context.id for context in instruction.contexts}
    referenced = instruction.referenced_ids()
    for marker_id in referenced:
        if marker_id not in ids:
            raise InstructionError(f"text: [ref#{marker_id}] has no context with id {marker_id}")
    # The negative prompt is encoded as text only; a marker there could never be honoured.
    if parse_markers(instruction.negative, field="negative"):
        raise InstructionError("negative: [ref#N] markers are not allowed in the negative prompt")
    return [
        f"contexts[{index}]: context id {context.id} is never referenced in text (add [ref#{context.id}])"
        for index, context in enumerate(instruction.contexts)
        if context.id not in referenced
    ]


def _require_prompt(value: Any, field: str, allow_empty: bool = True) -> str:
    """A text the encoder will read: a string of valid Unicode, at most MAX_TEXT_CHARS characters."""
    text = _require_str(value, field)
    check_text(text, field)
    if not allow_empty and not text.strip():
        raise InstructionError(f"{field}: must not be empty")
    return text


def check_text(text: str, field: str) -> None:
    """Refuse a text too long to encode, or holding a lone surrogate, before any tokenizer sees it."""
    if len(text) > MAX_TEXT_CHARS:
        raise InstructionError(f"{field}: {len(text)} characters, over the limit of {MAX_TEXT_CHARS}")
    surrogate = _LONE_SURROGATE.search(text)
    if surrogate is not None:
        raise InstructionError(f"{field}: invalid Unicode: a lone surrogate {surrogate.group()!r} at character "
                               f"{surrogate.start()} (text must be valid UTF-8)")


def _require_str(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise InstructionError(f"{field}: expected a string, got {_type_name(value)}")
    return value


def _require_id(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InstructionError(f"{field}: expected a positive integer, got {_type_name(value)}")
    if not 1 <= value <= MAX_CONTEXT_ID:
        raise InstructionError(f"{field}: must be between 1 and {MAX_CONTEXT_ID}, got {_short(value)}")
    return value


def _require_weight(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InstructionError(f"{field}: expected a number, got {_type_name(value)}")
    try:
        weight = float(value)
    except OverflowError:
        weight = math.inf
    if not math.isfinite(weight):
        raise InstructionError(f"{field}: must be a finite number, got {_short(value)}")
    return weight


# --------------------------------------------------------------------------------------------
# Markers

# A marker id is ASCII digits without leading zeros: "[ref#01]" and "[ref#١]" are not ids the format defines.
_ID = r"([1-9][0-9]*)"
MARKER_PATTERN = re.compile(r"\[ref#" + _ID + r"\]")
# The forms users know from other multi-image tools, normalised to [ref#N] on load.
_ALIAS_PATTERNS = (re.compile(r"<image" + _ID + r">"), re.compile(r"@image" + _ID + r"(?!\w)"))
# Anything that looks like an attempt at a marker in any form; caught so "[Ref# 1]" is an error, not words.
_MARKER_LOOKALIKES = (
    re.compile(r"\[\s*ref\s*#[^\[\]]{0,32}\]", re.IGNORECASE),
    re.compile(r"<\s*image[^<>]{0,32}>", re.IGNORECASE),
    re.compile(r"@\s?image[\s_#-]?\d\w*", re.IGNORECASE),
)
MARKER_FORMS = "[ref#N], <imageN> or @imageN"


def normalize_markers(text: str) -> str:
    """`text` with every well-formed <imageN> and @imageN written as [ref#N]; anything else unchanged.

    Malformed look-alikes are left for `parse_markers` to report with the field's name.
    """
    if not isinstance(text, str):
        return text
    for pattern in _ALIAS_PATTERNS:
        text = pattern.sub(r"[ref#\1]", text)
    return text


def parse_markers(text: str, *, field: str = "text") -> list[int]:
    """Ids of the markers in `text` ([ref#N], <imageN>, @imageN), in order of appearance, repeats kept.

    Markers are strict - lower case, no spaces, N in ASCII digits without leading zeros - because
    the text encoder sees the text verbatim and was trained on the exact [ref#N] form. A look-alike
    such as "[Ref# 1]" or "[ref#01]" raises InstructionError (naming `field`) instead of passing
    as plain words.
    """
    text = normalize_markers(text)
    for lookalikes in _MARKER_LOOKALIKES:
        for lookalike in lookalikes.finditer(text):
            if not MARKER_PATTERN.fullmatch(lookalike.group()):
                raise InstructionError(f"{field}: malformed marker {_short(lookalike.group())}; "
                                       f"{_marker_hint(lookalike.group())}")
    ids = []
    for match in MARKER_PATTERN.finditer(text):
        digits = match.group(1)
        # Length first: int() of thousands of digits is slow and may raise.
        if len(digits) > len(str(MAX_CONTEXT_ID)) or int(digits) > MAX_CONTEXT_ID:
            raise InstructionError(f"{field}: marker id {_short(digits)} is larger than {MAX_CONTEXT_ID}")
        ids.append(int(digits))
    return ids


def _marker_hint(lookalike: str) -> str:
    digits = "".join(ch for ch in lookalike if ch.isdigit())
    if any(not ("0" <= ch <= "9") for ch in digits):
        return "marker ids are written in ASCII digits 0-9"
    if digits and not digits.strip("0"):
        return "marker ids start at 1"
    if digits.startswith("0"):
        return f"marker ids have no leading zeros (write {lookalike.replace(digits, digits.lstrip('0'))})"
    return f"write markers exactly as {MARKER_FORMS}, with N a context id"


# --------------------------------------------------------------------------------------------
# Reading image sources (paths and data URIs)


class _SourceReader:
    """Turns an image source string into a decoded image, confined to `root` when given."""

    def __init__(self, base_dir: Path, root: Path | None):
        self.base_dir = base_dir
        self.real_root = None if root is None else os.path.realpath(root)

    def load_image(
        self, source: Any, field: str, convert: Callable[[Image.Image], Image.Image]
    ) -> Image.Image:
        if not isinstance(source, str):
            raise InstructionError(f"{field}: expected a string (path or data URI), got {_type_name(source)}")
        if not source:
            raise InstructionError(f"{field}: must not be empty")
        if source.startswith("data:"):
            return _decode_image(_decode_data_uri(source, field), field, "data URI", convert)
        return _decode_image(self._read_file(source, field), field, source, convert)

    def _resolve(self, source: str, field: str) -> str:
        if "\x00" in source:
            raise InstructionError(f"{field}: path contains a NUL character")
        candidate = os.path.join(self.base_dir, source)  # an absolute source replaces base_dir
        if self.real_root is None:
            return candidate
        # realpath follows every symlink, so "..", absolute paths and links out are all caught; a path it
        # cannot resolve (a symlink loop) is refused, since the lexical fallback could step out.
        real = strict_realpath(candidate)
        if real is None:
            raise InstructionError(f"{field}: cannot resolve path (a symlink loop?): {_clip(source)}")
        if not is_inside(real, self.real_root):
            raise InstructionError(f"{field}: path escapes the allowed root folder: {_clip(source)}")
        return real

    def _read_file(self, source: str, field: str) -> bytes:
        return _read_file(self._resolve(source, field), field, source, MAX_IMAGE_FILE_BYTES)


def _read_file(path: str, field: str, source: str, limit: int) -> bytes:
    """The bytes of a regular file no larger than `limit`; `source` is the path as written."""
    if "\x00" in path:
        raise InstructionError(f"{field}: path contains a NUL character")
    try:
        # O_NONBLOCK so a FIFO cannot hang the reader before fstat refuses it.
        handle = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise InstructionError(f"{field}: file not found: {_clip(source)}") from None
    except OSError as error:
        raise InstructionError(f"{field}: cannot read {_clip(source)}: {error.strerror or error}") from None
    try:
        return _read_regular_file(handle, field, source, limit)
    finally:
        os.close(handle)


def _read_regular_file(handle: int, field: str, source: str, limit: int) -> bytes:
    try:
        info = os.fstat(handle)
        if not stat.S_ISREG(info.st_mode):
            raise InstructionError(f"{field}: not a regular file: {_clip(source)}")
        if info.st_size > limit:
            raise InstructionError(
                f"{field}: file is {info.st_size} bytes, over the {limit} byte limit: {_clip(source)}"
            )
        with io.FileIO(handle, "r", closefd=False) as file:
            return file.read(limit + 1)
    except OSError as error:
        raise InstructionError(f"{field}: cannot read {_clip(source)}: {error.strerror or error}") from None


def strict_realpath(path: str) -> str | None:
    """The real path, following every symlink; None when the path cannot be resolved (e.g. a loop)."""
    try:
        return os.path.realpath(path, strict=True)
    except (FileNotFoundError, NotADirectoryError):
        return os.path.realpath(path)  # missing files are reported when they are read
    except OSError:
        return None


def is_inside(path: str, folder: str) -> bool:
    try:
        return os.path.commonpath([folder, path]) == folder
    except ValueError:  # different drives on Windows
        return False


def _decode_data_uri(source: str, field: str) -> bytes:
    match = _DATA_URI.fullmatch(source)
    if match is None:
        raise InstructionError(f"{field}: malformed data URI")
    media_type, parameters, payload = match.groups()
    if not media_type.lower().startswith("image/"):
        raise InstructionError(f"{field}: data URI media type must be image/*, got {_short(media_type)}")
    if "base64" not in [parameter.strip().lower() for parameter in parameters.split(";")]:
        raise InstructionError(f"{field}: only base64 data URIs are supported")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InstructionError(f"{field}: data URI payload is not valid base64") from None


def _decode_image(
    data: bytes, field: str, source: str, convert: Callable[[Image.Image], Image.Image]
) -> Image.Image:
    """Decode, bounded in pixels and formats, and convert to the mode the caller needs."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            _check_header(image, field)  # before any pixel is decoded
            image.load()
            converted = convert(image)
    except InstructionError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InstructionError(f"{field}: image is too large to decode safely: {_clip(source)}") from None
    except Exception as error:  # Pillow's decoders raise many exception types on malformed input
        raise InstructionError(
            f"{field}: not a readable image ({', '.join(IMAGE_FORMATS)}): {_clip(source)}"
        ) from error
    # Drop file metadata so two loads of the same pixels compare equal.
    if converted is image:
        converted = image.copy()
    converted.info.clear()
    return converted


def _image_reference(
    image: Image.Image,
    source: str | None,
    embed: bool,
    from_dir: Path | None,
    target_dir: Path | None,
) -> str:
    if embed or source is None:
        return _png_data_uri(image)
    if source.startswith("data:") or os.path.isabs(source) or from_dir is None or target_dir is None:
        return source
    if os.path.realpath(from_dir) == os.path.realpath(target_dir):
        return source
    try:
        return Path(os.path.relpath(from_dir / source, target_dir)).as_posix()
    except ValueError:  # different drives on Windows: no relative path exists
        return str(from_dir / source)


def _png_data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# --------------------------------------------------------------------------------------------
# Image modes


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB.

    Transparency is composited on white (a cut-out subject reads as on a white page, as in the
    paper's subject images). 16- and 32-bit integer modes are taken as 16-bit data and scaled to
    8 bits; float mode "F" is clipped to 0..255.
    """
    image = _flatten_alpha(_to_8bit(image), background=255)
    return image if image.mode == "RGB" else image.convert("RGB")


def to_mask(image: Image.Image) -> Image.Image:
    """Any PIL mode as an 8-bit "L" mask: 255 where the context applies, 0 where it does not.

    Transparency is composited on black, so white strokes painted on a transparent layer
    become the masked region. Colour masks become their luminance.
    """
    image = _flatten_alpha(_to_8bit(image), background=0)
    return image if image.mode == "L" else image.convert("L")


def _to_8bit(image: Image.Image) -> Image.Image:
    # Pillow's own conversion clips 16-bit values at 255, which turns depth maps white.
    if image.mode == "I" or image.mode.startswith("I;16"):
        values = np.asarray(image, dtype=np.float64) / 257.0
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
    else:
        return image
    return Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8))


def _flatten_alpha(image: Image.Image, background: int) -> Image.Image:
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode not in ("RGBA", "LA", "PA", "RGBa", "La"):
        return image
    rgba = image.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (background, background, background, 255))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


# --------------------------------------------------------------------------------------------
# Resizing to the model's canvas


def prepare_context_image(
    image: Image.Image,
    size: tuple[int, int],
    policy: str = "crop",
    *,
    fill: tuple[int, int, int] = (0, 0, 0),
) -> Image.Image:
    """The image as RGB of exactly `size` = (width, height).

    "crop" (default): scale so the image covers the target, keeping aspect, then cut the centre.
    "fit": scale so the whole image fits, keeping aspect, and pad the rest with `fill`.
    "stretch": resize to the target, distorting aspect.
    """
    return _place(to_rgb(image), size, policy, fill, Image.Resampling.BICUBIC)


def prepare_mask(mask: Image.Image, size: tuple[int, int], policy: str = "crop") -> Image.Image:
    """The mask as "L" of exactly `size`, with the same geometry `prepare_context_image` gives
    its image under the same policy, so mask and image stay aligned. "fit" padding is 0: the
    context does not apply where its image has no pixels.
    """
    return _place(to_mask(mask), size, policy, 0, Image.Resampling.BILINEAR)


def _place(
    image: Image.Image,
    size: tuple[int, int],
    policy: str,
    fill: int | tuple[int, int, int],
    resample: Image.Resampling,
) -> Image.Image:
    target = _check_size(size)
    (width, height), offset = _placement(image.size, target, policy)
    canvas = Image.new(image.mode, target, fill)
    if width * height > MAX_CROP_OVERSIZE * target[0] * target[1]:
        # A thin strip under "crop" (1 x 1,000,000 to 64 x 64 would be 64 x 64,000,000): resize only the part
        # that stays, so no buffer is larger than the target.
        scale_x, scale_y = image.size[0] / width, image.size[1] / height
        box = (-offset[0] * scale_x, -offset[1] * scale_y, (target[0] - offset[0]) * scale_x,
               (target[1] - offset[1]) * scale_y)
        canvas.paste(image.resize(target, resample, box=box), (0, 0))
        return canvas
    # Pasting at a negative offset is what cuts the centre out for "crop".
    canvas.paste(image.resize((width, height), resample), offset)
    return canvas


def _placement(
    source: tuple[int, int], target: tuple[int, int], policy: str
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Size to resize the source to, and where its top-left corner lands on the target."""
    (source_w, source_h), (target_w, target_h) = source, target
    if source_w < 1 or source_h < 1:
        raise ValueError(f"image: cannot resize an empty image ({_size(source)})")
    if policy == "stretch":
        return target, (0, 0)
    if policy == "crop":
        scale = max(target_w / source_w, target_h / source_h)
        width = max(target_w, round(source_w * scale))
        height = max(target_h, round(source_h * scale))
    elif policy == "fit":
        scale = min(target_w / source_w, target_h / source_h)
        width = min(target_w, max(1, round(source_w * scale)))
        height = min(target_h, max(1, round(source_h * scale)))
    else:
        expected = ", ".join(RESIZE_POLICIES)
        raise ValueError(f"policy: unknown resize policy {policy!r}; expected one of {expected}")
    return (width, height), ((target_w - width) // 2, (target_h - height) // 2)


def _check_size(size: Any) -> tuple[int, int]:
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size)
    ):
        raise ValueError(f"size: expected (width, height) of positive integers, got {_short(size)}")
    return int(size[0]), int(size[1])


# --------------------------------------------------------------------------------------------
# Message helpers


def _type_name(value: Any) -> str:
    """The JSON name of a value's type, as the author of the document would say it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, list):
        return "array"
    return type(value).__name__


def _short(value: Any, limit: int = 60) -> str:
    """repr() for error messages, cut short: values come from untrusted documents."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # ints past the str() digit limit, self-nesting lists
        return f"<{type(value).__name__} too large to print>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _suggestion(word: str, choices: Iterable[str]) -> str:
    """' (did you mean "x"?)' for the closest choice, or "" when none is close."""
    # Cut long words first: difflib's cost grows with length and the word is untrusted.
    close = difflib.get_close_matches(word[:64], list(choices), n=1)
    return f' (did you mean "{close[0]}"?)' if close else ""


def _clip(text: str, limit: int = 80) -> str:
    """A path for an error message: as written when printable, else repr(); cut short in the middle, so that
    the file's own name at the end still shows."""
    shown = text if text.isprintable() else repr(text)
    if len(shown) <= limit:
        return shown
    head = (limit - 3) // 2
    return shown[:head] + "..." + shown[len(shown) - (limit - 3 - head):]


def _size(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"
