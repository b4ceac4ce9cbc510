"""Control images made from a picture: edge maps, sketches, shape masks, depth maps, holes.

These are the context images of the control-to-image and inpainting tasks (`tasks.py`). Each is a
pure function of its inputs (and of the numpy Generator it is given), so a training example can
be rebuilt exactly from its seed. Everything runs offline with OpenCV: `hed_like_edges` stands in
for a learned HED detector and `shape_mask` for a segmentation model when none is supplied; depth
is never estimated, only read from a map the dataset supplies.

Conventions: inputs are PIL images of any mode (converted with `instruction.to_rgb`); outputs are
PIL "L" images of the input's size. Edge maps and masks are white (255) on black; a sketch is
black strokes on white, like pencil on paper.
"""

from __future__ import annotations

import os
from typing import Any

import cv2
import numpy as np
from PIL import Image

from .instruction import to_mask, to_rgb

__all__ = [
    "apply_mask",
    "canny_edges",
    "depth_map",
    "hed_like_edges",
    "inpainting_mask",
    "load_control_image",
    "shape_mask",
    "sketch",
]

# Scale-normalised gradient of a unit step under a 3x3 Sobel (8 / sqrt(2 pi)); edges weaker than
# a tenth of that are not stretched to full white, so a nearly flat image stays nearly black.
_UNIT_STEP_RESPONSE = 8.0 / np.sqrt(2.0 * np.pi)
_WEAKEST_FULL_EDGE = 0.1 * _UNIT_STEP_RESPONSE


def canny_edges(image: Image.Image, low: float = 100, high: float = 200) -> Image.Image:
    """Canny edges (OpenCV, colour gradients) as a binary "L" map: 255 on edges, 0 elsewhere."""
    rgb = np.asarray(to_rgb(image))
    # Canny on the three channels takes the strongest channel gradient, so a red shape on a
    # green background of equal brightness still has edges.
    return Image.fromarray(cv2.Canny(np.ascontiguousarray(rgb), low, high))


def hed_like_edges(image: Image.Image, sigmas: tuple[float, ...] = (1.0, 2.0, 4.0)) -> Image.Image:
    """Soft edges: multi-scale gradient magnitude, blurred and scaled to 0..255.

    An offline approximation of HED's soft boundaries. Each scale's magnitude is multiplied by its
    sigma (scale normalisation) so coarse and fine edges count alike; `sigmas` are for a 512-pixel
    short side and grow with the image.
    """
    rgb = np.asarray(to_rgb(image), dtype=np.float32) / 255.0
    scale = max(1.0, min(rgb.shape[:2]) / 512.0)
    total = np.zeros(rgb.shape[:2], dtype=np.float32)
    for sigma in sigmas:
        s = sigma * scale
        blurred = cv2.GaussianBlur(rgb, (0, 0), s)
        gx = cv2.Sobel(blurred, cv2.CV_32F, 1, 0, ksize=3)
        gy = cv2.Sobel(blurred, cv2.CV_32F, 0, 1, ksize=3)
        total += np.sqrt(gx * gx + gy * gy).max(axis=2) * s
    soft = cv2.GaussianBlur(total / len(sigmas), (0, 0), scale)
    soft = soft / max(float(soft.max()), _WEAKEST_FULL_EDGE)
    return Image.fromarray(np.round(np.clip(soft, 0.0, 1.0) * 255.0).astype(np.uint8))


def sketch(image: Image.Image, min_gradient: float = 40.0) -> Image.Image:
    """Pencil-like strokes: thin binarised edges, black (0) on white (255).

    Canny thresholds follow the image's own gradients (the 90th percentile, never below
    `min_gradient`), so faint and contrasty pictures give similar stroke density; specks shorter
    than 2% of the short side are dropped and the 1-pixel edges thickened to 2 pixels.
    """
    gray = cv2.cvtColor(np.asarray(to_rgb(image)), cv2.COLOR_RGB2GRAY)
    gray = cv2.GaussianBlur(gray, (0, 0), 1.0)
    gx = cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=3)
    # Canny's default gradient is |gx| + |gy|; thresholds are taken in the same units.
    high = max(float(np.percentile(np.abs(gx) + np.abs(gy), 90)), min_gradient)
    edges = cv2.Canny(gray, high / 2.0, high)
    edges = _drop_small_components(edges, max(4, round(0.02 * min(gray.shape))))
    strokes = cv2.dilate(edges, np.ones((2, 2), np.uint8))
    return Image.fromarray(255 - strokes)


def shape_mask(image: Image.Image, mask: Image.Image | None = None) -> Image.Image:
    """Foreground mask, 255 on the object and 0 on the background.

    Given a segmentation `mask` (white object on black, or a label map with 0 as background) it is
    binarised and resized (nearest) to the image. Otherwise the object is what differs from the
    border's median colour: Lab distance, Otsu threshold (raised above the border's own spread),
    morphological clean-up, and filled outer contours of at least 0.5% of the image. An image
    with nothing standing out gives an all-black mask.
    """
    rgb = np.asarray(to_rgb(image))
    if mask is not None:
        return _binarise_segmentation(mask, (rgb.shape[1], rgb.shape[0]))
    height, width = rgb.shape[:2]
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).astype(np.float32)
    border = np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]])
    distance = np.linalg.norm(lab - np.median(border, axis=0), axis=2)
    distance = cv2.GaussianBlur(distance, (0, 0), max(1.0, min(height, width) / 128.0))
    edge_values = np.concatenate([distance[0], distance[-1], distance[:, 0], distance[:, -1]])
    floor = float(np.percentile(edge_values, 95)) + 8.0  # Lab units; ~8 is a visible difference
    if float(distance.max()) <= floor:
        return Image.new("L", (width, height), 0)
    scaled = np.round(np.clip(distance / distance.max(), 0.0, 1.0) * 255.0).astype(np.uint8)
    otsu, _ = cv2.threshold(scaled, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    foreground = distance > max(otsu / 255.0 * float(distance.max()), floor)
    return Image.fromarray(_clean_mask(foreground.astype(np.uint8) * 255))


def depth_map(item: Any, size: tuple[int, int] | None = None) -> Image.Image | None:
    """The depth map supplied in `item.extra["depth"]` as "L", stretched to span 0..255.

    The source may be a path, a PIL image (8- or 16-bit, "I;16", "I", "F" or RGB) or a 2-D array.
    Values are min-max normalised, keeping the dataset's orientation (whether near is bright);
    a constant map becomes black. Given `size` = (width, height) the map is resized (bilinear) to
    it. Returns None when the item has no depth map: depth is read, never estimated.
    """
    source = getattr(item, "extra", {}).get("depth")
    if source is None:
        return None
    values = _depth_values(source)
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    result = Image.fromarray(np.round(scaled * 255.0).astype(np.uint8))
    if size is not None and result.size != tuple(size):
        result = result.resize(tuple(size), Image.Resampling.BILINEAR)
    return result


def inpainting_mask(size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A random hole for inpainting, "L" of `size` = (width, height): 255 in the hole.

    One to three shapes, each a rectangle (10-50% of each side) or a brush stroke (a random
    polyline 4-12% of the short side thick). Never empty.
    """
    width, height = size
    hole = np.zeros((height, width), dtype=np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        if rng.random() < 0.5:
            _draw_rectangle(hole, rng)
        else:
            _draw_stroke(hole, rng)
    return Image.fromarray(hole)


def apply_mask(
    image: Image.Image, mask: Image.Image, fill: tuple[int, int, int] = (127, 127, 127)
) -> Image.Image:
    """The image with `fill` painted where `mask` is white; grey mask values blend.

    This is how an inpainting hole is shown to the model: the kept pixels as they are, the hole a
    flat colour.
    """
    rgb = np.asarray(to_rgb(image), dtype=np.float32)
    weight = np.asarray(to_mask(mask), dtype=np.float32)[..., None] / 255.0
    if weight.shape[:2] != rgb.shape[:2]:
        raise ValueError(f"mask: size {mask.size} does not match the image's size {image.size}")
    blended = rgb * (1.0 - weight) + np.asarray(fill, dtype=np.float32) * weight
    return Image.fromarray(np.round(blended).astype(np.uint8))


def load_control_image(source: Any) -> Image.Image:
    """A supplied control (depth map, segmentation mask) from a path or a PIL image, decoded."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (str, os.PathLike)):
        with Image.open(source) as image:
            image.load()
            return image.copy()
    raise TypeError(f"expected a path or a PIL image, got {type(source).__name__}")


# --------------------------------------------------------------------------------------------
# Helpers


def _depth_values(source: Any) -> np.ndarray:
    if isinstance(source, np.ndarray):
        values = source
    else:
        image = load_control_image(source)
        if image.mode in ("RGB", "RGBA", "P", "LA", "CMYK", "YCbCr"):
            image = image.convert("L")
        values = np.asarray(image)
    if values.ndim != 2 or values.size == 0:
        raise ValueError(f"depth: expected a single-channel map, got shape {values.shape}")
    return values.astype(np.float64)


def _binarise_segmentation(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    values = np.asarray(to_mask(mask))
    # A white-on-black mask splits at mid grey; a label map (ids 1, 2, ...) keeps every label.
    foreground = values >= 128 if values.max() >= 128 else values > 0
    binary = Image.fromarray(foreground.astype(np.uint8) * 255)
    return binary if binary.size == size else binary.resize(size, Image.Resampling.NEAREST)


def _clean_mask(binary: np.ndarray) -> np.ndarray:
    side = max(3, (min(binary.shape) // 64) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (side, side))
    binary = cv2.morphologyEx(binary, cv2.MORPH_OPEN, kernel)
    binary = cv2.morphologyEx(binary, cv2.MORPH_CLOSE, kernel)
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    minimum = 0.005 * binary.size
    kept = [contour for contour in contours if cv2.contourArea(contour) >= minimum]
    filled = np.zeros_like(binary)
    # Filling outer contours also closes holes inside the object (a logo on a shirt).
    cv2.drawContours(filled, kept, -1, 255, thickness=cv2.FILLED)
    return filled


def _drop_small_components(binary: np.ndarray, min_pixels: int) -> np.ndarray:
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    keep = np.zeros(count, dtype=bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_pixels
    return np.where(keep[labels], 255, 0).astype(np.uint8)


def _draw_rectangle(hole: np.ndarray, rng: np.random.Generator) -> None:
    height, width = hole.shape
    w = max(1, round(width * rng.uniform(0.1, 0.5)))
    h = max(1, round(height * rng.uniform(0.1, 0.5)))
    x = int(rng.integers(0, width - w + 1))
    y = int(rng.integers(0, height - h + 1))
    hole[y : y + h, x : x + w] = 255


def _draw_stroke(hole: np.ndarray, rng: np.random.Generator) -> None:
    height, width = hole.shape
    thickness = max(1, round(min(width, height) * rng.uniform(0.04, 0.12)))
    points = _stroke_points(width, height, rng)
    cv2.polylines(hole, [points], isClosed=False, color=255, thickness=thickness)


def _stroke_points(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A random walk of 2-5 segments, each up to a third of the image, clipped to the canvas."""
    count = int(rng.integers(3, 7))
    steps = rng.uniform(-1.0, 1.0, size=(count - 1, 2)) * np.array([width, height]) / 3.0
    start = rng.uniform(0.0, 1.0, size=2) * np.array([width, height])
    points = np.vstack([start, start + np.cumsum(steps, axis=0)])
    points = np.clip(np.round(points), 0, [width - 1, height - 1])
    return points.astype(np.int32).reshape(-1, 1, 2)
