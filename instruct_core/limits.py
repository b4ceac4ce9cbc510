"""What one request may cost, estimated and refused before anything is allocated.

Every entry point (the command line, `InstructImagen.generate` / `sample` / `encode_instruction`, the ComfyUI
nodes, which call those, and the trainer) asks here first. A refusal is an InstructionError whose message names
the input at fault and the limit, so the command line exits 2 with one line and ComfyUI shows a node error.

The limits are settings: `LIMITS` holds the ones in force, `configure(**changes)` replaces some of them (it
returns the previous settings, so a caller can put them back), and the environment variable
INSTRUCT_IMAGEN_MAX_MEMORY_GIB sets the memory budget of a process, e.g. a ComfyUI server on a large GPU.
docs/SECURITY.md lists them with their defaults.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from dataclasses import dataclass

from .instruction import InstructionError

GIB = 2**30


def _memory_from_environment(default: int) -> int:
    text = os.environ.get("INSTRUCT_IMAGEN_MAX_MEMORY_GIB")
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise InstructionError(f"INSTRUCT_IMAGEN_MAX_MEMORY_GIB: {text!r} is not a positive number of GiB")
    return int(value * GIB)


@dataclass(frozen=True)
class Limits:
    max_memory_bytes: int = 16 * GIB  # estimated peak of one request's tensors
    max_side: int = 8192               # width or height of a generation, in pixels
    max_aspect: float = 16.0           # long side over short side of a generation
    max_pixels: int = 4096 * 4096      # width x height x batch of one call
    max_batch: int = 4096              # images of one call (rows x batch_size)
    max_steps: int = 1000              # sampling steps
    max_guidance_scale: float = 100.0  # |cfg| of any guidance branch (ComfyUI's KSampler allows up to 100)
    max_context_weight: float = 100.0  # |weight| of a context


LIMITS = Limits(max_memory_bytes=_memory_from_environment(Limits.max_memory_bytes))


def configure(**changes) -> Limits:
    """Replace some limits (names as in `Limits`); returns the previous settings."""
    global LIMITS
    previous = LIMITS
    for name, value in changes.items():
        if name not in {f.name for f in dataclasses.fields(Limits)}:
            raise ValueError(f"limits: unknown setting {name!r}")
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0 or math.isinf(value):
            raise ValueError(f"limits: {name} must be a positive finite number, got {value!r}")
    LIMITS = dataclasses.replace(LIMITS, **changes)
    return previous


# -- single values ----------------------------------------------------------------------------------------------

def require_int(field: str, value, low: int, high: int) -> int:
    """An integer (not a bool, not a float) in [low, high], or an InstructionError naming `field`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InstructionError(f"{field}: expected an integer, got {value!r}")
    if not low <= value <= high:
        raise InstructionError(f"{field}: {value} must be between {low} and {high}")
    return int(value)


def require_number(field: str, value, low: float, high: float, *, low_open: bool = False) -> float:
    """A finite real number in [low, high] ((low, high] with `low_open`), or an InstructionError naming `field`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InstructionError(f"{field}: expected a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise InstructionError(f"{field}: {value!r} is not a finite number")
    if number < low or number > high or (low_open and number == low):
        interval = f"({low:g}, {high:g}]" if low_open else f"[{low:g}, {high:g}]"
        raise InstructionError(f"{field}: {value!r} is outside {interval}")
    return number


def check_guidance_scale(field: str, value) -> float:
    bound = LIMITS.max_guidance_scale
    return require_number(field, value, -bound, bound)


def check_context_weight(field: str, value) -> float:
    bound = LIMITS.max_context_weight
    return require_number(field, value, -bound, bound)


def check_canvas(width: int, height: int, images: int) -> None:
    """Width, height and image count of one call: sides, aspect, pixels and batch within the limits."""
    require_int("batch", images, 1, LIMITS.max_batch)
    for name, value in (("width", width), ("height", height)):
        require_int(name, value, 1, LIMITS.max_side)
    aspect = max(width, height) / min(width, height)
    if aspect > LIMITS.max_aspect:
        raise InstructionError(f"width: {width}x{height} has an aspect of {aspect:.3g}:1, over the limit of "
                               f"{LIMITS.max_aspect:g}:1")
    if width * height * images > LIMITS.max_pixels:
        raise InstructionError(f"batch: {images} images of {width}x{height} exceed the limit of "
                               f"{LIMITS.max_pixels} pixels per call")


def check_contexts(contexts: list, width: int, height: int) -> None:
    """The contexts of an instruction, brought to width x height: their weights and their pixels in bounds."""
    for index, context in enumerate(contexts):
        check_context_weight(f"contexts[{index}].weight", context.weight)
    check_canvas(width, height, 1)
    if contexts and width * height * len(contexts) > LIMITS.max_pixels:
        raise InstructionError(f"contexts: {len(contexts)} contexts of {width}x{height} exceed the limit of "
                               f"{LIMITS.max_pixels} pixels per call")


# -- memory -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelFacts:
    """What the estimate needs to know of a model."""

    in_channels: int             # UNet input channels (latent or RGB)
    spatial_factor: int          # pixels per UNet input cell (8 for SD's VAE, 1 in pixel space)
    first_channels: int          # UNet channels at full resolution
    attention_level: int | None  # the highest-resolution level with attention, None if none
    attention_heads: int         # heads there
    vae_channels: int            # VAE decoder channels at full resolution (0 without a VAE)
    element_bytes: int           # bytes per element of the model's dtype
    fused_attention: bool        # attention scores are never materialised whole (fused kernels, CUDA)

    @classmethod
    def of_unet(cls, unet, attention_levels: list[int], *, spatial_factor: int, vae_channels: int, dtype,
                device) -> "ModelFacts":
        """The facts of a diffusers UNet whose attention sits at `attention_levels` (finest first)."""
        import torch

        level = attention_levels[0] if attention_levels else None
        head_dim = unet.config.attention_head_dim
        head_dim = head_dim[0] if isinstance(head_dim, (list, tuple)) else head_dim
        channels = unet.config.block_out_channels
        heads = max(1, channels[level] // head_dim) if level is not None and head_dim else 8
        return cls(in_channels=unet.config.in_channels, spatial_factor=spatial_factor, first_channels=channels[0],
                   attention_level=level, attention_heads=heads, vae_channels=vae_channels,
                   element_bytes=torch.finfo(dtype).bits // 8, fused_attention=torch.device(device).type == "cuda")


# Live full-resolution activations of a UNet pass, in units of (cells x first_channels): the skip connections
# of every level (about 2 at full resolution, 1 more over the lower levels), a resnet's working tensors (4) and
# the attention projections, with a margin.
UNET_ACTIVATION_FACTOR = 16
VAE_ACTIVATION_FACTOR = 6  # decoder working tensors at full resolution, in units of (pixels x vae_channels)


def estimate_generation_bytes(facts: ModelFacts, width: int, height: int, rows: int, branches: int,
                              contexts: int, context_cells: int) -> int:
    """Peak bytes of sampling `rows` images of width x height with `branches` guidance branches a step and up
    to `contexts` contexts of `context_cells` UNet input cells each. An estimate with a margin, not a
    measurement: what a refusal needs is to be right about orders of magnitude, before anything is allocated."""
    cells = (width // facts.spatial_factor) * (height // facts.spatial_factor)
    batch = rows * branches
    unet = batch * cells * facts.first_channels * facts.element_bytes * UNET_ACTIVATION_FACTOR
    state = rows * cells * facts.in_channels * 4 * 8  # x, noise, denoised, the steppers' history, in float32
    scores = 0
    if contexts and facts.attention_level is not None and not facts.fused_attention:
        # context attention runs with a mask, which the CPU kernels serve by materialising the scores; self-
        # attention has none and runs fused
        queries = cells // 4**facts.attention_level
        keys = contexts * max(1, context_cells // 4**facts.attention_level) + 1
        scores = batch * facts.attention_heads * queries * keys * facts.element_bytes * 2  # scores and softmax
    encode = contexts * context_cells * facts.first_channels * facts.element_bytes * UNET_ACTIVATION_FACTOR
    decode = width * height * facts.vae_channels * 4 * VAE_ACTIVATION_FACTOR  # one image at a time, float32
    return unet + state + scores + max(encode, decode)


def estimate_training_bytes(facts: ModelFacts, resolution: int, batch: int, contexts: int, parameters: int,
                            trained: int) -> int:
    """Peak bytes of one training step of `batch` examples at resolution x resolution with up to `contexts`
    contexts: the forward pass's activations kept for the backward pass and its gradients (3 times a sampling
    pass of one branch), the weights, and for each trained parameter its float32 gradient and two Adam moments."""
    cells = (resolution // facts.spatial_factor) ** 2
    forward = estimate_generation_bytes(facts, resolution, resolution, batch, 1, contexts, cells)
    return 3 * forward + parameters * facts.element_bytes + trained * 12


def check_memory(field: str, needed: int, what: str) -> None:
    if needed > LIMITS.max_memory_bytes:
        raise InstructionError(f"{field}: {what} needs about {needed / GIB:.3g} GiB, over the limit of "
                               f"{LIMITS.max_memory_bytes / GIB:.3g} GiB (INSTRUCT_IMAGEN_MAX_MEMORY_GIB)")
