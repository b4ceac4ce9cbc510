"""Draw the pack's registry icon (icon.png, 256×256) from four example-workflow thumbnails, which are real
outputs of the bundled model rendered through ComfyUI. Rerun after the thumbnails are rendered again."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
THUMBNAILS = ("inpainting", "multi_subject", "style_transfer", "subject")  # left to right, top to bottom
TILE = 128


def main() -> None:
    icon = Image.new("RGB", (2 * TILE, 2 * TILE))
    for index, name in enumerate(THUMBNAILS):
        tile = Image.open(ROOT / "example_workflows" / f"{name}.jpg").convert("RGB")
        # The thumbnails are small images blown up; nearest keeps their pixels sharp.
        icon.paste(tile.resize((TILE, TILE), Image.NEAREST), ((index % 2) * TILE, (index // 2) * TILE))
    icon.save(ROOT / "icon.png", optimize=True)


if __name__ == "__main__":
    main()
