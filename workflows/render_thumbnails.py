"""Run every API workflow on a ComfyUI server and keep its picture as the template thumbnail.

    python workflows/render_thumbnails.py --server http://127.0.0.1:8188 [--checkpoint NAME] [WORKFLOW ...]

Writes example_workflows/<name>.jpg (what ComfyUI's template browser shows next to <name>.json) from the
image the workflow's last SaveImage wrote, scaled up without smoothing so small outputs stay legible.
Workflows for the user's own checkpoint run on --checkpoint (a file in the server's models/checkpoints);
without it their thumbnail shows the images they start from, side by side, since no picture of a
checkpoint that is not there can be made.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from instruct_core.client import ClientError, ComfyClient, follow, load_workflow  # noqa: E402
from build_workflows import USER_CHECKPOINT  # noqa: E402

THUMBNAIL = 256
INPUTS = HERE / "inputs"


def uses_user_checkpoint(graph: dict) -> bool:
    return any(USER_CHECKPOINT in (node["inputs"].get("ckpt_name"), node["inputs"].get("base_model"))
               for node in graph.values())


def on_checkpoint(graph: dict, checkpoint: str) -> dict:
    for node in graph.values():
        for key in ("ckpt_name", "base_model"):
            if node["inputs"].get(key) == USER_CHECKPOINT:
                node["inputs"][key] = checkpoint
    return graph


def starting_images(graph: dict) -> Image.Image:
    """The workflow's input images (its LoadImage files, or its training set's), side by side."""
    files = [INPUTS / node["inputs"]["image"].split("/", 1)[1] for node in graph.values()
             if node["class_type"] == "LoadImage"]
    for node in graph.values():
        if node["class_type"] == "FineTuneStage":
            files += sorted((INPUTS / node["inputs"]["dataset"].split("/", 1)[1]).glob("*.png"))[:4]
    tiles = [Image.open(f).convert("RGB").resize((THUMBNAIL, THUMBNAIL), Image.Resampling.LANCZOS) for f in files]
    sheet = Image.new("RGB", (THUMBNAIL * len(tiles), THUMBNAIL), "white")
    for index, tile in enumerate(tiles):
        sheet.paste(tile, (index * THUMBNAIL, 0))
    return sheet


def render(client: ComfyClient, path: Path, checkpoint: str | None = None) -> Image.Image:
    graph = load_workflow(path)
    if uses_user_checkpoint(graph):
        if checkpoint is None:
            return starting_images(graph)
        graph = on_checkpoint(graph, checkpoint)
    events = client.open_events(600)
    try:
        prompt_id = client.queue(graph)
        entry = follow(client, events, prompt_id, graph, 600, say=lambda line: None)
    finally:
        events.close()
    saves = sorted((int(node), outputs) for node, outputs in entry["outputs"].items() if outputs.get("images"))
    if not saves:
        raise ClientError(f"{path.name}: no image output")
    data = client.download(saves[-1][1]["images"][0])
    return Image.open(io.BytesIO(data)).convert("RGB")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="http://127.0.0.1:8188")
    parser.add_argument("--checkpoint", default=None,
                        help=f"a checkpoint on the server to run the workflows naming {USER_CHECKPOINT} on")
    parser.add_argument("workflows", nargs="*", help="names of the workflows to render (default: all)")
    args = parser.parse_args(argv)
    client = ComfyClient(args.server)
    out_dir = HERE.parent / "example_workflows"
    for path in sorted((HERE / "api").glob("*.json")):
        if args.workflows and path.stem not in args.workflows:
            continue
        started = time.monotonic()
        image = render(client, path, args.checkpoint)
        thumbnail = image.resize((THUMBNAIL * image.width // image.height, THUMBNAIL), Image.Resampling.NEAREST)
        thumbnail.save(out_dir / f"{path.stem}.jpg", quality=70)
        print(f"{path.stem}: {image.width}x{image.height} in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
