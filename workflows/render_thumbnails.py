"""Run every API workflow on a ComfyUI server and keep its picture as the template thumbnail.

    python workflows/render_thumbnails.py --server http://127.0.0.1:8188

Writes example_workflows/<name>.jpg (what ComfyUI's template browser shows next to <name>.json) from the
image the workflow's last SaveImage wrote, scaled up without smoothing so small outputs stay legible.
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

THUMBNAIL = 256


def render(client: ComfyClient, path: Path) -> Image.Image:
    graph = load_workflow(path)
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
    args = parser.parse_args(argv)
    client = ComfyClient(args.server)
    out_dir = HERE.parent / "example_workflows"
    for path in sorted((HERE / "api").glob("*.json")):
        started = time.monotonic()
        image = render(client, path)
        thumbnail = image.resize((THUMBNAIL, THUMBNAIL * image.height // image.width), Image.Resampling.NEAREST)
        thumbnail.save(out_dir / f"{path.stem}.jpg", quality=70)
        print(f"{path.stem}: {image.width}x{image.height} in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
