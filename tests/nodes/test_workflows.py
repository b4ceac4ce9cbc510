"""The example workflows: only existing nodes, valid inputs, UI and API twins that agree, inputs and thumbnails
shipped. Node definitions come from the pack's schemas (over tests/nodes/comfy_stub/) and, for the few ComfyUI
core nodes used, from the /object_info entries of ComfyUI 0.8 copied below."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "comfy_stub"))
from load_pack import ROOT, load_pack  # noqa: E402

pack = load_pack()

API_DIR = ROOT / "workflows" / "api"
UI_DIR = ROOT / "example_workflows"
INPUTS = ROOT / "workflows" / "inputs"
NAMES = sorted(p.stem for p in API_DIR.glob("*.json"))
EXPECTED = {"text_to_image", "subject", "style", "style_transfer", "edge", "depth", "mask", "sketch", "inpainting",
            "subject_style", "multi_subject", "control_style", "training", "train_adapter", "ksampler_trained_adapter",
            "ksampler_subject", "ksampler_style", "ksampler_edge", "ksampler_depth", "ksampler_mask",
            "ksampler_subject_style_edge"}
# Files the user brings (their SD1.5 checkpoint) or that train_adapter writes: no folder lists them here.
USER_FILES = {("ckpt_name", "v1-5-pruned-emaonly.safetensors"), ("base_model", "v1-5-pruned-emaonly.safetensors"),
              ("adapter", "my_sd15_adapter.safetensors")}
WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}

_IMAGE_FILE = [["example.png"], {"image_upload": True}]
CORE_NODES = {
    "LoadImage": {"input": {"required": {"image": _IMAGE_FILE}}, "input_order": {"required": ["image"]},
                  "output": ["IMAGE", "MASK"]},
    "LoadImageMask": {"input": {"required": {"image": _IMAGE_FILE, "channel": [["alpha", "red", "green", "blue"]]}},
                      "input_order": {"required": ["image", "channel"]}, "output": ["MASK"]},
    "SaveImage": {"input": {"required": {"images": ["IMAGE", {}], "filename_prefix": ["STRING", {"default": "ComfyUI"}]}},
                  "input_order": {"required": ["images", "filename_prefix"]}, "output": []},
    "Canny": {"input": {"required": {"image": ["IMAGE", {}],
                                     "low_threshold": ["FLOAT", {"default": 0.4, "min": 0.01, "max": 0.99}],
                                     "high_threshold": ["FLOAT", {"default": 0.8, "min": 0.01, "max": 0.99}]}},
              "input_order": {"required": ["image", "low_threshold", "high_threshold"]}, "output": ["IMAGE"]},
    "EmptyImage": {"input": {"required": {k: ["INT", {"min": 0 if k == "color" else 1, "max": 16777215}]
                                          for k in ("width", "height", "batch_size", "color")}},
                   "input_order": {"required": ["width", "height", "batch_size", "color"]}, "output": ["IMAGE"]},
    "ImageCompositeMasked": {
        "input": {"required": {"destination": ["IMAGE", {}], "source": ["IMAGE", {}], "x": ["INT", {"min": 0}],
                               "y": ["INT", {"min": 0}], "resize_source": ["BOOLEAN", {}]},
                  "optional": {"mask": ["MASK", {}]}},
        "input_order": {"required": ["destination", "source", "x", "y", "resize_source"], "optional": ["mask"]},
        "output": ["IMAGE"]},
    "CheckpointLoaderSimple": {"input": {"required": {"ckpt_name": [[]]}}, "input_order": {"required": ["ckpt_name"]},
                               "output": ["MODEL", "CLIP", "VAE"]},
    "EmptyLatentImage": {"input": {"required": {k: ["INT", {"min": 16 if k != "batch_size" else 1, "max": 16384}]
                                                for k in ("width", "height", "batch_size")}},
                         "input_order": {"required": ["width", "height", "batch_size"]}, "output": ["LATENT"]},
    "KSampler": {
        "input": {"required": {"model": ["MODEL", {}], "seed": ["INT", {"min": 0, "control_after_generate": True}],
                               "steps": ["INT", {"min": 1, "max": 10000}], "cfg": ["FLOAT", {"min": 0.0, "max": 100.0}],
                               "sampler_name": [["euler", "dpmpp_2m"]], "scheduler": [["normal", "karras"]],
                               "positive": ["CONDITIONING", {}], "negative": ["CONDITIONING", {}],
                               "latent_image": ["LATENT", {}], "denoise": ["FLOAT", {"min": 0.0, "max": 1.0}]}},
        "input_order": {"required": ["model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive",
                                     "negative", "latent_image", "denoise"]},
        "output": ["LATENT"]},
    "VAEDecode": {"input": {"required": {"samples": ["LATENT", {}], "vae": ["VAE", {}]}},
                  "input_order": {"required": ["samples", "vae"]}, "output": ["IMAGE"]},
}


def _as_lists(value):
    return json.loads(json.dumps(value))  # tuples as JSON arrays, like /object_info


NODE_INFO = {**CORE_NODES, **{cls.GET_SCHEMA().node_id: _as_lists(cls.GET_SCHEMA().get_v1_info())
                              for cls in pack.nodes.NODES}}


def load(folder: Path, name: str) -> dict:
    return json.loads((folder / f"{name}.json").read_text())


def declared_inputs(info: dict) -> dict[str, tuple[str, dict, bool]]:
    """{input name: (type, options, required)}, Autogrow slots expanded to their `group.name` inputs."""
    found = {}
    for section in ("required", "optional"):
        for name in info["input_order"].get(section, []):
            kind, *rest = info["input"][section][name]
            options = rest[0] if rest else {}
            if kind == "COMFY_AUTOGROW_V3":
                template = options["template"]
                slot_type = next(iter(next(v for v in template["input"].values() if v).values()))[0]
                for slot in template["names"]:
                    found[f"{name}.{slot}"] = (slot_type, {}, False)
            elif isinstance(kind, list):
                found[name] = ("COMBO", {"options": kind, **options}, section == "required")
            else:
                found[name] = (kind, options, section == "required")
    return found


def test_one_workflow_per_task_with_twins_and_thumbnails():
    assert set(NAMES) == EXPECTED
    assert sorted(p.stem for p in UI_DIR.glob("*.json")) == NAMES
    for name in NAMES:
        assert (UI_DIR / f"{name}.jpg").stat().st_size > 1000, f"{name}: thumbnail missing"


@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_uses_existing_nodes_with_valid_inputs(name):
    graph = load(API_DIR, name)
    for node_id, node in graph.items():
        info = NODE_INFO.get(node["class_type"])
        assert info is not None, f"{name} node {node_id}: unknown node {node['class_type']}"
        declared = declared_inputs(info)
        for input_name, (kind, options, required) in declared.items():
            assert not required or input_name in node["inputs"], f"{name} node {node_id}: {input_name} missing"
        for input_name, value in node["inputs"].items():
            assert input_name in declared, f"{name} node {node_id}: no input {input_name}"
            kind, options, _ = declared[input_name]
            where = f"{name} node {node_id} {input_name}"
            if isinstance(value, list):
                source = graph[value[0]]
                produced = NODE_INFO[source["class_type"]]["output"][value[1]]
                assert produced == kind, f"{where}: {produced} linked into {kind}"
            elif kind == "COMBO" and options.get("image_upload"):
                assert value.startswith("instruct_imagen/") and (INPUTS / value.split("/", 1)[1]).is_file(), where
            elif kind == "COMBO":
                assert value in options["options"] or (input_name, value) in USER_FILES, f"{where}: {value!r} not offered"
            else:
                assert kind in WIDGETS, f"{where}: a constant for a {kind} socket"
                python_type = {"INT": int, "FLOAT": (int, float), "STRING": str, "BOOLEAN": bool}[kind]
                assert isinstance(value, python_type) and not (kind != "BOOLEAN" and isinstance(value, bool)), where
                assert options.get("min", value) <= value <= options.get("max", value) if kind != "STRING" else True


@pytest.mark.parametrize("name", NAMES)
def test_builders_have_no_dangling_references(name):
    builder = pack.nodes.instruction_nodes.InstructionBuilder
    for node in load(API_DIR, name).values():
        if node["class_type"] == "InstructionBuilder":
            inputs = node["inputs"]
            slots = {k: None for k in inputs if k.startswith("contexts.")}
            assert builder.validate_inputs(inputs["instruction"], inputs["negative"], **slots) is True


def ui_to_api(ui: dict) -> dict:
    """What the editor queues for a UI graph: links by input name, widget values by widget order."""
    links = {link[0]: link for link in ui["links"]}
    graph = {}
    for node in ui["nodes"]:
        info = NODE_INFO[node["type"]]
        inputs = {}
        for entry in node["inputs"]:
            if entry.get("link") is not None:
                source = links[entry["link"]]
                assert source[3] == node["id"] and node["inputs"][source[4]] is entry
                inputs[entry["name"]] = [str(source[1]), source[2]]
        values = iter(node["widgets_values"])
        for input_name, (kind, options, _) in declared_inputs(info).items():
            if kind not in WIDGETS:
                continue
            value = next(values)
            if options.get("control_after_generate"):
                assert next(values) == "fixed"
            if input_name not in inputs:
                inputs[input_name] = value
        if any(o.get("image_upload") for _, o, _ in declared_inputs(info).values()):
            assert next(values) == "image"
        assert next(values, None) is None, f"node {node['id']}: extra widget values"
        graph[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return graph


@pytest.mark.parametrize("name", NAMES)
def test_ui_and_api_twins_agree(name):
    api = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in load(API_DIR, name).items()}
    ui = load(UI_DIR, name)
    assert ui_to_api(ui) == api
    assert ui["last_node_id"] == max(n["id"] for n in ui["nodes"])
    for link in ui["links"]:
        source = next(n for n in ui["nodes"] if n["id"] == link[1])
        assert link[0] in source["outputs"][link[2]]["links"]
