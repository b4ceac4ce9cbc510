"""The layers in pyproject.toml ([tool.importlinter]) hold on this checkout, and an import that crosses one breaks
the check: the library never imports the harness or the nodes, inference never imports training, no cycles."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACK = "comfyui_instruct_imagen"  # the name pyproject.toml analyses the checkout under
LINT = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT.is_file(), reason="import-linter is not installed")


@pytest.fixture(scope="module")
def pack_copy(tmp_path_factory):
    """The checkout's code and layer contracts under the pack's package name, weights left out."""
    parent = tmp_path_factory.mktemp("lint")
    pack = parent / PACK
    pack.mkdir()
    for name in ("instruct_core", "instruct_bench", "nodes"):
        shutil.copytree(ROOT / name, pack / name, ignore=shutil.ignore_patterns("*.safetensors", "__pycache__"))
    for name in ("__init__.py", "pyproject.toml"):
        shutil.copy(ROOT / name, pack / name)
    return pack


def lint(pack: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(pack.parent))
    return subprocess.run([str(LINT), "--no-cache"], cwd=pack, env=env, capture_output=True, text=True, timeout=120)


def with_line(path: Path, line: str):
    original = path.read_text()
    path.write_text(original + "\n" + line + "\n")
    return lambda: path.write_text(original)


def test_the_checkout_keeps_every_layer(pack_copy):
    result = lint(pack_copy)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize("module, line, contract", [
    ("instruct_core/samplers.py", "from .train import trainer", "The library's layers"),
    ("instruct_core/pipeline.py", "import instruct_bench.tasks", "The library imports neither"),
    ("instruct_core/models.py", "from ..nodes import common", "The library imports neither"),
    ("nodes/common.py", "from ..instruct_bench import tasks", "The nodes use the library, never the harness"),
    ("instruct_bench/scenes.py", "from . import evaluation", "No import cycles"),
])
def test_an_import_across_a_layer_breaks_the_check(pack_copy, module, line, contract):
    restore = with_line(pack_copy / module, line)
    try:
        result = lint(pack_copy)
    finally:
        restore()
    assert result.returncode != 0
    report = " ".join(result.stdout.split())  # long contract names wrap
    assert "Broken contracts" in report, report
    assert contract in report.split("Broken contracts", 1)[1], report


def test_no_private_name_crosses_a_module_border():
    import ast

    crossing = []
    for package in ("instruct_core", "instruct_bench", "nodes"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                internal = isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith(
                    ("instruct_core", "instruct_bench")))
                if internal:
                    crossing += [f"{path.relative_to(ROOT)}: {alias.name}" for alias in node.names
                                 if alias.name.startswith("_") and not alias.name.startswith("__")]
    assert crossing == []
