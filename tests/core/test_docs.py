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
