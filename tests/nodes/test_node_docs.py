"""What ComfyUI's frontend shows about each node besides its sockets: a help page, English strings and
search aliases. The nodes load over tests/nodes/comfy_stub/ (no ComfyUI installed); tests/nodes/test_comfyui_integration.py
checks that a real ComfyUI serves the same files."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "comfy_stub"))
from load_pack import ROOT, load_pack  # noqa: E402

pack = load_pack()
SCHEMAS = [node.GET_SCHEMA() for node in pack.nodes.NODES]
IDS = [schema.node_id for schema in SCHEMAS]
HELP = ROOT / pack.WEB_DIRECTORY / "docs"
LOCALES = ROOT / "locales" / "en"


def locale_script():
    spec = importlib.util.spec_from_file_location("make_locales", ROOT / "scripts" / "make_locales.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("schema", SCHEMAS, ids=IDS)
def test_every_node_has_a_help_page_titled_with_its_display_name(schema):
    # The frontend asks for /extensions/<pack>/docs/<node id>.md, i.e. web/docs/<node id>.md.
    page = HELP / f"{schema.node_id}.md"
    assert page.is_file(), f"{page.relative_to(ROOT)} is missing: every node needs a help page"
    text = page.read_text(encoding="utf-8")
    assert text.splitlines()[0] == f"# {schema.display_name}"
    mentioned = set(re.findall(r"`(\w+)`", text))
    missing = [socket.id for socket in schema.inputs if socket.id not in mentioned]
    if schema.node_id == "InstructionBuilder":  # its slots are described as ref_1, ref_2, ...
        missing = [name for name in missing if name != "contexts"]
    assert missing == [], f"{page.name} does not describe the inputs {missing}"


def test_english_strings_say_what_the_schemas_say():
    script = locale_script()
    node_defs, main = script.english_strings(pack.nodes.NODES)
    stale = "out of date: run `python scripts/make_locales.py`"
    assert json.loads((LOCALES / "nodeDefs.json").read_text(encoding="utf-8")) == node_defs, stale
    assert json.loads((LOCALES / "main.json").read_text(encoding="utf-8")) == main, stale
    assert set(node_defs) == set(IDS)
    loader = node_defs["InstructImagenLoader"]
    assert loader["display_name"] == "Instruct-Imagen Loader"
    assert set(loader["inputs"]) == {"model", "adapter", "dtype"} and loader["outputs"]["0"]["name"] == "model"
    assert main["nodeCategories"] == {"Instruct-Imagen": "Instruct-Imagen"}


def test_the_locale_script_reads_the_schema_strings(tmp_path):
    # The script's reading, on a node of its own: names default to ids, tooltips only where given.
    io = sys.modules["comfy_api.latest"].io

    class Probe(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id="Probe", display_name="A probe", category="Tests", description="probes",
                             inputs=[io.Int.Input("count", tooltip="how many"), io.Image.Input("image")],
                             outputs=[io.Image.Output(display_name="picture", tooltip="the result"),
                                      io.Mask.Output()])

    node_defs, main = locale_script().english_strings([Probe])
    assert node_defs == {"Probe": {"display_name": "A probe", "description": "probes",
                                   "inputs": {"count": {"name": "count", "tooltip": "how many"},
                                              "image": {"name": "image"}},
                                   "outputs": {"0": {"name": "picture", "tooltip": "the result"},
                                               "1": {"name": "MASK"}}}}
    assert main == {"nodeCategories": {"Tests": "Tests"}}


@pytest.mark.parametrize("schema", SCHEMAS, ids=IDS)
def test_every_node_is_found_by_other_words_too(schema):
    aliases = getattr(schema, "search_aliases", None)
    assert aliases, f"{schema.node_id} has no search aliases"
    assert all(isinstance(a, str) and a.strip() == a and a for a in aliases)
    assert len(set(aliases)) == len(aliases)
    assert all(a.lower() not in schema.display_name.lower() for a in aliases)  # other words, not its name
    schema.get_v1_info(pack.nodes.NODES[IDS.index(schema.node_id)])  # still a valid schema


def test_a_reference_image_is_found_as_one():
    aliases = dict(zip(IDS, (s.search_aliases for s in SCHEMAS)))
    assert {"reference image", "ip adapter"} <= set(aliases["ContextImage"])
    assert "ksampler" in aliases["InstructSampler"]
