"""The package surface: public names, and no ComfyUI import anywhere in the core."""

import ast
from pathlib import Path

import instruct_core

CORE = Path(instruct_core.__file__).parent


def test_public_names_resolve():
    for name in instruct_core.__all__:
        assert getattr(instruct_core, name) is not None, name
    assert issubclass(instruct_core.InstructionError, ValueError)


def test_core_never_imports_comfyui():
    offenders = []
    for path in CORE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names
                          if n.split(".")[0] in ("comfy", "comfy_api", "comfy_extras", "folder_paths", "nodes",
                                                 "server", "execution")]
    assert offenders == []
