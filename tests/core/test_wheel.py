"""The installed package alone: the built wheel carries the library, the bundled model and its examples, never the
harness or the nodes; installed into a fresh environment it runs `generate` and `demo`. requirements.txt (what
ComfyUI-Manager installs) agrees with pyproject.toml."""

import importlib.util
import os
import re
import shutil
import site
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHECK_WHEEL_CONTENTS = Path(sys.executable).with_name("check-wheel-contents")
needs_build_tools = pytest.mark.skipif(
    importlib.util.find_spec("build") is None or not CHECK_WHEEL_CONTENTS.is_file(),
    reason="build and check-wheel-contents are not installed (requirements-ci.txt has them)")
SOURCES = ("instruct_core", "pyproject.toml", "README.md")
# `python -m instruct_core ARGS` with the training extra's packages (pyproject's `train`) unimportable: the
# runtime dependencies alone must run generate and the demo
WITHOUT_TRAINING_EXTRAS = ("import runpy, sys; sys.modules.update(cv2=None, faiss=None, peft=None); "
                           "sys.argv[0] = 'instruct_core'; runpy.run_module('instruct_core', run_name='__main__')")


def requirement_name(line: str) -> str:
    return re.split(r"[<>=!~\[; ]", line.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_requirements_txt_is_what_pyproject_declares_for_the_pack():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    # the pack trains too (FineTuneStage), so ComfyUI-Manager installs the train extra; torch comes with ComfyUI
    declared = [d for d in project["dependencies"] + project["optional-dependencies"]["train"]
                if requirement_name(d) != "torch"]
    lines = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert sorted(lines) == sorted(declared)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the package's sources (the checkout is left as it is)."""
    source = tmp_path_factory.mktemp("source")
    for name in SOURCES:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                              if (ROOT / name).is_dir() else {}))
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(source)],
                   check=True, capture_output=True, text=True, timeout=600)
    return next(out.glob("*.whl"))


@needs_build_tools
def test_the_wheel_carries_what_runs_and_no_harness(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"instruct_core"}
    for needed in ("instruct_core/default_model/model.safetensors", "instruct_core/default_model/config.json",
                   "instruct_core/default_model/examples/subject/instruction.json",
                   "instruct_core/configs/clip_tokenizer/vocab.json", "instruct_core/train/trainer.py"):
        assert needed in names, needed
    assert not [n for n in names if "ablations" in n or "evaluator" in n]
    # W002: the diffusers config folders of several model families hold identical files, as they should
    checked = subprocess.run([CHECK_WHEEL_CONTENTS, "--ignore", "W002", str(wheel)],
                             capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stdout + checked.stderr


@needs_build_tools
def test_the_installed_wheel_generates_and_runs_the_demo(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    # this environment's torch and diffusers, offline, after the fresh one's own packages (a path in a .pth file
    # runs none of the .pth files there: no editable install of the checkout comes along)
    fresh = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                           check=True, capture_output=True, text=True).stdout.strip()
    Path(fresh, "test_environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--ignore-installed",
                    str(wheel)], check=True, timeout=300)
    work = tmp_path / "work"  # no checkout here: `python -m` puts the working folder first on the path
    work.mkdir()
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH="")
    run = lambda *args: subprocess.run([python, *args], cwd=work, env=env, capture_output=True, text=True,
                                       timeout=600)
    where = run("-c", "import instruct_core, importlib.util as u; print(instruct_core.__file__); "
                      "print(u.find_spec('instruct_bench'))")
    assert where.returncode == 0, where.stderr
    location, harness = where.stdout.split()
    assert Path(location).is_relative_to(venv) and harness == "None"
    example = Path(location).parent / "default_model" / "examples" / "control_subject" / "instruction.json"
    generated = run("-c", WITHOUT_TRAINING_EXTRAS, "generate", "--instruction", str(example), "--out", "result.png",
                    "--steps", "2", "--quiet")
    assert generated.returncode == 0, generated.stderr
    assert (work / "result.png").is_file()
    demo = run("-c", WITHOUT_TRAINING_EXTRAS, "demo", "--out", "demo", "--steps", "1")
    assert demo.returncode == 0, demo.stderr
    assert (work / "demo" / "contact_sheet.png").is_file()
    assert len(list((work / "demo").glob("*/result.png"))) == 13
