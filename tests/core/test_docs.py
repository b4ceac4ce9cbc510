"""The documentation keeps up with the code: docs/ARCHITECTURE.md names every module, in its package's table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("instruct_core", "instruct_core/train", "instruct_bench", "nodes")


def package_section(text: str, package: str) -> str:
    """From the line that opens with `package/` to the next package's opening line or heading."""
    start = re.search(rf"^`{re.escape(package)}/`", text, re.MULTILINE)
    assert start, f"docs/ARCHITECTURE.md has no section opening with `{package}/`"
    rest = text[start.end():]
    end = re.search(r"^(`(" + "|".join(map(re.escape, PACKAGES)) + r")/`|## )", rest, re.MULTILINE)
    return rest[:end.start()] if end else rest


@pytest.mark.parametrize("package", PACKAGES)
def test_the_architecture_page_names_every_module(package):
    section = package_section((ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8"), package)
    modules = sorted(p.name for p in (ROOT / package).glob("*.py") if p.stem not in ("__init__", "__main__"))
    assert modules, package
    missing = [name for name in modules if f"`{name}`" not in section]
    assert missing == [], f"docs/ARCHITECTURE.md's {package}/ table lacks {', '.join(missing)}: add a line for each"


def _python_blocks() -> list[tuple[str, str]]:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return [(page.name, block) for page in pages
            for block in re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), re.DOTALL)]


@pytest.mark.parametrize("page,block", _python_blocks(), ids=lambda value: value if value.endswith(".md") else "")
def test_the_python_examples_import_what_exists(page, block):
    import importlib

    imports = re.findall(r"^from ([\w.]+) import ([\w, ]+)$", block, re.MULTILINE)
    assert imports, f"{page}: a Python example without imports"
    for module, names in imports:
        loaded = importlib.import_module(module)
        for name in (n.strip() for n in names.split(",")):
            assert hasattr(loaded, name), f"{page}: {module} has no {name}"
