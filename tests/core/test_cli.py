"""The command line: end to end on the example instruction, and exit code 2 with one line on bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from instruct_core.cli import main

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "two_contexts"


@pytest.fixture()
def example(tmp_path):
    folder = tmp_path / "example"
    shutil.copytree(EXAMPLE, folder)
    return folder


def _write(folder, document):
    path = folder / "instruction.json"
    path.write_text(json.dumps(document))
    return path


def test_generate_end_to_end_in_a_real_process(example, tmp_path):
    out = tmp_path / "out" / "result.png"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "instruct_core", "generate", "--instruction",
                           str(example / "instruction.json"), "--out", str(out), "--steps", "3", "--quiet"],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    image = Image.open(out)
    assert image.size == (128, 128) and image.mode == "RGB"  # the bundled cascade: 32x32 base, 128x128 stage
    base = tmp_path / "out" / "base.png"
    proc = subprocess.run([sys.executable, "-m", "instruct_core", "generate", "--instruction",
                           str(example / "instruction.json"), "--out", str(base), "--steps", "3", "--quiet",
                           "--no-upscale"], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert Image.open(base).size == (32, 32)


def test_malformed_instruction_exits_2_naming_the_missing_reference(example, tmp_path):
    document = json.loads((example / "instruction.json").read_text())
    document["text"] += " next to [ref#3]"
    path = _write(example, document)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "instruct_core", "generate", "--instruction", str(path),
                           "--out", str(tmp_path / "x.png")], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "[ref#3]" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x.png").exists()


def test_batch_writes_numbered_files(example, tmp_path, capsys):
    out = tmp_path / "batch.png"
    code = main(["generate", "--instruction", str(example / "instruction.json"), "--out", str(out),
                 "--steps", "2", "--batch", "2", "--sampler", "euler", "--schedule", "normal", "--quiet",
                 "--cfg-text", "3", "--cfg-context", "1.5", "--guidance", "interleaved", "--seed", "4"])
    assert code == 0
    assert sorted(p.name for p in tmp_path.glob("batch_*.png")) == ["batch_0.png", "batch_1.png"]
    assert "batch_0.png" in capsys.readouterr().out


def test_init_image_and_denoise(example, tmp_path):
    out = tmp_path / "img2img.png"
    code = main(["generate", "--instruction", str(example / "instruction.json"), "--out", str(out),
                 "--steps", "4", "--init-image", str(example / "subject.png"), "--denoise", "0.5", "--quiet"])
    assert code == 0 and out.exists()


@pytest.mark.parametrize("extra, message", [
    (["--width", "30"], "width"),
    (["--batch", "0"], "--batch"),
    (["--denoise", "0.5"], "--denoise"),
    (["--model", "/nonexistent/model.safetensors"], "model.safetensors"),
    (["--adapter", "/nonexistent/adapter.safetensors"], "adapter"),
    (["--init-image", "/nonexistent.png"], "--init-image"),
    (["--out", "picture.jpg"], "--out"),
])
def test_bad_arguments_exit_2_with_a_message(example, tmp_path, capsys, extra, message):
    args = ["generate", "--instruction", str(example / "instruction.json"), "--out", str(tmp_path / "o.png"),
            "--steps", "2", "--quiet"]
    code = main(args + extra)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error:") and message in err


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["contexts"].append(dict(d["contexts"][0])), "duplicate"),
    (lambda d: d.update(text="   "), "text"),
    (lambda d: d["contexts"][0].update(image="missing.png"), "missing.png"),
    (lambda d: d["contexts"][0].update(modality="hologram"), "hologram"),
    (lambda d: d.update(version=7), "version"),
])
def test_bad_instructions_exit_2_naming_the_field(example, tmp_path, capsys, mutate, message):
    document = json.loads((example / "instruction.json").read_text())
    mutate(document)
    path = _write(example, document)
    code = main(["generate", "--instruction", str(path), "--out", str(tmp_path / "o.png"), "--quiet"])
    assert code == 2
    assert message in capsys.readouterr().err


def test_root_confines_instruction_images(example, tmp_path, capsys):
    outside = tmp_path / "outside.png"
    Image.new("RGB", (8, 8)).save(outside)
    document = json.loads((example / "instruction.json").read_text())
    document["contexts"][0]["image"] = "../outside.png"
    path = _write(example, document)
    code = main(["generate", "--instruction", str(path), "--out", str(tmp_path / "o.png"), "--quiet",
                 "--root", str(example)])
    assert code == 2
    assert "outside" in capsys.readouterr().err
