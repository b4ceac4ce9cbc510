"""Training data: image–text items, the examples the trainer consumes, and dataset readers.

`read_dataset` reads three layouts into `ImageTextItem`s:

- a folder of images, each with its caption in a sidecar text file of the same stem
  (`cats/001.png` + `cats/001.txt`), searched recursively;
- a JSONL manifest, one `{"image": "rel/path.png", "caption": "...", ...}` object per line, image
  paths relative to the manifest, other keys kept in `item.extra`;
- tar shards in the webdataset convention (`000123.jpg` + `000123.txt` members), given as one
  `.tar`, a folder of `*.tar`, or a brace pattern such as `shards-{000..009}.tar`.

Datasets are large and never clean, so bad records are skipped, not fatal: each is counted under a
reason in a `DataReport` (see SKIP_REASONS). Every image is fully decoded once while reading, so a
truncated file is found here and not in the middle of a training run; the pixels are then dropped
and decoded again by `ImageTextItem.load()` when needed. Only when nothing usable is left does
reading raise `DataError`.
"""

from __future__ import annotations

import io
import json
import os
import re
import stat
import tarfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import InstructImagenError
from ..instruction import IMAGE_FORMATS, MAX_IMAGE_FILE_BYTES, MAX_IMAGE_PIXELS, MultiModalInstruction, to_rgb
from ..instruction import is_inside, strict_realpath

__all__ = [
    "IMAGE_EXTENSIONS",
    "SKIP_REASONS",
    "DataError",
    "DataReport",
    "ImageTextItem",
    "TarMember",
    "TrainingExample",
    "expand_braces",
    "read_dataset",
]

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp")
MAX_CAPTION_BYTES = 1 << 20
MAX_MANIFEST_LINE_BYTES = 1 << 20
MAX_BRACE_EXPANSION = 100_000

SKIP_REASONS = {
    "missing_image": "a caption or record whose image file does not exist",
    "missing_caption": "an image with no caption (no sidecar .txt, no caption key, no .txt member)",
    "empty_caption": "a caption that is empty or only whitespace",
    "unreadable_caption": "a caption that is not UTF-8 text or is over the size limit",
    "unreadable_image": "an image that cannot be decoded, or is not a plain raster format",
    "image_too_large": "an image over the pixel or file-size limit",
    "outside_root": "a path that resolves outside the allowed root folder",
    "bad_record": "a manifest line that is not a JSON object with string image and caption",
    "duplicate_key": "a key already used by an earlier item",
    "unreadable_shard": "a tar shard that is missing, not a tar file, or cut short",
}


class DataError(InstructImagenError, ValueError):
    """A dataset cannot be used at all; the message names the source."""


class _Skip(Exception):
    """One record cannot be used; `reason` is a key of SKIP_REASONS."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------------------------
# Data model


@dataclass(frozen=True)
class TarMember:
    """Where an image lives inside a tar shard: the byte range of an uncompressed member, or, for
    a compressed shard (which cannot be seeked into), the encoded bytes themselves."""

    name: str
    offset: int
    size: int
    data: bytes | None = None


@dataclass
class ImageTextItem:
    """One image with its caption, as read from a dataset. `load()` decodes the image (RGB)."""

    key: str                      # stable id within the dataset (relative path or manifest key)
    caption: str
    path: Path | None = None
    image: Image.Image | None = None
    extra: dict = field(default_factory=dict)  # e.g. depth map path, subject/style group labels
    # Set for items read from tar shards; `path` is then the shard.
    member: TarMember | None = field(default=None, repr=False, compare=False)

    def load(self, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
        """The image as RGB, decoded from its file (or shard) on every call unless `image` is set."""
        if self.image is not None:
            return self.image
        if self.path is None:
            raise DataError(f"{self.key}: item has neither an image nor a path")
        try:
            return _decode_image(self._read_bytes(), max_pixels)
        except _Skip as skip:
            raise DataError(f"{self.key}: {SKIP_REASONS[skip.reason]} ({self.path})") from None

    def _read_bytes(self) -> bytes:
        if self.member is None:
            return _read_regular_file(str(self.path), MAX_IMAGE_FILE_BYTES, "image")
        if self.member.data is not None:
            return self.member.data
        try:
            with open(self.path, "rb") as shard:
                shard.seek(self.member.offset)
                data = shard.read(self.member.size)
        except OSError:
            raise _Skip("missing_image") from None
        if len(data) != self.member.size:
            raise _Skip("unreadable_image")
        return data


@dataclass
class TrainingExample:
    """What the trainer learns from: an instruction (text + contexts with images) and its target image.

    Condition dropout (`retrieval.apply_condition_dropout`) builds examples whose instruction text is
    empty, which `MultiModalInstruction.validate` would refuse: training examples are therefore not
    validated, and an empty text means "unconditional". `annotations` is what a `Trainer` subclass's own loss
    reads beside the images (object masks for a loss on the attention, say); the trainer carries it through
    untouched.
    """

    instruction: MultiModalInstruction
    target: Image.Image
    task: str
    annotations: dict = field(default_factory=dict)


@dataclass
class DataReport:
    """What reading a dataset kept and skipped: a count and a few example keys per skip reason."""

    source: str = ""
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 5

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def skip(self, reason: str, key: str) -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"reason: unknown skip reason {reason!r}")
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < self.max_examples:
            examples.append(key)

    def summary(self) -> str:
        """One line: "kept 30 items from data/, skipped 4: 1 empty_caption (a/b.png), ..." """
        line = f"kept {self.kept} items from {self.source or 'the dataset'}"
        if not self.skipped:
            return line + ", skipped none"
        parts = []
        for reason, count in sorted(self.skipped.items(), key=lambda pair: (-pair[1], pair[0])):
            shown = ", ".join(self.examples.get(reason, []))
            more = ", ..." if count > len(self.examples.get(reason, [])) else ""
            parts.append(f"{count} {reason} ({shown}{more})")
        return f"{line}, skipped {self.total_skipped}: " + "; ".join(parts)

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "kept": self.kept,
            "skipped": dict(self.skipped),
            "examples": {reason: list(keys) for reason, keys in self.examples.items()},
        }


# --------------------------------------------------------------------------------------------
# Reading


def read_dataset(
    source: str | os.PathLike,
    *,
    report: DataReport | None = None,
    root: str | os.PathLike | None = None,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
) -> list[ImageTextItem]:
    """Read an image folder, a JSONL manifest or tar shards (see the module docstring).

    The layout is told from `source`: a `.jsonl` file is a manifest; a `.tar` file or a pattern with
    `{..}` braces is shards; a folder holding `*.tar` files and no images is shards; any other
    folder is images with sidecar captions. Skipped records are counted in `report` (pass one in
    to see it). Given `root`, the source and every file it names must resolve, symlinks followed,
    inside that folder; records that do not are skipped as "outside_root". Items are returned
    in a stable order (sorted paths, manifest line order, shard and member order).
    """
    report = DataReport() if report is None else report
    report.source = report.source or str(source)
    real_root = None if root is None else os.path.realpath(root)
    reader = _layout(str(source), real_root)
    items = list(_unique(reader(str(source), real_root, max_image_pixels, report), report))
    report.kept += len(items)
    if not items:
        raise DataError(f"{source}: no usable items ({report.summary()})")
    return items


def _layout(source: str, real_root: str | None):
    if "{" in source:
        return _read_shards
    _check_source(source, real_root)
    if os.path.isdir(source):
        return _read_shards if _is_shard_folder(source) else _read_folder
    if source.lower().endswith(".jsonl"):
        return _read_manifest
    if source.lower().endswith(".tar"):
        return _read_shards
    if not os.path.exists(source):
        raise DataError(f"{source}: no such file or folder")
    raise DataError(f"{source}: not a folder, a .jsonl manifest or a .tar shard")


def _check_source(path: str, real_root: str | None) -> None:
    if real_root is not None and not is_inside(strict_realpath(path) or "\0", real_root):
        raise DataError(f"{path}: source is outside the allowed root folder")


def _unique(items: Iterator[ImageTextItem], report: DataReport) -> Iterator[ImageTextItem]:
    seen: set[str] = set()
    for item in items:
        if item.key in seen:
            report.skip("duplicate_key", item.key)
            continue
        seen.add(item.key)
        yield item


# -- image folders -----------------------------------------------------------------------------


def _read_folder(folder: str, real_root: str | None, max_pixels: int, report: DataReport) -> Iterator[ImageTextItem]:
    # os.walk does not descend into symlinked folders, so a link cannot pull in a tree elsewhere.
    for directory, subdirs, files in os.walk(folder):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))  # .git, .cache, ...
        images, captions = _split_folder_files(files)
        for stem in sorted(captions.keys() - images.keys()):
            report.skip("missing_image", _relative(folder, directory, captions[stem]))
        for stem in sorted(images):
            key = _relative(folder, directory, images[stem])
            try:
                path = _confined(os.path.join(directory, images[stem]), real_root)
                caption_name = captions.get(stem)
                if caption_name is None:
                    raise _Skip("missing_caption")
                caption = _caption_text(_read_regular_file(
                    _confined(os.path.join(directory, caption_name), real_root), MAX_CAPTION_BYTES, "caption"))
                _decode_image(_read_regular_file(path, MAX_IMAGE_FILE_BYTES, "image"), max_pixels)
            except _Skip as skip:
                report.skip(skip.reason, key)
                continue
            yield ImageTextItem(key=key, caption=caption, path=Path(path))


def _split_folder_files(files: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Image and caption file names by stem. Of two images with one stem ("a.png", "a.jpg"),
    only the first in sorted order gets the caption; the other counts as missing one."""
    images: dict[str, str] = {}
    captions: dict[str, str] = {}
    for name in sorted(files):
        stem, dot, extension = name.rpartition(".")
        if not dot or not stem:
            continue
        extension = extension.lower()
        if extension == "txt":
            captions[stem] = name
        elif extension in IMAGE_EXTENSIONS:
            if stem in images:
                images[name] = name  # keyed by full name: never matches a caption
            else:
                images[stem] = name
    return images, captions


def _relative(folder: str, directory: str, name: str) -> str:
    return Path(os.path.relpath(os.path.join(directory, name), folder)).as_posix()


# -- JSONL manifests ---------------------------------------------------------------------------


def _read_manifest(manifest: str, real_root: str | None, max_pixels: int, report: DataReport) -> Iterator[ImageTextItem]:
    base_dir = os.path.dirname(os.path.abspath(manifest))
    try:
        handle = open(manifest, "rb")
    except OSError as error:
        raise DataError(f"{manifest}: cannot read manifest: {error.strerror or error}") from None
    with handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            line_key = f"line {number}"
            try:
                record = _parse_record(raw)
                key = record.get("key") or record["image"]
                line_key = key
                path = _confined(os.path.join(base_dir, record["image"]), real_root)
                if record["caption"] is None:
                    raise _Skip("missing_caption")
                caption = _clean_caption(record["caption"])
                _decode_image(_read_regular_file(path, MAX_IMAGE_FILE_BYTES, "image"), max_pixels)
            except _Skip as skip:
                report.skip(skip.reason, line_key)
                continue
            extra = {k: v for k, v in record.items() if k not in ("image", "caption", "key")}
            yield ImageTextItem(key=key, caption=caption, path=Path(path), extra=extra)


def _parse_record(raw: bytes) -> dict[str, Any]:
    if len(raw) > MAX_MANIFEST_LINE_BYTES:
        raise _Skip("bad_record")
    try:
        record = json.loads(raw.decode("utf-8-sig"))
    except (ValueError, RecursionError):
        raise _Skip("bad_record") from None
    if not isinstance(record, dict) or not isinstance(record.get("image"), str) or not record["image"]:
        raise _Skip("bad_record")
    if "\x00" in record["image"] or not isinstance(record.get("key", ""), str):
        raise _Skip("bad_record")
    caption = record.get("caption")
    if caption is not None and not isinstance(caption, str):
        raise _Skip("bad_record")
    record["caption"] = caption
    return record


# -- tar shards --------------------------------------------------------------------------------

# webdataset's split: the key is the member path up to the first dot of its file name.
_MEMBER_NAME = re.compile(r"^((?:.*/)?[^./][^/]*?)\.([^/]*)$")


def _read_shards(source: str, real_root: str | None, max_pixels: int, report: DataReport) -> Iterator[ImageTextItem]:
    for shard in _shard_paths(source):
        name = os.path.basename(shard)
        if real_root is not None and not is_inside(strict_realpath(shard) or "\0", real_root):
            report.skip("outside_root", name)
            continue
        yield from _read_shard(shard, max_pixels, report)


def _shard_paths(source: str) -> list[str]:
    if "{" in source:
        return expand_braces(source)
    if os.path.isdir(source):
        return sorted(os.path.join(source, n) for n in os.listdir(source) if n.lower().endswith(".tar"))
    return [source]


def _is_shard_folder(folder: str) -> bool:
    names = os.listdir(folder)
    has_shards = any(n.lower().endswith(".tar") for n in names)
    has_images = any(n.rpartition(".")[2].lower() in IMAGE_EXTENSIONS for n in names)
    return has_shards and not has_images


def _read_shard(shard: str, max_pixels: int, report: DataReport) -> Iterator[ImageTextItem]:
    """Items of one shard. Members of one key are consecutive in webdataset shards, so a sample
    is complete when the key changes; a shard cut short keeps the samples read before the cut."""
    name = os.path.basename(shard)
    try:
        compressed = not _is_plain_tar(shard)
        tar = tarfile.open(shard, mode="r:*")
    except (OSError, tarfile.TarError):
        report.skip("unreadable_shard", name)
        return
    with tar:
        sample = _ShardSample(shard, None, {}, compressed, max_pixels)
        try:
            for member in tar:
                match = _MEMBER_NAME.match(member.name)
                if not member.isfile() or match is None:
                    continue
                key, extension = match.group(1), match.group(2).lower()
                if key != sample.key:
                    yield from sample.items(report)
                    sample = _ShardSample(shard, key, {}, compressed, max_pixels)
                if (extension == "txt" or extension in IMAGE_EXTENSIONS) and extension not in sample.members:
                    sample.members[extension] = (member, _member_bytes(tar, member))
        except (OSError, tarfile.TarError, EOFError):
            report.skip("unreadable_shard", name)
            if not sample.complete:  # cut off mid-sample: already counted with the shard
                return
        yield from sample.items(report)


def _is_plain_tar(path: str) -> bool:
    # gzip, bzip2, xz and zstd all start with a magic number; a plain tar starts with a file name.
    with open(path, "rb") as handle:
        head = handle.read(6)
    return not head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd"))


def _member_bytes(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    limit = MAX_CAPTION_BYTES if member.name.lower().endswith(".txt") else MAX_IMAGE_FILE_BYTES
    if member.size > limit:
        return b""  # not read: _ShardSample refuses it by its size
    handle = tar.extractfile(member)
    return b"" if handle is None else handle.read()


@dataclass
class _ShardSample:
    """The members of one key in a shard: extension -> (TarInfo, bytes)."""

    shard: str
    key: str | None
    members: dict[str, tuple[tarfile.TarInfo, bytes]]
    compressed: bool
    max_pixels: int

    @property
    def complete(self) -> bool:
        return "txt" in self.members and any(e in self.members for e in IMAGE_EXTENSIONS)

    def items(self, report: DataReport) -> Iterator[ImageTextItem]:
        if self.key is None:
            return
        try:
            item = self._item()
        except _Skip as skip:
            report.skip(skip.reason, self.key)
            return
        yield item

    def _item(self) -> ImageTextItem:
        image_extension = next((e for e in IMAGE_EXTENSIONS if e in self.members), None)
        if image_extension is None:
            raise _Skip("missing_image")
        if "txt" not in self.members:
            raise _Skip("missing_caption")
        caption_member, caption_bytes = self.members["txt"]
        if caption_member.size > MAX_CAPTION_BYTES:
            raise _Skip("unreadable_caption")
        caption = _caption_text(caption_bytes)
        image_member, data = self.members[image_extension]
        if image_member.size > MAX_IMAGE_FILE_BYTES:
            raise _Skip("image_too_large")
        _decode_image(data, self.max_pixels)
        # A plain tar is read back by byte range; a compressed one cannot be seeked, so its bytes stay.
        location = TarMember(image_member.name, image_member.offset_data, image_member.size,
                             data if self.compressed else None)
        return ImageTextItem(key=self.key, caption=caption, path=Path(self.shard), member=location,
                             extra={"shard": os.path.basename(self.shard)})


_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(\d+)\.\.(\d+)")


def expand_braces(pattern: str) -> list[str]:
    """Expand `{000..009}` (zero padding kept) and `{a,b,c}` groups, as webdataset does."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end():]
    numeric = _RANGE.fullmatch(body)
    if numeric:
        first, last = numeric.groups()
        width = len(first) if first.startswith("0") else 0
        if int(last) - int(first) >= MAX_BRACE_EXPANSION:
            raise DataError(f"{pattern}: brace range expands to more than {MAX_BRACE_EXPANSION} names")
        choices = [str(n).zfill(width) for n in range(int(first), int(last) + 1)]
    else:
        choices = body.split(",")
    expanded = [name for choice in choices for name in expand_braces(head + choice + tail)]
    if len(expanded) > MAX_BRACE_EXPANSION:
        raise DataError(f"{pattern}: braces expand to more than {MAX_BRACE_EXPANSION} names")
    return expanded


# -- shared checks -----------------------------------------------------------------------------


def _confined(path: str, real_root: str | None) -> str:
    """`path`, or its real path when confined to a root; realpath follows every symlink, so
    "..", absolute paths and links out of the root are all caught by one check."""
    if real_root is None:
        return path
    real = strict_realpath(path)
    if real is None:
        raise _Skip("missing_image")  # unresolvable (a symlink loop)
    if not is_inside(real, real_root):
        raise _Skip("outside_root")
    return real


def _read_regular_file(path: str, limit: int, kind: str) -> bytes:
    too_large = "image_too_large" if kind == "image" else "unreadable_caption"
    try:
        # O_NONBLOCK so a FIFO cannot hang the reader before fstat refuses it.
        handle = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise _Skip("missing_image" if kind == "image" else "missing_caption") from None
    except OSError:
        raise _Skip(f"unreadable_{kind}") from None
    try:
        info = os.fstat(handle)
        if not stat.S_ISREG(info.st_mode):
            raise _Skip(f"unreadable_{kind}")
        if info.st_size > limit:
            raise _Skip(too_large)
        with io.FileIO(handle, "r", closefd=False) as file:
            data = file.read(limit + 1)
    except OSError:
        raise _Skip(f"unreadable_{kind}") from None
    finally:
        os.close(handle)
    if len(data) > limit:
        raise _Skip(too_large)
    return data


def _caption_text(data: bytes) -> str:
    try:
        return _clean_caption(data.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise _Skip("unreadable_caption") from None


def _clean_caption(text: str) -> str:
    # Line breaks and runs of spaces carry no meaning for a text encoder; one line is easier to log.
    text = " ".join(text.split())
    if not text:
        raise _Skip("empty_caption")
    return text


def _decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Fully decode (so truncated files fail here), bounded in pixels and formats, as RGB."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
                width, height = image.size  # from the header, before any pixel is decoded
                if width * height > max_pixels:
                    raise _Skip("image_too_large")
                image.load()
                rgb = to_rgb(image)
                return rgb.copy() if rgb is image else rgb
    except _Skip:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _Skip("image_too_large") from None
    except Exception:  # Pillow's decoders raise many exception types on malformed input
        raise _Skip("unreadable_image") from None
