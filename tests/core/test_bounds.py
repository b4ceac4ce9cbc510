"""Bounded by design: absurd numbers, sizes and texts are refused by name before they cost memory.

Hypothesis draws command lines, instruction texts and image shapes; each run holds one property: success, or
the refusal the interface promises (exit 2 and one line naming the flag on the command line, the library's
InstructionError naming the field in Python), with memory under a ceiling (`memory_ceiling`: the address space
capped 2 GiB above what the process maps, so an input that made the code reach for more fails the test), and no
file left half written. docs/SECURITY.md lists the limits and these figures.
"""

from __future__ import annotations

import json
import math
import os
import stat
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from instruct_core import limits
from instruct_core import models as models_module
from instruct_core.cli import main
from instruct_core.guidance import GuidanceConfig
from instruct_core.instruction import (
    MAX_CROP_OVERSIZE,
    InstructionError,
    MultiModalInstruction,
    parse_markers,
    prepare_context_image,
    read_image_file,
)
from instruct_core.models import default_model_available

sys.path.insert(0, str(Path(__file__).parent))
from test_security import memory_ceiling  # noqa: E402

def fuzz(examples: int):
    return settings(max_examples=examples, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def cached_models():
    """load_pipeline, memoised per arguments: the real loader, run once per model for a whole fuzz run."""
    real, cache = models_module.load_pipeline, {}

    def load(*args, **kwargs):
        key = repr((args, sorted(kwargs.items())))
        if key not in cache:
            cache[key] = real(*args, **kwargs)
        return cache[key]

    models_module.load_pipeline = load
    yield
    models_module.load_pipeline = real


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bounds")
    (folder / "ok.json").write_text(json.dumps({"version": 1, "text": "a red circle", "contexts": []}))
    Image.new("RGB", (32, 32), (200, 30, 30)).save(folder / "small.png")
    Image.new("RGB", (1, 200_000), (30, 200, 30)).save(folder / "strip.png")
    os.mkfifo(folder / "fifo")
    (folder / "folder").mkdir()
    return folder


NUMBERS = st.sampled_from(["nan", "inf", "-inf", "1e308", "-1e308", "1e-9", "-1", "0", "1", "2", "0.5", "31",
                           "100000", "9" * 30, "-" + "9" * 30, "3.5", "x"])
FLAGS = ("--steps", "--batch", "--width", "--height", "--cfg-text", "--cfg-context", "--denoise", "--seed")


def generate_argv(folder: Path, out: Path, choices: dict, init: str | None) -> list[str]:
    argv = ["generate", "--instruction", str(folder / "ok.json"), "--out", str(out), "--quiet", "--steps", "2"]
    argv += [f"{flag}={value}" for flag, value in choices.items()]
    if init is not None:
        argv += ["--init-image", str(folder / init)]
    return argv


def assert_no_partial_files(folder: Path) -> None:
    for path in folder.iterdir():
        assert not path.name.endswith(".tmp"), path
        with Image.open(path) as image:  # every image written is whole
            image.verify()


@pytest.mark.skipif(not default_model_available(), reason="no default model bundled")
@fuzz(40)
@example(choices={"--width": "100000"}, init=None)
@example(choices={"--denoise": "1e-9"}, init="small.png")
@example(choices={"--cfg-text": "1e308"}, init=None)
@example(choices={"--batch": "100000"}, init=None)
@example(choices={"--denoise": "0.5"}, init="strip.png")
@example(choices={"--denoise": "0.5"}, init="fifo")
@example(choices={"--denoise": "0.5"}, init="folder")
@given(choices=st.dictionaries(st.sampled_from(FLAGS), NUMBERS, max_size=3),
       init=st.none() | st.sampled_from(["small.png", "strip.png", "fifo", "folder", "missing.png"]))
def test_any_generate_command_line_succeeds_or_names_the_flag(cached_models, files, tmp_path_factory, capsys,
                                                              choices, init):
    out_dir = tmp_path_factory.mktemp("out")
    argv = generate_argv(files, out_dir / "image.png", choices, init)
    with memory_ceiling():
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse: a value of the wrong type
            code = exit_.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code in (0, 2), (argv, err)
    if code == 2:  # our one line, or argparse's usage and its line for a value of the wrong type
        named = err[-1]
        assert (len(err) == 1 and named.startswith("error: ")
                or named.startswith("instruct-imagen generate: error: argument --")), (argv, err)
        assert any(flag in named for flag in (*choices, "--init-image", "denoise", "batch", "width", "height",
                                              "sampler", "result")), (argv, named)
    else:
        assert sorted(out_dir.glob("image*.png"))  # image.png, or image_0.png ... for a batch
    assert_no_partial_files(out_dir)


@pytest.mark.parametrize("argv, message", [
    (["eval", "--examples", "0"], "error: --examples: 0 must be at least 1"),
    (["eval", "--steps", "-3"], "error: --steps: -3 must be at least 1"),
    (["build-default", "--scale", "nan"], "error: --scale: nan must be a number in (0, 100]"),
    (["build-default", "--scale", "1e308"], "error: --scale: 1e+308 must be a number in (0, 100]"),
    (["speed", "sample", "--batch", "100000"], "error: --batch: '100000' needs integers from 1 to 256"),
    (["speed", "train", "--batch", "100000"], "error: --batch: 100000 must be at most 256"),
])
def test_absurd_counts_and_scales_of_the_harness_are_one_line_and_exit_2(capsys, argv, message):
    from instruct_bench.cli import main as harness_main

    assert harness_main(argv) == 2
    assert capsys.readouterr().err.strip() == message


def test_a_root_that_is_no_folder_is_one_line_and_exit_2(capsys):
    assert main(["generate", "--instruction", "x.json", "--out", "o.png", "--root", "/nonexistent/folder"]) == 2
    assert capsys.readouterr().err.strip() == "error: --root: /nonexistent/folder is not a folder"


@pytest.mark.skipif(not default_model_available(), reason="no default model bundled")
def test_special_files_and_missing_devices_are_named_not_waited_on(files, tmp_path, capsys):
    common = ["generate", "--instruction", str(files / "ok.json"), "--out", str(tmp_path / "o.png"), "--quiet"]
    assert main([*common, "--model", str(files / "fifo")]) == 2
    assert "not a regular file (a FIFO, device or socket)" in capsys.readouterr().err
    assert main([*common, "--adapter", str(files / "fifo")]) == 2
    assert "adapter: not a regular file" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*common, "--device", "cuda"]) == 2
        assert "device: 'cuda', but this torch sees no CUDA device" in capsys.readouterr().err


@fuzz(150)
@given(text=st.text(st.sampled_from(list("[]<>@#ref image 0123456789") + ["\u0661", "\uff11", "\u0967"]),
                    max_size=24))
def test_marker_texts_parse_to_ascii_ids_or_name_the_field(text):
    try:
        ids = parse_markers(text, field="caption")
    except InstructionError as error:
        assert str(error).startswith("caption: ")
        return
    for marker_id in ids:
        written = str(marker_id)
        assert marker_id >= 1 and written.isascii()
        assert any(form in text for form in (f"[ref#{written}]", f"<image{written}>", f"@image{written}"))


@fuzz(60)
@given(width=st.integers(1, 400_000), height=st.integers(1, 400_000),
       target=st.tuples(st.integers(1, 96), st.integers(1, 96)),
       policy=st.sampled_from(["crop", "fit", "stretch"]))
def test_no_image_is_resized_into_a_buffer_larger_than_its_target(monkeypatch, width, height, target, policy):
    """Thin strips (1 x 400,000) and wide ones under every policy: every resize Pillow is asked for is at most
    MAX_CROP_OVERSIZE times the target, and the result is exactly the target."""
    if width * height > 2_000_000:
        width, height = max(1, 2_000_000 // height), height
    sizes = []
    real_resize = Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize",
                        lambda self, size, *args, **kwargs: sizes.append(size) or real_resize(self, size, *args,
                                                                                              **kwargs))
    result = prepare_context_image(Image.new("RGB", (width, height), (10, 20, 30)), target, policy)
    assert result.size == target
    assert all(w * h <= MAX_CROP_OVERSIZE * target[0] * target[1] for w, h in sizes), sizes


@pytest.mark.parametrize("kind", ["fifo", "folder", "missing.png"])
def test_read_image_file_refuses_special_files_without_blocking(files, kind):
    with pytest.raises(InstructionError, match=r"^init: (not a regular file|file not found|cannot read)"):
        read_image_file(files / kind, "init")


def test_an_image_declaring_too_many_frames_is_refused_before_decoding(tmp_path):
    frames = [Image.new("L", (2, 2), i % 256) for i in range(1100)]
    frames[0].save(tmp_path / "many.gif", save_all=True, append_images=frames[1:])
    with pytest.raises(InstructionError, match=r"^init: image declares \d+ frames, over the limit of 1024"):
        read_image_file(tmp_path / "many.gif", "init")


@pytest.mark.parametrize("scale", [1e308, -1e308, 101.0, float("nan"), float("inf")])
def test_absurd_guidance_scales_are_refused_by_name(scale):
    with pytest.raises(InstructionError, match=r"^guidance text_scale: "):
        GuidanceConfig(text_scale=scale)


def test_limits_are_settings(monkeypatch):
    previous = limits.configure(max_side=64)
    try:
        with pytest.raises(InstructionError, match=r"^width: 128 must be between 1 and 64"):
            limits.check_canvas(128, 64, 1)
    finally:
        limits.configure(**{name: getattr(previous, name) for name in ("max_side",)})
    limits.check_canvas(128, 64, 1)
    with pytest.raises(ValueError, match="max_side must be a positive finite number"):
        limits.configure(max_side=math.nan)
    monkeypatch.setenv("INSTRUCT_IMAGEN_MAX_MEMORY_GIB", "0.5")
    assert limits._memory_from_environment(0) == 2**29


def test_the_memory_estimate_refuses_a_huge_request_before_noise_is_drawn(monkeypatch):
    from instruct_core.pipeline import InstructImagen
    from instruct_core.tiny import build_tiny_base

    pipe = InstructImagen.from_base(build_tiny_base(seed=0, pixel_space=True, sample_size=32))
    cond = pipe.encode_instruction(MultiModalInstruction(text="a red circle", contexts=[]), (32, 32))
    drawn = []
    monkeypatch.setattr("instruct_core.pipeline.prepare_noise", lambda *a, **k: drawn.append(a))
    previous = limits.configure(max_memory_bytes=2**20)
    try:
        with pytest.raises(InstructionError, match=r"^batch: 4 images of 64x64 needs about .* GiB, over the limit"):
            pipe.sample(cond, width=64, height=64, batch_size=4, steps=1)
    finally:
        limits.configure(max_memory_bytes=previous.max_memory_bytes)
    assert drawn == []


def test_a_non_finite_result_is_an_error_and_no_image(monkeypatch):
    from instruct_core.pipeline import InstructImagen
    from instruct_core.tiny import build_tiny_base

    pipe = InstructImagen.from_base(build_tiny_base(seed=0, pixel_space=True, sample_size=32))
    cond = pipe.encode_instruction(MultiModalInstruction(text="a red circle", contexts=[]), (32, 32))
    with torch.no_grad():
        next(pipe.base.unet.parameters()).fill_(math.inf)
    try:
        with pytest.raises(InstructionError, match=r"^result: sampling gave NaN or infinite values"):
            pipe.sample(cond, width=32, height=32, steps=2)
    finally:
        with torch.no_grad():
            next(pipe.base.unet.parameters()).copy_(next(build_tiny_base(seed=0).unet.parameters()))


def test_context_weights_and_sizes_are_bounded_for_both_paths():
    """`limits.check_contexts` is what encode_instruction and the ComfyUI patch (ApplyInstructImagen) ask."""
    from instruct_core.instruction import Context

    context = Context(id=1, modality="subject", text="", image=Image.new("RGB", (8, 8)), weight=1e308)
    with pytest.raises(InstructionError, match=r"^contexts\[0\]\.weight: 1e\+308 is outside \[-100, 100\]"):
        limits.check_contexts([context], 64, 64)
    context.weight = 1.0
    limits.check_contexts([context] * 8, 512, 512)
    with pytest.raises(InstructionError, match=r"^contexts: 8 contexts of 2048x2048 exceed the limit"):
        limits.check_contexts([context] * 8, 2048, 2048)
