"""The pack as the Comfy registry and ComfyUI-Manager see it: pyproject's [tool.comfy], the icon, what the
registry archive carries (.comfyignore), no invented addresses, and one install story in the docs."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
COMFY = PYPROJECT["tool"]["comfy"]
NAME = PYPROJECT["project"]["name"]

# A web address on a code or model host under this project's name, or a template's stand-in: no such
# address has been published, so any is invented.
INVENTED_ADDRESS = re.compile(
    r"https?://(?:[\w-]+\.)*(?:github\.com|githubusercontent\.com|gitlab\.com|bitbucket\.org|huggingface\.co|"
    r"codeberg\.org)/(?:[\w.-]*instruct[-_.]?imagen|username|user-name|your[-_]?\w*|owner|org)\b"
    r"|https?://(?:www\.)?example\.(?:com|org|net)\b", re.IGNORECASE)


def git_files(*args: str) -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout: the registry archive is made of the git-tracked files")
    out = subprocess.run(["git", "ls-files", *args], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def registry_archive() -> set[str]:
    """The files `comfy node publish` packs: tracked files that .comfyignore (gitignore syntax) does not match."""
    ignored = set(git_files("--cached", "--ignored", "--exclude-from=.comfyignore"))
    return set(git_files()) - ignored


def test_registry_fields_are_real():
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*(?:[-_.][A-Za-z0-9]+)*", NAME) and len(NAME) < 100
    assert re.fullmatch(r"\d+\.\d+\.\d+", PYPROJECT["project"]["version"])
    assert COMFY["PublisherId"] and COMFY["DisplayName"] == "Instruct-Imagen"
    supported = SpecifierSet(COMFY["requires-comfyui"])
    assert "0.8.0" in supported and "0.7.0" not in supported  # the V3 API with Autogrow, as the nodes use it
    assert "urls" not in PYPROJECT["project"] or all(
        not INVENTED_ADDRESS.search(url) for url in PYPROJECT["project"]["urls"].values())


def test_the_icon_is_a_shipped_square_image_within_the_registry_limits():
    icon = ROOT / COMFY["Icon"]
    assert icon.is_file()
    with Image.open(icon) as image:
        assert image.format == "PNG"
        assert image.width == image.height <= 400
        assert len(image.getcolors(1 << 16) or range(1 << 16)) > 16  # a picture, not a blank square
    assert COMFY["Icon"] in registry_archive()


def test_the_registry_archive_carries_what_comfyui_runs_and_nothing_of_the_harness():
    archive = registry_archive()
    runtime = ("__init__.py", "pyproject.toml", "requirements.txt", "README.md", "LICENSE")
    assert {name for name in runtime if (ROOT / name).exists()} <= archive
    for folder in ("nodes/", "web/", "locales/", "example_workflows/", "workflows/inputs/", "workflows/api/"):
        tracked = {f for f in git_files() if f.startswith(folder)}
        assert tracked and tracked <= archive, folder
    assert {f for f in git_files() if f.startswith("instruct_core/") and f.endswith(".py")} <= archive
    assert "instruct_core/default_model/model.safetensors" in archive
    assert "instruct_core/default_model/config.json" in archive

    assert not [f for f in archive if f.startswith(("tests/", "instruct_bench/", ".ci/"))]
    weights = [f for f in archive if f.endswith((".safetensors", ".bin", ".ckpt", ".pt"))]
    assert sorted(weights) == ["instruct_core/default_model/model.safetensors",
                               "instruct_core/default_model/super_resolution.safetensors"], \
        "only the bundled model's weights (base and super-resolution stage) ship"
    assert not [f for f in archive if f.startswith("docs/") and not f.endswith(".md")], "docs images stay out"


def test_no_invented_address_anywhere():
    found = []
    for name in git_files():
        path = ROOT / name
        if path == Path(__file__).resolve() or not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # images and weights
        found += [f"{name}: {m.group(0)}" for m in INVENTED_ADDRESS.finditer(text)]
    assert found == []


def test_the_pattern_catches_invented_addresses():
    for address in ("https://github.com/instruct-imagen/comfyui-instruct-imagen",
                    "https://raw.githubusercontent.com/username/repo/main/icon.png",
                    "https://huggingface.co/instruct_imagen/default", "https://example.com/pack"):
        assert INVENTED_ADDRESS.search(address), address
    for address in ("https://github.com/comfyanonymous/ComfyUI", "http://127.0.0.1:8188"):
        assert not INVENTED_ADDRESS.search(address), address


def test_one_install_story():
    # The registry name is the folder ComfyUI-Manager installs into; README and docs/COMFYUI.md use both.
    for doc in ("README.md", "docs/COMFYUI.md"):
        text = (ROOT / doc).read_text()
        assert set(re.findall(r"comfy node install ([\w.-]+)", text)) == {NAME}, doc
        assert f"custom_nodes/{NAME}" in text, doc
        assert "git clone" not in text, doc
