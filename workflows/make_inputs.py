"""Draw the example workflows' input images: small procedural PNGs, the same bytes on every run.

    python workflows/make_inputs.py        # writes workflows/inputs/

The pack copies workflows/inputs/ into ComfyUI's input/instruct_imagen/ when it loads, which is where the
example workflows' LoadImage nodes look.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
OUT = Path(__file__).resolve().parent / "inputs"


def canvas(color=(255, 255, 255), mode="RGB") -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new(mode, (SIZE, SIZE), color)
    return image, ImageDraw.Draw(image)


def toy(body=(220, 40, 40)) -> Image.Image:
    """A round plush toy with ears and eyes on a white page."""
    image, draw = canvas()
    draw.ellipse((14, 10, 26, 22), fill=body)
    draw.ellipse((38, 10, 50, 22), fill=body)
    draw.ellipse((12, 16, 52, 56), fill=body)
    for x in (24, 38):
        draw.ellipse((x - 3, 28, x + 3, 34), fill=(20, 20, 20))
    draw.arc((24, 34, 40, 46), 20, 160, fill=(20, 20, 20), width=2)
    return image


def cube() -> Image.Image:
    """A blue toy cube drawn in three shades."""
    image, draw = canvas()
    draw.polygon([(16, 24), (36, 16), (52, 24), (32, 32)], fill=(120, 160, 240))
    draw.polygon([(16, 24), (32, 32), (32, 54), (16, 46)], fill=(40, 80, 200))
    draw.polygon([(32, 32), (52, 24), (52, 46), (32, 54)], fill=(20, 50, 150))
    return image


def stripes() -> Image.Image:
    """Diagonal warm brush strokes: a 'style' reference."""
    rng = np.random.default_rng(1)
    image, draw = canvas((250, 235, 200))
    palette = [(230, 120, 30), (200, 50, 60), (250, 200, 60), (120, 40, 90), (40, 110, 160)]
    for k in range(40):
        x, y = rng.integers(-16, SIZE, size=2)
        draw.line((x, y + 20, x + 20, y), fill=palette[k % len(palette)], width=int(rng.integers(2, 6)))
    return image


def dots() -> Image.Image:
    """Pointillist dots in cool colours: a second 'style' reference."""
    rng = np.random.default_rng(2)
    image, draw = canvas((20, 30, 60))
    for _ in range(160):
        x, y = rng.integers(0, SIZE, size=2)
        r = int(rng.integers(1, 4))
        color = tuple(int(c) for c in rng.integers((60, 120, 160), (160, 230, 255)))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=color)
    return image


def house(lines_only: bool = False) -> Image.Image:
    """A house under a sun, in colour, or as a white edge map on black."""
    background, line, width = ((0, 0, 0), (255, 255, 255), 1) if lines_only else ((150, 200, 250), None, 0)
    image, draw = canvas(background)
    parts = [("rect", (14, 30, 50, 56), (200, 120, 80)), ("poly", [(10, 31), (32, 12), (54, 31)], (150, 40, 40)),
             ("rect", (27, 42, 37, 56), (90, 60, 30)), ("rect", (17, 36, 24, 43), (250, 240, 150)),
             ("ellipse", (46, 4, 58, 16), (255, 210, 40))]
    for kind, box, fill in parts:
        outline, fill = (line, None) if lines_only else (None, fill)
        getattr(draw, {"rect": "rectangle", "poly": "polygon", "ellipse": "ellipse"}[kind])(
            box, fill=fill, outline=outline, **({"width": width} if kind != "poly" and lines_only else {}))
    if not lines_only:
        draw.rectangle((0, 56, SIZE, SIZE), fill=(80, 160, 60))
    return image


def depth() -> Image.Image:
    """A depth map: a floor receding upwards and a near ball (white is near)."""
    y = np.linspace(0.15, 0.75, SIZE)[:, None] * np.ones((1, SIZE))
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    ball = np.clip(1 - ((xx - 40) ** 2 + (yy - 40) ** 2) / 14**2, 0, 1)
    values = np.maximum(y, 0.55 + 0.45 * np.sqrt(ball) * (ball > 0))
    return Image.fromarray((values * 255).astype(np.uint8), "L").convert("RGB")


def shape_mask() -> Image.Image:
    """A shape mask: an apple silhouette, white on black."""
    image, draw = canvas(0, "L")
    draw.ellipse((14, 18, 36, 52), fill=255)
    draw.ellipse((28, 18, 50, 52), fill=255)
    draw.line((32, 20, 36, 8), fill=255, width=3)
    return image


def sketch() -> Image.Image:
    """A pencil sketch of a cat's head: black strokes on white."""
    image, draw = canvas()
    draw.ellipse((14, 18, 50, 54), outline=(0, 0, 0), width=2)
    draw.line([(16, 26), (18, 8), (28, 19)], fill=(0, 0, 0), width=2)
    draw.line([(36, 19), (46, 8), (48, 26)], fill=(0, 0, 0), width=2)
    for x in (25, 39):
        draw.ellipse((x - 2, 32, x + 2, 36), fill=(0, 0, 0))
    for dy in (-2, 2):
        draw.line((10, 42 + dy, 26, 42), fill=(0, 0, 0))
        draw.line((38, 42, 54, 42 + dy), fill=(0, 0, 0))
    return image


def scene_with_hole() -> Image.Image:
    """A garden scene whose centre is transparent: LoadImage turns the hole into its MASK output."""
    image = house().convert("RGBA")
    draw = ImageDraw.Draw(image)
    draw.rectangle((20, 22, 44, 46), fill=(0, 0, 0, 0))
    return image


def half_mask(left: bool) -> Image.Image:
    image, draw = canvas(0, "L")
    draw.rectangle((0, 0, SIZE // 2 - 1, SIZE) if left else (SIZE // 2, 0, SIZE, SIZE), fill=255)
    return image


def training_set() -> dict[str, tuple[Image.Image, str]]:
    """Eight captioned pictures of simple objects, for the training workflow."""
    colors = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 210), "yellow": (240, 200, 30)}
    items = {}
    for index, (name, color) in enumerate(colors.items()):
        items[f"{index:03d}_toy"] = (toy(color), f"a {name} plush toy on a white background")
        image, draw = canvas((235, 235, 235))
        angle = index * math.pi / 4
        points = [(32 + 22 * math.cos(angle + k * 2 * math.pi / 3), 32 + 22 * math.sin(angle + k * 2 * math.pi / 3))
                  for k in range(3)]
        draw.polygon(points, fill=color)
        items[f"{index:03d}_triangle"] = (image, f"a {name} triangle on a grey background")
    return items


IMAGES = {
    "subject_toy.png": toy,
    "subject_cube.png": cube,
    "style_stripes.png": stripes,
    "style_dots.png": dots,
    "content_house.png": house,
    "edge_house.png": lambda: house(lines_only=True),
    "depth_ball.png": depth,
    "mask_apple.png": shape_mask,
    "sketch_cat.png": sketch,
    "inpaint_garden.png": scene_with_hole,
    "mask_left.png": lambda: half_mask(True),
    "mask_right.png": lambda: half_mask(False),
}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, draw in IMAGES.items():
        draw().save(OUT / name, optimize=True)
    train = OUT / "train_set"
    train.mkdir(exist_ok=True)
    for stem, (image, caption) in training_set().items():
        image.save(train / f"{stem}.png", optimize=True)
        (train / f"{stem}.txt").write_text(caption + "\n")
    print(f"wrote {len(IMAGES)} images and {len(training_set())} training pairs to {OUT}")


if __name__ == "__main__":
    main()
