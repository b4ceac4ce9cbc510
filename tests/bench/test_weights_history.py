"""A weight file changes only with the results measured on it: every commit after the harness's weights moved
beside it that writes a new version of a model's weights also writes docs/RESULTS.md (for the super-resolution
stage, docs/SUPER_RESOLUTION.md)."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WEIGHTS = ("instruct_core/default_model/model.safetensors", "instruct_bench/weights")


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60).stdout


@pytest.fixture(scope="module")
def history():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    moved = git("log", "--no-renames", "--diff-filter=A", "--format=%H", "--",
                "instruct_bench/weights/evaluator.safetensors").split()
    if not moved or git("rev-parse", "--is-shallow-repository").strip() == "true":
        pytest.skip("the history since the weights moved is not here")
    return moved[-1]


def commits_without(page: str, since: str, *weights: str) -> list[str]:
    """Short ids of the commits after `since` that wrote a new version of `weights` but not `page`."""
    changed = git("log", "--format=%H", "--no-renames", "--diff-filter=AM", f"{since}..HEAD", "--", *weights).split()
    return [commit[:8] for commit in changed if page not in git("show", "--format=", "--name-only", commit).split()]


def test_every_new_weight_version_comes_with_its_results(history):
    without = commits_without("docs/RESULTS.md", history, *WEIGHTS)
    assert without == [], f"commits that changed weights without docs/RESULTS.md: {', '.join(without)}"


def test_every_new_super_resolution_stage_comes_with_its_measurement(history):
    page = "docs/SUPER_RESOLUTION.md"
    first_page = git("log", "--no-renames", "--diff-filter=A", "--format=%H", "--", page).split()[-1]
    without = commits_without(page, first_page, "instruct_core/default_model/super_resolution.safetensors")
    assert without == [], f"commits that changed the super-resolution stage without {page}: {', '.join(without)}"
