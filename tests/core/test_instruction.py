"""Tests for the multi-modal instruction format: loading, validation, round trips, images."""

from __future__ import annotations

import base64
import copy
import io
import json
import os
import re
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from instruct_core import instruction as instruction_module
from instruct_core.instruction import (
    DEFAULT_MODALITIES,
    Context,
    InstructionError,
    InstructionWarning,
    MultiModalInstruction,
    load_instruction,
    normalize_markers,
    parse_markers,
    prepare_context_image,
    prepare_mask,
    save_instruction,
    to_mask,
    to_rgb,
)

# --------------------------------------------------------------------------------------------
# Helpers


def gradient_image(size=(8, 6), mode="RGB") -> Image.Image:
    width, height = size
    x = np.arange(width, dtype=np.uint8)[None, :].repeat(height, 0) * 20
    y = np.arange(height, dtype=np.uint8)[:, None].repeat(width, 1) * 30
    pixels = np.stack([x, y, x // 2 + y // 2], axis=-1)
    return Image.fromarray(pixels).convert(mode)


def png_data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


@pytest.fixture
def folder(tmp_path):
    """A folder with the files a typical instruction document refers to."""
    gradient_image().save(tmp_path / "toy.png")
    gradient_image((8, 6), "L").save(tmp_path / "style.png")
    Image.new("L", (8, 6), 255).save(tmp_path / "mask.png")
    Image.new("L", (4, 4), 255).save(tmp_path / "small_mask.png")
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def valid_document() -> dict:
    return {
        "version": 1,
        "text": "Render [ref#1] in the style of [ref#2]",
        "negative": "blurry",
        "contexts": [
            {
                "id": 1,
                "modality": "subject",
                "text": "[ref#1] a plush toy",
                "image": "toy.png",
                "mask": "mask.png",
                "weight": 1.0,
            },
            {
                "id": 2,
                "modality": "style",
                "text": "a watercolour",  # no marker: one is put in front
                "image": "style.png",
                "mask": None,
                "weight": 0.5,
            },
        ],
    }


def load_quietly(document, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InstructionWarning)
        return load_instruction(document, **kwargs)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


# --------------------------------------------------------------------------------------------
# Loading and round trips


def test_load_resolves_image_paths_relative_to_the_json_file(folder, tmp_path_factory, monkeypatch):
    (folder / "instruction.json").write_text(json.dumps(valid_document()))
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))  # the working folder must not matter
    instruction = load_instruction(folder / "instruction.json")
    toy = instruction.contexts[0]
    assert toy.image.mode == "RGB" and toy.image.size == (8, 6)
    assert toy.mask.mode == "L"
    np.testing.assert_array_equal(pixels(toy.image), pixels(gradient_image()))
    assert instruction.referenced_ids() == [1, 2]
    assert instruction.context_by_id(2).modality == "style"


def test_dict_to_object_to_dict_is_lossless(folder):
    document = valid_document()
    instruction = load_instruction(document, base_dir=folder)
    assert instruction.to_dict() == document


def test_save_then_load_in_same_folder_reproduces_the_document(folder):
    instruction = load_instruction(valid_document(), base_dir=folder)
    save_instruction(instruction, folder / "saved.json")
    assert json.loads((folder / "saved.json").read_text()) == valid_document()
    assert load_instruction(folder / "saved.json") == instruction


def test_save_in_another_folder_rewrites_relative_paths(folder):
    instruction = load_instruction(valid_document(), base_dir=folder)
    (folder / "sub").mkdir()
    save_instruction(instruction, folder / "sub" / "moved.json")
    saved = json.loads((folder / "sub" / "moved.json").read_text())
    assert saved["contexts"][0]["image"] == "../toy.png"
    assert load_instruction(folder / "sub" / "moved.json") == instruction


def test_data_uri_images_load_and_round_trip(folder):
    document = valid_document()
    document["contexts"][0]["image"] = png_data_uri(gradient_image())
    instruction = load_instruction(document, base_dir=folder)
    np.testing.assert_array_equal(pixels(instruction.contexts[0].image), pixels(gradient_image()))
    assert instruction.to_dict() == document


def test_embedded_images_decode_pixel_identical(folder):
    instruction = load_instruction(valid_document(), base_dir=folder)
    embedded = instruction.to_dict(embed_images=True)
    for context in embedded["contexts"]:
        assert context["image"].startswith("data:image/png;base64,")
    assert embedded["contexts"][0]["mask"].startswith("data:image/png;base64,")
    # No base_dir: an embedded document needs no files at all.
    reloaded = MultiModalInstruction.from_json(json.dumps(embedded), base_dir=folder / "nowhere")
    for before, after in zip(instruction.contexts, reloaded.contexts):
        np.testing.assert_array_equal(pixels(before.image), pixels(after.image))
    np.testing.assert_array_equal(pixels(instruction.contexts[0].mask), pixels(reloaded.contexts[0].mask))


def test_contexts_built_in_code_are_embedded_when_written():
    image = gradient_image(mode="RGBA")
    instruction = MultiModalInstruction(
        text="a photo of [ref#1]",
        contexts=[Context(id=1, modality="subject", text="a toy", image=image)],
    )
    assert instruction.validate() == []
    document = json.loads(instruction.to_json())
    assert document["contexts"][0]["image"].startswith("data:image/png;base64,")
    reloaded = MultiModalInstruction.from_json(document)
    np.testing.assert_array_equal(pixels(reloaded.contexts[0].image), pixels(instruction.contexts[0].image))


def test_optional_keys_take_their_defaults(folder):
    document = {
        "version": 1,
        "text": "[ref#1]",
        "contexts": [{"id": 1, "modality": "image", "image": "toy.png"}],
    }
    instruction = load_instruction(document, base_dir=folder)
    context = instruction.contexts[0]
    assert (instruction.negative, context.text, context.mask, context.weight) == ("", "", None, 1.0)


def test_text_only_instruction_needs_no_contexts():
    instruction = MultiModalInstruction.from_json('{"version": 1, "text": "a red barn", "contexts": []}')
    assert instruction.contexts == [] and instruction.referenced_ids() == []


# --------------------------------------------------------------------------------------------
# Markers


def test_parse_markers_keeps_order_and_repeats():
    assert parse_markers("[ref#2] next to [ref#1], then [ref#2] again") == [2, 1, 2]
    assert parse_markers("no markers [here]") == []


@pytest.mark.parametrize("lookalike", ["[Ref#1]", "[ref# 1]", "[ref #1]", "[ref#1 ]", "[ref#one]", "[ref#]"])
def test_lookalike_markers_are_errors_not_words(lookalike):
    with pytest.raises(InstructionError, match=r"^caption: malformed marker"):
        parse_markers(f"a photo of {lookalike}", field="caption")


def test_marker_ids_beyond_the_id_range_are_refused():
    with pytest.raises(InstructionError, match=r"^text: marker id"):
        parse_markers("[ref#" + "9" * 5000 + "]")


@pytest.mark.parametrize("marker, hint", [
    ("[ref#01]", r"no leading zeros \(write \[ref#1\]\)"),
    ("<image01>", r"no leading zeros \(write <image1>\)"),
    ("@image007", r"no leading zeros \(write @image7\)"),
    ("[ref#0]", "ids start at 1"),
    ("<image0>", "ids start at 1"),
    ("[ref#\u0661]", "ASCII digits"),      # Arabic-Indic one
    ("<image\u0967>", "ASCII digits"),     # Devanagari one
    ("@image\uff11", "ASCII digits"),      # fullwidth one
    ("@image1\u0661", "ASCII digits"),
    ("<Image1>", r"exactly as \[ref#N\], <imageN> or @imageN"),
    ("<image 1>", "exactly as"),
    ("@Image1", "exactly as"),
    ("@image 1", "exactly as"),
    ("@image1x", "exactly as"),
])
def test_marker_ids_are_ascii_digits_without_leading_zeros_in_every_form(marker, hint):
    with pytest.raises(InstructionError, match=r"^caption: malformed marker .*" + hint):
        parse_markers(f"a photo of {marker} here", field="caption")


def test_image_markers_are_read_as_ref_markers():
    text = "put <image2> beside @image1, as [ref#3] and <image2> again."
    assert parse_markers(text) == [2, 1, 3, 2]
    assert normalize_markers(text) == "put [ref#2] beside [ref#1], as [ref#3] and [ref#2] again."
    assert normalize_markers("mail me@image1host or see @images") == "mail me@image1host or see @images"
    with pytest.raises(InstructionError, match=r"^text: marker id .* is larger than"):
        parse_markers("<image" + "9" * 20 + ">")


def test_image_markers_load_into_the_v1_json_as_ref_markers(folder):
    document = valid_document()
    document["text"] = "Render <image1> in the style of @image2"
    document["contexts"][0]["text"] = "<image1> a plush toy"
    instruction = load_instruction(document, base_dir=folder)
    assert instruction.text == "Render [ref#1] in the style of [ref#2]"
    assert instruction.contexts[0].text == "[ref#1] a plush toy"
    assert instruction.to_dict()["text"] == "Render [ref#1] in the style of [ref#2]"
    assert load_instruction(instruction.to_dict(), base_dir=folder) == instruction
    built = MultiModalInstruction(text="a photo of @image1", contexts=[instruction.contexts[0]])
    assert built.text == "a photo of [ref#1]" and built.referenced_ids() == [1]


@pytest.mark.parametrize("path, value, message", [
    (["text"], "Render <image1> and <image3>", "text: [ref#3] has no context with id 3"),
    (["text"], "Render @image01", "text: malformed marker '@image01'"),
    (["negative"], "not like <image1>", "negative: [ref#N] markers are not allowed"),
    (["contexts", 0, "text"], "@image2 a toy", "contexts[0].text: contains [ref#2] but this context's id is 1"),
])
def test_image_markers_are_validated_as_ref_markers(folder, path, value, message):
    document = valid_document()
    set_path(document, path, value)
    with pytest.raises(InstructionError) as caught:
        load_instruction(document, base_dir=folder)
    assert str(caught.value).startswith(message)


@pytest.mark.parametrize("field, where", [(["text"], "text"), (["negative"], "negative"),
                                          (["contexts", 0, "text"], "contexts[0].text")])
def test_texts_are_bounded_in_characters_and_valid_unicode(folder, field, where):
    document = valid_document()
    set_path(document, field, "a" * (instruction_module.MAX_TEXT_CHARS + 1))
    with pytest.raises(InstructionError, match=rf"^{re.escape(where)}: 16385 characters, over the limit of 16384"):
        load_instruction(document, base_dir=folder)
    document = valid_document()
    set_path(document, field, "a \ud800 toy")
    with pytest.raises(InstructionError, match=rf"^{re.escape(where)}: invalid Unicode: a lone surrogate"):
        load_instruction(document, base_dir=folder)


def test_a_lone_surrogate_escaped_in_json_is_refused(folder):
    raw = json.dumps(valid_document()).replace("a plush toy", "a \\udfff plush toy")
    with pytest.raises(InstructionError, match=r"^contexts\[0\]\.text: invalid Unicode"):
        MultiModalInstruction.from_json(raw, base_dir=folder)


def test_marker_text_gets_its_marker_put_in_front_when_missing():
    image = gradient_image()
    assert Context(id=3, modality="style", text="oil paint", image=image).marker_text == "[ref#3] oil paint"
    assert Context(id=3, modality="style", text="", image=image).marker_text == "[ref#3]"
    kept = Context(id=3, modality="style", text="like [ref#3]", image=image)
    assert kept.marker_text == "like [ref#3]" and kept.text == "like [ref#3]"


def test_unreferenced_context_is_a_warning_not_an_error(folder):
    document = valid_document()
    document["text"] = "Render [ref#1]"
    with pytest.warns(InstructionWarning, match=r"contexts\[1\]: context id 2 is never referenced"):
        instruction = load_instruction(document, base_dir=folder)
    assert instruction.validate() == ["contexts[1]: context id 2 is never referenced in text (add [ref#2])"]


# --------------------------------------------------------------------------------------------
# Every InstructionError names the field at fault


def set_path(document, path, value):
    target = document
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value


def delete_path(document, path):
    target = document
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]


BAD_VALUES = [
    # (path into the document, bad value, expected message start)
    (["text"], "Render [ref#1] and [ref#3]", "text: [ref#3] has no context with id 3"),
    (["text"], "   \n\t", "text: must not be empty"),
    (["text"], 42, "text: expected a string, got number"),
    (["text"], "a [Ref#1]", "text: malformed marker"),
    (["negative"], ["blurry"], "negative: expected a string, got array"),
    (["negative"], "not like [ref#1]", "negative: [ref#N] markers are not allowed"),
    (["version"], 2, "version: unsupported version 2"),
    (["version"], "1", "version: expected an integer, got string"),
    (["version"], True, "version: expected an integer, got boolean"),
    (["contexts"], {"id": 1}, "contexts: expected a list, got object"),
    (["contexts", 0], "toy.png", "contexts[0]: expected an object, got string"),
    (["contexts", 1, "id"], 1, "contexts[1].id: duplicate id 1 (also used by contexts[0])"),
    (["contexts", 0, "id"], 0, "contexts[0].id: must be between 1 and"),
    (["contexts", 0, "id"], -1, "contexts[0].id: must be between 1 and"),
    (["contexts", 0, "id"], "1", "contexts[0].id: expected a positive integer, got string"),
    (["contexts", 0, "id"], 1.0, "contexts[0].id: expected a positive integer, got number"),
    (["contexts", 0, "id"], True, "contexts[0].id: expected a positive integer, got boolean"),
    (["contexts", 0, "modality"], "stlye", 'contexts[0].modality: unknown modality \'stlye\' (did you mean "style"?)'),
    (["contexts", 0, "modality"], None, "contexts[0].modality: expected a string, got null"),
    (["contexts", 0, "text"], "[ref#2] a toy", "contexts[0].text: contains [ref#2] but this context's id is 1"),
    (["contexts", 0, "weight"], float("nan"), "contexts[0].weight: must be a finite number"),
    (["contexts", 0, "weight"], float("inf"), "contexts[0].weight: must be a finite number"),
    (["contexts", 0, "weight"], 10**400, "contexts[0].weight: must be a finite number"),
    (["contexts", 0, "weight"], "1", "contexts[0].weight: expected a number, got string"),
    (["contexts", 0, "weight"], False, "contexts[0].weight: expected a number, got boolean"),
    (["contexts", 0, "image"], "missing.png", "contexts[0].image: file not found: missing.png"),
    (["contexts", 1, "image"], "notes.txt", "contexts[1].image: not a readable image"),
    (["contexts", 0, "image"], ".", "contexts[0].image: not a regular file"),
    (["contexts", 0, "image"], "", "contexts[0].image: must not be empty"),
    (["contexts", 0, "image"], 7, "contexts[0].image: expected a string (path or data URI), got number"),
    (["contexts", 0, "image"], "bad\x00name.png", "contexts[0].image: path contains a NUL character"),
    (["contexts", 0, "image"], "data:image/png;base64,!!!", "contexts[0].image: data URI payload is not valid base64"),
    (["contexts", 0, "image"], "data:text/plain;base64,aGk=", "contexts[0].image: data URI media type must be image/*"),
    (["contexts", 0, "image"], "data:image/png,rawbytes", "contexts[0].image: only base64 data URIs are supported"),
    (["contexts", 0, "image"], "data:image/png;base64,aGk=", "contexts[0].image: not a readable image"),
    (["contexts", 0, "mask"], "small_mask.png", "contexts[0].mask: size 4x4 does not match its image's size 8x6"),
    (["contexts", 0, "mask"], "notes.txt", "contexts[0].mask: not a readable image"),
    (["contexts", 0, "mask"], 3, "contexts[0].mask: expected a string (path or data URI), got number"),
]


@pytest.mark.parametrize("path, value, message", BAD_VALUES, ids=[case[2][:40] for case in BAD_VALUES])
def test_bad_value_is_refused_naming_the_field(folder, path, value, message):
    document = valid_document()
    set_path(document, path, value)
    with pytest.raises(InstructionError) as caught:
        load_quietly(document, base_dir=folder)
    assert str(caught.value).startswith(message)


MISSING_KEYS = [
    (["version"], "version: missing required key"),
    (["text"], "text: missing required key"),
    (["contexts"], "contexts: missing required key"),
    (["contexts", 0, "id"], "contexts[0].id: missing required key"),
    (["contexts", 1, "modality"], "contexts[1].modality: missing required key"),
    (["contexts", 0, "image"], "contexts[0].image: missing required key"),
]


@pytest.mark.parametrize("path, message", MISSING_KEYS, ids=[case[1] for case in MISSING_KEYS])
def test_missing_required_key_is_named(folder, path, message):
    document = valid_document()
    delete_path(document, path)
    with pytest.raises(InstructionError) as caught:
        load_quietly(document, base_dir=folder)
    assert str(caught.value) == message


def test_unknown_keys_are_refused_with_a_suggestion(folder):
    document = valid_document()
    document["txt"] = "typo"
    with pytest.raises(InstructionError, match=r'^instruction: unknown key \'txt\' \(did you mean "text"\?\)'):
        load_instruction(document, base_dir=folder)
    document = valid_document()
    document["contexts"][1]["modailty"] = "style"
    with pytest.raises(InstructionError, match=r'^contexts\[1\]: unknown key \'modailty\' \(did you mean "modality"'):
        load_instruction(document, base_dir=folder)


def test_modalities_are_checked_against_the_models_list(folder):
    document = valid_document()
    with pytest.raises(InstructionError, match=r"^contexts\[1\]\.modality: unknown modality 'style'"):
        load_instruction(document, base_dir=folder, known_modalities=["subject"])
    document["contexts"][1]["modality"] = "normal_map"
    instruction = load_instruction(document, base_dir=folder, known_modalities=[*DEFAULT_MODALITIES, "normal_map"])
    assert instruction.contexts[1].modality == "normal_map"


def test_more_contexts_than_the_maximum_are_refused(folder):
    with pytest.raises(InstructionError, match=r"^contexts: 2 contexts, more than the maximum of 1"):
        load_instruction(valid_document(), base_dir=folder, max_contexts=1)
    document = valid_document()
    document["contexts"] = [dict(document["contexts"][1], id=n, text="") for n in range(1, 18)]
    document["text"] = " ".join(f"[ref#{n}]" for n in range(1, 18))
    with pytest.raises(InstructionError, match=r"^contexts: 17 contexts, more than the maximum of 16"):
        load_instruction(document, base_dir=folder)


def test_image_over_the_pixel_limit_is_refused_from_its_header(folder):
    Image.new("1", (4097, 4097)).save(folder / "huge.png")  # 1-bit: small file, huge canvas
    document = valid_document()
    document["contexts"][0]["image"] = "huge.png"
    with pytest.raises(InstructionError, match=r"^contexts\[0\]\.image: image is 4097x4097, over the limit"):
        load_instruction(document, base_dir=folder)


def test_pillow_decompression_bomb_guard_becomes_an_instruction_error(folder, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # toy.png (48 pixels) now trips Pillow's guard
    with pytest.raises(InstructionError, match=r"^contexts\[0\]\.image: image is too large to decode safely"):
        load_instruction(valid_document(), base_dir=folder)


def test_json_over_the_size_limit_is_refused(folder, monkeypatch):
    (folder / "instruction.json").write_text(json.dumps(valid_document()))
    monkeypatch.setattr(instruction_module, "MAX_DOCUMENT_BYTES", 100)
    with pytest.raises(InstructionError, match=r"^instruction: file is \d+ bytes, over the 100 byte limit"):
        load_instruction(folder / "instruction.json")
    with pytest.raises(InstructionError, match=r"^instruction: document is over the 100 byte limit"):
        MultiModalInstruction.from_json(json.dumps(valid_document()))


@pytest.mark.parametrize(
    "text, message",
    [
        ("[" * 100_000 + "]" * 100_000, "instruction: JSON is nested too deeply"),
        ('{"version": 1,', "instruction: invalid JSON at line 1 column 15"),
        ('{"version": 1, "version": 1, "text": "x", "contexts": []}', "instruction: duplicate key 'version'"),
        ('["version", 1]', "instruction: expected a JSON object, got array"),
        ('{"version": 1, "text": "x", "contexts": [], "n": ' + "1" * 5000 + "}", "instruction: invalid JSON"),
    ],
    ids=["deep", "truncated", "duplicate-key", "array", "long-int"],
)
def test_malformed_json_text_is_refused(text, message):
    with pytest.raises(InstructionError) as caught:
        MultiModalInstruction.from_json(text)
    assert str(caught.value).startswith(message)


def test_missing_json_file_is_named(tmp_path):
    with pytest.raises(InstructionError, match=r"^instruction: file not found: .*absent\.json"):
        load_instruction(tmp_path / "absent.json")
    deep = tmp_path.joinpath(*["a_long_folder_name"] * 8) / "absent.json"  # a path cut short keeps its name
    with pytest.raises(InstructionError, match=r"^instruction: file not found: .{30,}\.\.\..*absent\.json$"):
        load_instruction(deep)


def test_validate_checks_instructions_built_in_code():
    image = gradient_image()
    context = Context(id=1, modality="subject", text="", image=image, mask=Image.new("L", (3, 3)))
    with pytest.raises(InstructionError, match=r"^contexts\[0\]\.mask: size 3x3 does not match"):
        MultiModalInstruction(text="[ref#1]", contexts=[context]).validate()
    context = Context(id=1, modality="subject", text="", image="toy.png")
    with pytest.raises(InstructionError, match=r"^contexts\[0\]\.image: expected a PIL image, got str"):
        MultiModalInstruction(text="[ref#1]", contexts=[context]).validate()
    with pytest.raises(InstructionError, match=r"^contexts\[0\]: expected a Context, got dict"):
        MultiModalInstruction(text="x", contexts=[{"id": 1}]).validate()


# --------------------------------------------------------------------------------------------
# Path confinement


@pytest.fixture
def rooted(tmp_path):
    """A root folder holding an instruction's images, with a secret image just outside it."""
    root = tmp_path / "root"
    (root / "images").mkdir(parents=True)
    gradient_image().save(root / "images" / "toy.png")
    gradient_image().save(tmp_path / "secret.png")
    return root


def document_with_image(source: str) -> dict:
    return {
        "version": 1,
        "text": "[ref#1]",
        "contexts": [{"id": 1, "modality": "subject", "image": source}],
    }


@pytest.mark.parametrize("source", ["../secret.png", "images/../../secret.png"])
def test_dot_dot_out_of_the_root_is_refused(rooted, source):
    with pytest.raises(InstructionError, match=r"^contexts\[0\]\.image: path escapes the allowed root folder"):
        load_instruction(document_with_image(source), root=rooted)


def test_absolute_path_out_of_the_root_is_refused(rooted):
    outside = str(rooted.parent / "secret.png")
    with pytest.raises(InstructionError, match=r"^contexts\[0\]\.image: path escapes the allowed root folder"):
        load_instruction(document_with_image(outside), root=rooted)


def test_symlink_out_of_the_root_is_refused(rooted):
    os.symlink(rooted.parent / "secret.png", rooted / "images" / "link.png")
    with pytest.raises(InstructionError, match=r"^contexts\[0\]\.image: path escapes the allowed root folder"):
        load_instruction(document_with_image("images/link.png"), root=rooted)
    os.symlink(rooted.parent, rooted / "parent_dir")
    with pytest.raises(InstructionError, match=r"^contexts\[0\]\.image: path escapes the allowed root folder"):
        load_instruction(document_with_image("parent_dir/secret.png"), root=rooted)


def test_paths_that_stay_inside_the_root_are_allowed(rooted):
    (rooted / "json").mkdir()
    (rooted / "json" / "a.json").write_text(json.dumps(document_with_image("../images/toy.png")))
    assert load_instruction(rooted / "json" / "a.json", root=rooted).contexts[0].image.size == (8, 6)
    absolute = str(rooted / "images" / "toy.png")
    assert load_instruction(document_with_image(absolute), root=rooted).contexts[0].image.size == (8, 6)
    os.symlink(rooted / "images" / "toy.png", rooted / "inside_link.png")
    assert load_instruction(document_with_image("inside_link.png"), root=rooted).contexts[0].image.size == (8, 6)


def test_without_a_root_paths_are_trusted(rooted):
    instruction = load_instruction(document_with_image("../secret.png"), base_dir=rooted)
    assert instruction.contexts[0].image.size == (8, 6)


def test_fifo_is_refused_without_blocking(rooted):
    os.mkfifo(rooted / "pipe.png")
    with pytest.raises(InstructionError, match=r"^contexts\[0\]\.image: not a regular file"):
        load_instruction(document_with_image("pipe.png"), root=rooted)


# --------------------------------------------------------------------------------------------
# Image modes


def test_rgba_is_composited_on_white_and_masks_on_black():
    image = Image.new("RGBA", (2, 1))
    image.putpixel((0, 0), (255, 0, 0, 255))  # opaque red
    image.putpixel((1, 0), (255, 0, 0, 0))  # fully transparent
    assert to_rgb(image).getpixel((0, 0)) == (255, 0, 0)
    assert to_rgb(image).getpixel((1, 0)) == (255, 255, 255)
    stroke = Image.new("RGBA", (2, 1), (255, 255, 255, 0))
    stroke.putpixel((0, 0), (255, 255, 255, 255))
    assert pixels(to_mask(stroke)).tolist() == [[255, 0]]


def test_sixteen_bit_images_are_scaled_not_clipped():
    depth = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16))
    assert depth.mode == "I;16"
    assert pixels(to_rgb(depth))[0, :, 0].tolist() == [0, 128, 255]
    assert pixels(to_mask(depth.convert("I"))).tolist() == [[0, 128, 255]]


@pytest.mark.parametrize("mode", ["P", "LA", "RGBA", "CMYK", "1", "L", "I;16", "I", "F", "YCbCr", "HSV"])
def test_every_mode_becomes_rgb_and_l(mode):
    source = gradient_image((5, 4)).convert("L").convert(mode) if mode in ("I;16", "I", "F") else None
    source = source or gradient_image((5, 4)).convert(mode)
    rgb, mask = to_rgb(source), to_mask(source)
    assert (rgb.mode, rgb.size, mask.mode, mask.size) == ("RGB", (5, 4), "L", (5, 4))


def test_palette_transparency_is_composited(tmp_path):
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 255, 0, 0, 0] + [0] * 762)
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 1
    image.save(tmp_path / "p.png")
    loaded = load_instruction(document_with_image("p.png"), base_dir=tmp_path).contexts[0].image
    assert pixels(loaded).tolist() == [[[0, 0, 255], [255, 255, 255]]]


# --------------------------------------------------------------------------------------------
# Resize policies


@settings(max_examples=60, deadline=None)
@given(
    source=st.tuples(st.integers(1, 40), st.integers(1, 40)),
    target=st.tuples(st.integers(1, 40), st.integers(1, 40)),
    policy=st.sampled_from(["crop", "fit", "stretch"]),
)
def test_prepared_images_and_masks_have_exactly_the_target_size(source, target, policy):
    image = prepare_context_image(gradient_image(source, "RGBA"), target, policy)
    mask = prepare_mask(Image.new("1", source, 1), target, policy)
    assert (image.mode, image.size, mask.mode, mask.size) == ("RGB", target, "L", target)


def three_bands(width=90, height=30) -> Image.Image:
    """Red | green | blue vertical thirds."""
    image = Image.new("RGB", (width, height), (255, 0, 0))
    image.paste((0, 255, 0), (width // 3, 0, 2 * width // 3, height))
    image.paste((0, 0, 255), (2 * width // 3, 0, width, height))
    return image


def test_crop_keeps_the_centre():
    cropped = pixels(prepare_context_image(three_bands(), (10, 10), "crop"))
    # The short side (30) becomes 10, so the 30-wide middle band becomes the whole 10x10 output;
    # only the outermost columns pick up some of the neighbouring bands through the filter.
    assert (cropped[:, 1:-1] == [0, 255, 0]).all()
    assert (cropped[:, [0, -1], 1] > 200).all()


def test_fit_letterboxes_with_the_fill_colour():
    fitted = pixels(prepare_context_image(three_bands(), (30, 30), "fit", fill=(9, 9, 9)))
    assert (fitted[:10] == 9).all() and (fitted[20:] == 9).all()
    assert tuple(fitted[15, 15]) == (0, 255, 0)
    mask = pixels(prepare_mask(Image.new("L", (90, 30), 255), (30, 30), "fit"))
    assert (mask[:10] == 0).all() and (mask[10:20] == 255).all() and (mask[20:] == 0).all()


def test_stretch_distorts_aspect():
    stretched = pixels(prepare_context_image(three_bands(), (30, 30), "stretch"))
    assert tuple(stretched[15, 2]) == (255, 0, 0) and tuple(stretched[15, 27]) == (0, 0, 255)


@pytest.mark.parametrize("policy", ["crop", "fit", "stretch"])
def test_mask_geometry_matches_its_image(policy):
    x, y = np.meshgrid(np.arange(37), np.arange(23))
    ramp = Image.fromarray((x * 5 + y * 2 + 10).astype(np.uint8))  # smooth, so filters agree
    image = pixels(prepare_context_image(ramp, (16, 20), policy)).astype(int)[..., 0]
    mask = pixels(prepare_mask(ramp, (16, 20), policy)).astype(int)
    assert np.abs(image - mask).max() <= 3  # same placement; only the resampling filter differs


def test_bad_resize_arguments_name_the_argument():
    with pytest.raises(ValueError, match=r"^policy: unknown resize policy 'squash'"):
        prepare_context_image(gradient_image(), (4, 4), "squash")
    with pytest.raises(ValueError, match=r"^size: expected \(width, height\)"):
        prepare_mask(Image.new("L", (4, 4)), (0, 4))


# --------------------------------------------------------------------------------------------
# Properties over many documents


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    gradient_image().save(folder / "toy.png")
    Image.new("L", (8, 6), 255).save(folder / "mask.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


json_scalars = st.none() | st.booleans() | st.integers(-5, 2**40) | st.floats() | st.text(max_size=12)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6,
)
image_sources = st.sampled_from(
    [
        *["toy.png"] * 5,
        "mask.png",
        "missing.png",
        "notes.txt",
        "../toy.png",
        "/etc/passwd",
        ".",
        png_data_uri(gradient_image()),
        "data:image/png;base64,!!",
        "data:image/png;base64,aGk=",
    ]
)
marker_texts = st.lists(
    st.sampled_from(["[ref#1]", "[ref#2]", "[ref#9]", "[Ref#1]", " ", "[ref#01]", *["a cat", "on a hill"] * 3]),
    max_size=4,
).map(" ".join)


def maybe(valid, invalid=json_values):
    """Mostly valid values, sometimes anything at all, so some documents get deep."""
    return st.integers(0, 9).flatmap(lambda roll: invalid if roll == 9 else valid)


def add_typo_key(document: dict) -> dict:
    return {**document, "txet": "typo"}


contexts = st.fixed_dictionaries(
    {
        "id": maybe(st.integers(1, 3)),
        "modality": maybe(st.sampled_from([*DEFAULT_MODALITIES, "stlye"])),
        "image": maybe(image_sources),
    },
    optional={
        "text": maybe(marker_texts),
        "mask": maybe(st.none() | image_sources),
        "weight": maybe(st.floats(-2, 2)),
    },
)
structured_documents = st.fixed_dictionaries(
    {
        "version": maybe(st.just(1)),
        "text": maybe(marker_texts),
        "contexts": maybe(st.lists(maybe(contexts), max_size=3)),
    },
    optional={"negative": maybe(st.text(max_size=8))},
)
documents = st.integers(0, 9).flatmap(
    lambda roll: json_values
    if roll == 9
    else structured_documents.map(add_typo_key)
    if roll == 8
    else structured_documents
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=documents)
def test_any_document_loads_or_raises_instruction_error(image_folder, document):
    original = copy.deepcopy(document)
    try:
        instruction = load_quietly(document, base_dir=image_folder, root=image_folder)
    except InstructionError:
        return
    assert document == original  # loading never mutates its input
    assert isinstance(instruction, MultiModalInstruction)
    # Whatever loaded must write back out to a document that loads to the same instruction.
    assert load_quietly(instruction.to_dict(), base_dir=image_folder, root=image_folder) == instruction


def load_quietly_text(text):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InstructionWarning)
        return MultiModalInstruction.from_json(text, base_dir="/nonexistent-base", root="/nonexistent-base")


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=40) | documents.map(lambda d: json.dumps(d)))
def test_any_json_text_parses_or_raises_instruction_error(text):
    try:
        load_quietly_text(text)
    except InstructionError:
        pass


valid_contexts = st.lists(
    st.fixed_dictionaries(
        {
            "modality": st.sampled_from(DEFAULT_MODALITIES),
            "text": st.sampled_from(["", "a cat", "x"]),
            "image": st.sampled_from(["toy.png", png_data_uri(gradient_image())]),
            "mask": st.sampled_from([None, "mask.png"]),
            "weight": st.floats(-3, 3, allow_nan=False),
        }
    ),
    max_size=4,
)


@settings(max_examples=50, deadline=None)
@given(contexts=valid_contexts, prefix=st.text(max_size=10).filter(lambda t: "[" not in t))
def test_valid_documents_round_trip_exactly(image_folder, contexts, prefix):
    numbered = [dict(context, id=index + 1) for index, context in enumerate(contexts)]
    markers = " ".join(f"[ref#{context['id']}]" for context in numbered)
    document = {"version": 1, "text": f"{prefix} {markers} go", "negative": prefix, "contexts": numbered}
    assert load_instruction(document, base_dir=image_folder, root=image_folder).to_dict() == document
