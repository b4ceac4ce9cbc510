"""Write the pack's English strings, locales/en/nodeDefs.json and main.json, from the nodes' schemas.

ComfyUI serves every pack's locales/<language>/ files at /i18n and its frontend shows a node's display name,
description, input names, tooltips and output names from there, in preference to the schema: the English
file must therefore say exactly what the schemas say. Rerun after changing a node's strings; the test suite
checks that the files are up to date. Translations go beside it (locales/<language>/nodeDefs.json).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCALES = ROOT / "locales" / "en"


def node_strings(schema) -> dict:
    """One node's entry in nodeDefs.json, in the layout of ComfyUI's frontend (inputs by name, outputs by index)."""
    inputs = {}
    for socket in schema.inputs:
        strings = {"name": socket.display_name or socket.id}
        if socket.tooltip:
            strings["tooltip"] = socket.tooltip
        inputs[socket.id] = strings
    outputs = {}
    for index, socket in enumerate(schema.outputs):
        strings = {"name": socket.display_name or socket.io_type}  # ComfyUI's name for an unnamed output
        if socket.tooltip:
            strings["tooltip"] = socket.tooltip
        outputs[str(index)] = strings
    return {"display_name": schema.display_name, "description": schema.description, "inputs": inputs,
            "outputs": outputs}


def english_strings(nodes) -> tuple[dict, dict]:
    """(nodeDefs.json, main.json) for these node classes."""
    schemas = [node.GET_SCHEMA() for node in nodes]
    node_defs = {schema.node_id: node_strings(schema) for schema in schemas}
    main = {"nodeCategories": {category: category for category in sorted({s.category for s in schemas})}}
    return node_defs, main


def dump(document: dict) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def main() -> None:
    # The nodes import ComfyUI's modules; the test suite's stand-ins for them are enough to read the schemas.
    sys.path.insert(0, str(ROOT / "tests" / "nodes" / "comfy_stub"))
    from load_pack import load_pack

    node_defs, main_strings = english_strings(load_pack().nodes.NODES)
    LOCALES.mkdir(parents=True, exist_ok=True)
    (LOCALES / "nodeDefs.json").write_text(dump(node_defs), encoding="utf-8")
    (LOCALES / "main.json").write_text(dump(main_strings), encoding="utf-8")
    print(f"{LOCALES}: {len(node_defs)} nodes")


if __name__ == "__main__":
    main()
