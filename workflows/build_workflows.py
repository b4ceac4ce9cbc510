"""Write the example workflows, each once as an API-format graph and once as a UI-format (editor) graph.

    python workflows/build_workflows.py --server http://127.0.0.1:8188

Every workflow is declared once below. Widget order, socket types and output names come from a running
ComfyUI's /object_info (with this pack loaded), so the UI files match what the editor itself would save.
API twins go to workflows/api/; UI files go to example_workflows/, the folder ComfyUI's template browser
serves for a custom node pack (it takes the first of example_workflows/, example/, examples/, workflow/,
workflows/ that exists, and this repository has an examples/ folder of its own).
"""

from __future__ import annotations

import argparse
import json
import urllib.request
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
API_DIR = HERE / "api"
UI_DIR = HERE.parent / "example_workflows"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
TALL_NODES = {"LoadImage": 330, "LoadImageMask": 330, "SaveImage": 300, "InstructionBuilder": 260}  # previews
INPUTS = "instruct_imagen/"  # where the pack copies workflows/inputs/ inside ComfyUI's input directory

SAMPLING = dict(seed=1, steps=10, sampler="dpmpp_2m", schedule="karras_capped", cfg_text=3.0, cfg_context=3.0,
                guidance="dual", width=0, height=0, batch_size=1, denoise=1.0, upscale=True)
# The user's own SD1.5 checkpoint (models/checkpoints), sampled by ComfyUI's KSampler.
USER_CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
USER_SIZE = 512
KSAMPLING = dict(seed=1, steps=25, cfg=6.0, sampler_name="dpmpp_2m", scheduler="karras", denoise=1.0)
TRAINED_ADAPTER = "my_sd15_adapter"


class Node:
    def __init__(self, graph: "Workflow", node_id: int, class_type: str, inputs: dict, title: str | None):
        self.graph, self.id, self.class_type, self.inputs, self.title = graph, node_id, class_type, inputs, title

    def __getitem__(self, slot: int) -> tuple["Node", int]:
        return (self, slot)


class Workflow:
    def __init__(self, name: str, description: str):
        self.name, self.description, self.nodes = name, description, []

    def node(self, class_type: str, title: str | None = None, **inputs) -> Node:
        node = Node(self, len(self.nodes) + 1, class_type, inputs, title)
        self.nodes.append(node)
        return node

    # -- the pack's usual chain ------------------------------------------------------------------------
    def loader(self) -> Node:
        return self.node("InstructImagenLoader", model="default", adapter="none", dtype="auto")

    def context(self, image_file: str, modality: str, text: str, mask=None) -> Node:
        image = self.node("LoadImage", image=INPUTS + image_file)
        extra = {} if mask is None else {"mask": mask}
        return self.node("ContextImage", image=image[0], modality=modality, text=text, weight=1.0, **extra)

    def generate(self, model: Node, instruction: str, contexts=(), negative: str = "") -> Node:
        slots = {f"contexts.ref_{n}": ctx[0] for n, ctx in enumerate(contexts, start=1)}
        builder = self.node("InstructionBuilder", instruction=instruction, negative=negative, **slots)
        encode = self.node("MultiModalEncode", model=model[0], instruction=builder[0], context_width=0,
                           context_height=0, resize_policy="crop")
        sampler = self.node("InstructSampler", model=model[0], conditioning=encode[0], **SAMPLING)
        self.node("SaveImage", images=sampler[1], filename_prefix=f"instruct_imagen/{self.name}")
        return builder

    # -- the patch path: the user's checkpoint, Instruct-Imagen on its MODEL, ComfyUI's KSampler -------------
    def checkpoint(self) -> Node:
        return self.node("CheckpointLoaderSimple", ckpt_name=USER_CHECKPOINT)

    def ksample(self, checkpoint: Node, instruction: str, contexts=(), negative: str = "",
                adapter: str = "none") -> Node:
        slots = {f"contexts.ref_{n}": ctx[0] for n, ctx in enumerate(contexts, start=1)}
        builder = self.node("InstructionBuilder", instruction=instruction, negative=negative, **slots)
        patched = self.node("ApplyInstructImagen", model=checkpoint[0], clip=checkpoint[1], vae=checkpoint[2],
                            adapter=adapter, instruction=builder[0], strength=1.0, context_width=USER_SIZE,
                            context_height=USER_SIZE, resize_policy="crop")
        empty = self.node("EmptyLatentImage", width=USER_SIZE, height=USER_SIZE, batch_size=1)
        sampler = self.node("KSampler", model=patched[0], positive=patched[1], negative=patched[2],
                            latent_image=empty[0], **KSAMPLING)
        decode = self.node("VAEDecode", samples=sampler[0], vae=checkpoint[2])
        self.node("SaveImage", images=decode[0], filename_prefix=f"instruct_imagen/{self.name}")
        return builder

    # -- formats ---------------------------------------------------------------------------------------
    def api(self) -> dict:
        def value(v):
            return [str(v[0].id), v[1]] if isinstance(v, tuple) else v
        return {str(n.id): {"inputs": {k: value(v) for k, v in n.inputs.items()}, "class_type": n.class_type,
                            "_meta": {"title": n.title or n.class_type}} for n in self.nodes}

    def ui(self, info: dict) -> dict:
        links, outputs = [], {}
        for node in self.nodes:
            for name, v in node.inputs.items():
                if isinstance(v, tuple):
                    links.append([len(links) + 1, v[0].id, v[1], node.id, name, info[v[0].class_type]["output"][v[1]]])
                    outputs.setdefault((v[0].id, v[1]), []).append(len(links))
        depth = self._depths()
        columns: dict[int, int] = {}
        nodes = []
        for order, node in enumerate(sorted(self.nodes, key=lambda n: (depth[n.id], n.id))):
            spec = info[node.class_type]
            row = columns.get(depth[node.id], 0)
            height = TALL_NODES.get(node.class_type, 80 + 26 * len(self._sockets(node, spec)[0]))
            columns[depth[node.id]] = row + height + 60
            inputs, widgets = self._sockets(node, spec)
            node_links = {link[4]: link[0] for link in links if link[3] == node.id}
            nodes.append({
                "id": node.id, "type": node.class_type, "pos": [40 + 360 * depth[node.id], 40 + row],
                "size": [320, height], "flags": {}, "order": order, "mode": 0,
                "inputs": [dict(entry, link=node_links.get(entry["name"])) for entry in inputs],
                "outputs": [{"name": name, "type": kind, "links": outputs.get((node.id, slot), [])}
                            for slot, (name, kind) in enumerate(zip(spec["output_name"], spec["output"]))],
                "properties": {"Node name for S&R": node.class_type},
                "widgets_values": widgets,
                **({"title": node.title} if node.title else {}),
            })
        for link in links:  # links name their target slot by index
            target = next(n for n in nodes if n["id"] == link[3])
            link[4] = [entry["name"] for entry in target["inputs"]].index(link[4])
        return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"instruct-imagen/{self.name}")), "revision": 0,
                "last_node_id": len(self.nodes), "last_link_id": len(links), "nodes": nodes, "links": links,
                "groups": [], "config": {}, "extra": {"ds": {"scale": 1.0, "offset": [0, 0]},
                                                      "info": {"description": self.description}},
                "version": 0.4}

    def _depths(self) -> dict[int, int]:
        depth: dict[int, int] = {}
        for node in self.nodes:  # declared in dependency order
            parents = [v[0].id for v in node.inputs.values() if isinstance(v, tuple)]
            depth[node.id] = 1 + max((depth[p] for p in parents), default=-1)
        return depth

    def _sockets(self, node: Node, spec: dict) -> tuple[list[dict], list]:
        """The node's input entries and widget values, in the order the editor creates them."""
        entries, widgets = [], []
        for section in ("required", "optional"):
            for name in spec["input_order"].get(section, []):
                kind, options = _input_type(spec["input"][section][name])
                if kind == "COMFY_AUTOGROW_V3":
                    entries += self._autogrow(node, name, options)
                    continue
                if kind in WIDGET_TYPES:
                    entries.append({"name": name, "type": kind, "widget": {"name": name}})
                    widgets.append(node.inputs.get(name, options.get("default")))
                    if options.get("control_after_generate"):
                        widgets.append("fixed")
                    if options.get("image_upload"):
                        entries.pop()  # the file combo has no socket; its upload button adds a value
                else:
                    entries.append({"name": name, "type": kind})
        if any(_input_type(spec["input"][s][n])[1].get("image_upload")
               for s in ("required", "optional") for n in spec["input_order"].get(s, [])):
            widgets.append("image")
        return entries, widgets

    def _autogrow(self, node: Node, name: str, options: dict) -> list[dict]:
        template = options["template"]
        kind = next(iter(next(v for v in template["input"].values() if v).values()))[0]
        used = [n for n in template["names"] if f"{name}.{n}" in node.inputs]
        shown = template["names"][:max(template.get("min", 1), len(used) + 1)]
        return [{"name": f"{name}.{n}", "type": kind, "label": n, "shape": 7} for n in shown]


def _input_type(declaration: list) -> tuple[str, dict]:
    kind = declaration[0]
    options = declaration[1] if len(declaration) > 1 else {}
    if isinstance(kind, list):
        return "COMBO", {"options": kind, **options}
    return kind, options


def workflows() -> list[Workflow]:
    made = []

    def new(name: str, description: str) -> Workflow:
        made.append(Workflow(name, description))
        return made[-1]

    w = new("text_to_image", "Text only: an instruction without contexts.")
    w.generate(w.loader(), "A lighthouse on a rocky coast at sunset, oil painting")

    w = new("subject", "Subject-driven generation: put the toy of [ref#1] in a new scene.")
    w.generate(w.loader(), "Generate an image of [ref#1] sitting on a sunny beach",
               [w.context("subject_toy.png", "subject", "[ref#1] a red plush toy")])

    w = new("style", "Styled generation: the style of [ref#1] applied to a new subject.")
    w.generate(w.loader(), "A lighthouse on a rocky coast in the style of [ref#1]",
               [w.context("style_stripes.png", "style", "[ref#1] warm diagonal brush strokes")])

    w = new("style_transfer", "Style transfer: the edges of a photo (Canny) painted in the style of [ref#2].")
    model = w.loader()
    content = w.node("LoadImage", image=INPUTS + "content_house.png")
    edges = w.node("Canny", image=content[0], low_threshold=0.2, high_threshold=0.5)
    edge = w.node("ContextImage", image=edges[0], modality="edge", text="[ref#1] an edge map of a house", weight=1.0)
    style = w.context("style_dots.png", "style", "[ref#2] cool pointillist dots")
    w.generate(model, "Render the content of [ref#1] in the style of [ref#2]: a house under the sun", [edge, style])

    w = new("edge", "Edge-to-image: follow the outlines in [ref#1].")
    w.generate(w.loader(), "Generate an image following the edges of [ref#1]: a cosy cottage with a red roof",
               [w.context("edge_house.png", "edge", "[ref#1] an edge map")])

    w = new("depth", "Depth-to-image: the scene layout of the depth map [ref#1].")
    w.generate(w.loader(), "Generate an image with the depth layout of [ref#1]: a ball on a wooden floor",
               [w.context("depth_ball.png", "depth", "[ref#1] a depth map")])

    w = new("mask", "Mask-to-image: the main object takes the shape of [ref#1].")
    w.generate(w.loader(), "Generate an image whose main object fills the shape of [ref#1]: a green apple",
               [w.context("mask_apple.png", "mask", "[ref#1] a shape mask")])

    w = new("sketch", "Sketch-to-image: finish the drawing [ref#1].")
    w.generate(w.loader(), "Turn the sketch [ref#1] into a finished picture: a ginger cat",
               [w.context("sketch_cat.png", "sketch", "[ref#1] a sketch")])

    w = new("inpainting", "Inpainting: the hole (transparent in the PNG) is painted grey and filled in.")
    model = w.loader()
    photo = w.node("LoadImage", image=INPUTS + "inpaint_garden.png")
    grey = w.node("EmptyImage", width=64, height=64, batch_size=1, color=0x808080)
    holed = w.node("ImageCompositeMasked", destination=photo[0], source=grey[0], x=0, y=0, resize_source=False,
                   mask=photo[1])
    masked = w.node("ContextImage", image=holed[0], modality="image", text="[ref#1] a masked image", weight=1.0)
    w.generate(model, "Fill in the grey region of [ref#1]: a garden with a house and a cat", [masked])

    w = new("subject_style", "Subject plus style: the toy of [ref#1] painted like [ref#2]; the instruction is also "
                             "saved as JSON.")
    builder = w.generate(w.loader(), "Generate an image of [ref#1] in the style of [ref#2]",
                         [w.context("subject_toy.png", "subject", "[ref#1] a red plush toy"),
                          w.context("style_stripes.png", "style", "[ref#2] warm diagonal brush strokes")])
    w.node("InstructionToJSON", instruction=builder[0], filename_prefix="instruct_imagen/subject_style")

    w = new("multi_subject", "Two subjects, each confined to one half of the picture by its mask.")
    model = w.loader()
    left = w.node("LoadImageMask", image=INPUTS + "mask_left.png", channel="red")
    right = w.node("LoadImageMask", image=INPUTS + "mask_right.png", channel="red")
    w.generate(model, "Generate an image of [ref#1] and [ref#2] on a wooden table",
               [w.context("subject_toy.png", "subject", "[ref#1] a red plush toy", mask=left[0]),
                w.context("subject_cube.png", "subject", "[ref#2] a blue toy cube", mask=right[0])])

    w = new("control_style", "Control plus style: the depth layout of [ref#1] in the style of [ref#2].")
    w.generate(w.loader(), "Generate an image with the depth layout of [ref#1] in the style of [ref#2]: a ball in a room",
               [w.context("depth_ball.png", "depth", "[ref#1] a depth map"),
                w.context("style_stripes.png", "style", "[ref#2] warm diagonal brush strokes")])

    w = new("training", "Fine-tune the context layers for 2 steps on input/instruct_imagen/train_set, then sample "
                        "with the new adapter; the loss curve is saved too.")
    train = w.node("FineTuneStage", base_model="default", adapter="none", stage=2,
                   dataset=INPUTS + "train_set", steps=2, learning_rate=1e-4, batch_size=1, resolution=0, seed=0,
                   adapter_name="example_adapter", resume=False)
    w.node("SaveImage", images=train[2], filename_prefix="instruct_imagen/training_loss")
    w.generate(train, "Generate an image of [ref#1] on a white background",
               [w.context("subject_toy.png", "subject", "[ref#1] a red plush toy")])

    w = new("train_adapter", "Train context layers for your SD1.5 checkpoint on input/instruct_imagen/train_set (2 "
                             "steps here: raise steps for real training) and save them as models/instruct_imagen/"
                             f"{TRAINED_ADAPTER}.safetensors, which ksampler_trained_adapter uses.")
    train = w.node("FineTuneStage", base_model=USER_CHECKPOINT, adapter="none", stage=2,
                   dataset=INPUTS + "train_set", steps=2, learning_rate=1e-4, batch_size=1, resolution=64, seed=0,
                   adapter_name=TRAINED_ADAPTER + "_run", resume=False)
    w.node("AdapterSaver", model=train[0], adapter_name=TRAINED_ADAPTER, overwrite=True)
    w.node("SaveImage", images=train[2], filename_prefix="instruct_imagen/train_adapter_loss")

    w = new("ksampler_trained_adapter", "Your SD1.5 checkpoint with the context layers train_adapter saved, "
                                        "sampled by KSampler: the toy of [ref#1] on a beach.")
    w.ksample(w.checkpoint(), "Generate an image of [ref#1] sitting on a sunny beach",
              [w.context("subject_toy.png", "subject", "[ref#1] a red plush toy")], negative="blurry",
              adapter=TRAINED_ADAPTER + ".safetensors")
    ksampler_workflows(new)
    return made


def ksampler_workflows(new) -> None:
    """The tasks on the user's own SD1.5 checkpoint through ApplyInstructImagen and KSampler. With adapter
    'none' the context layers are untrained and the picture is the checkpoint's own: pick trained ones."""

    def task(name: str, description: str, instruction: str, *contexts: tuple[str, str, str]) -> None:
        w = new(f"ksampler_{name}", description + " Your SD1.5 checkpoint, sampled by KSampler.")
        w.ksample(w.checkpoint(), instruction, [w.context(*context) for context in contexts], negative="blurry")

    task("subject", "Subject-driven generation: the toy of [ref#1] in a new scene.",
         "Generate an image of [ref#1] sitting on a sunny beach",
         ("subject_toy.png", "subject", "[ref#1] a red plush toy"))
    task("style", "Styled generation: the style of [ref#1] on a new subject.",
         "A lighthouse on a rocky coast in the style of [ref#1]",
         ("style_stripes.png", "style", "[ref#1] warm diagonal brush strokes"))
    task("edge", "Edge-to-image: follow the outlines in [ref#1].",
         "Generate an image following the edges of [ref#1]: a cosy cottage with a red roof",
         ("edge_house.png", "edge", "[ref#1] an edge map"))
    task("depth", "Depth-to-image: the scene layout of the depth map [ref#1].",
         "Generate an image with the depth layout of [ref#1]: a ball on a wooden floor",
         ("depth_ball.png", "depth", "[ref#1] a depth map"))
    task("mask", "Mask-to-image: the main object takes the shape of [ref#1].",
         "Generate an image whose main object fills the shape of [ref#1]: a green apple",
         ("mask_apple.png", "mask", "[ref#1] a shape mask"))
    task("subject_style_edge", "Three contexts: the toy of [ref#1] in the style of [ref#2], in the layout of the "
                               "edges [ref#3].",
         "Generate an image of [ref#1] in the style of [ref#2], following the edges of [ref#3]",
         ("subject_toy.png", "subject", "[ref#1] a red plush toy"),
         ("style_stripes.png", "style", "[ref#2] warm diagonal brush strokes"),
         ("edge_house.png", "edge", "[ref#3] an edge map of a house"))


def object_info(server: str) -> dict:
    with urllib.request.urlopen(server.rstrip("/") + "/object_info", timeout=60) as response:
        return json.load(response)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="http://127.0.0.1:8188", help="a ComfyUI with this pack loaded")
    args = parser.parse_args(argv)
    info = object_info(args.server)
    API_DIR.mkdir(parents=True, exist_ok=True)
    UI_DIR.mkdir(parents=True, exist_ok=True)
    for workflow in workflows():
        (API_DIR / f"{workflow.name}.json").write_text(json.dumps(workflow.api(), indent=2) + "\n")
        (UI_DIR / f"{workflow.name}.json").write_text(json.dumps(workflow.ui(info), indent=2) + "\n")
        print(f"wrote {workflow.name}")


if __name__ == "__main__":
    main()
