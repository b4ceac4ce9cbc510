"""What every node shares: the pack's socket types, library errors as node errors, tensor conversions.

ComfyUI's conventions: IMAGE is float (B, H, W, C) in [0, 1]; MASK is float (B, H, W) in [0, 1], 1 where
masked; LATENT is {"samples": (B, C, h, w)} in raw VAE space. The library's are (B, C, H, W) tensors and
PIL images.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from dataclasses import dataclass, field

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import numpy as np
import torch
from comfy_api.latest import io
from PIL import Image

from ..instruct_core.errors import InstructImagenError
from ..instruct_core.guidance import GUIDANCE_MODES, GuidanceConfig
from ..instruct_core.instruction import Context

CATEGORY = "Instruct-Imagen"

Model = io.Custom("INSTRUCT_IMAGEN_MODEL")
ContextSocket = io.Custom("INSTRUCT_CONTEXT")
Instruction = io.Custom("INSTRUCTION")
Conditioning = io.Custom("INSTRUCT_CONDITIONING")


def with_search_aliases(schema: io.Schema, *aliases: str) -> io.Schema:
    """The schema, found in the node search by these words too (what users call the same thing elsewhere:
    "reference image", "ip adapter"). ComfyUI releases whose io.Schema has `search_aliases` pass them to
    the frontend; ComfyUI 0.8 has no such field and ignores the attribute."""
    schema.search_aliases = list(aliases)
    return schema


class InstructImagenWeights(torch.nn.ModuleDict):
    """The pipeline's modules as one module for a ModelPatcher; ComfyUI's log names models by this class."""


@dataclass
class ModelHandle:
    """An INSTRUCT_IMAGEN_MODEL value: the pipeline, what it was loaded from, and the ModelPatcher through
    which ComfyUI's model management places its weights."""

    pipe: object  # instruct_core.pipeline.InstructImagen
    name: str
    adapter: str | None = None
    dtype: str = "auto"
    patcher: object = field(default=None, repr=False)

    def __post_init__(self):
        if self.patcher is None:
            self.patcher = comfy.model_patcher.ModelPatcher(
                InstructImagenWeights(self.pipe.weight_modules()),
                load_device=comfy.model_management.get_torch_device(),
                offload_device=comfy.model_management.unet_offload_device())
            name = self.name  # not self: the patcher must not keep its handle alive
            self.patcher.add_callback(comfy.patcher_extension.CallbacksMP.ON_DETACH,
                                      lambda patcher, unpatch_all: unpatch_all and _offloaded(name))

    @property
    def key(self) -> str:
        return f"{self.name}+{self.adapter or 'none'}@{self.dtype}#{id(self.pipe)}"

    def on_compute_device(self, memory_required: float = 0):
        """The pipeline, loaded on ComfyUI's compute device. load_models_gpu first offloads other models to
        make room, and registers this one, so that later loads can offload it in turn. Full load only:
        ComfyUI streams weights in low-VRAM mode through its own layer classes, which these modules are not."""
        comfy.model_management.load_models_gpu([self.patcher], memory_required=memory_required,
                                               force_full_load=True)
        device = torch.device(self.patcher.load_device)
        if self.pipe.device != device:
            # --novram loads no weights even on a full load (ComfyUI would stream them through its own
            # layers); these modules must be on the device whole, so move them and record it.
            weights = self.patcher.model
            weights.to(device)
            weights.device = device
            weights.model_loaded_weight_memory = self.patcher.model_size()
        return self.pipe


def sampling_memory(pipe, batch: int, width: int, height: int, rows_per_image: int) -> float:
    """Bytes to keep free for one sampler step's activations, by ComfyUI's own rule for SD models
    (BaseModel.memory_required: 0.01 MiB per latent position per byte of dtype)."""
    factor = pipe.spatial_factor
    positions = rows_per_image * batch * (height // factor) * (width // factor)
    return positions * pipe.dtype.itemsize * 0.01 * 2**20


@dataclass
class ContextInput:
    """An INSTRUCT_CONTEXT value: one context image before the builder gives it its id (its slot)."""

    modality: str
    text: str
    image: Image.Image
    mask: Image.Image | None = None
    weight: float = 1.0

    def with_id(self, context_id: int) -> Context:
        return Context(id=context_id, modality=self.modality, text=self.text, image=self.image, mask=self.mask,
                       weight=self.weight)


@dataclass
class EncodedInstruction:
    """An INSTRUCT_CONDITIONING value: the instruction encoded once, and the model that encoded it."""

    cond: object  # instruct_core.guidance.Conditioning
    model_key: str
    context_size: tuple[int, int]
    summary: dict = field(default_factory=dict)


@contextlib.contextmanager
def node_errors():
    """Library errors surface as ValueError with the library's message: one clear line in the UI."""
    try:
        yield
    except InstructImagenError as error:
        raise ValueError(str(error)) from None


# -- conversions ------------------------------------------------------------------------------------------

def image_to_pil(image: torch.Tensor, field: str) -> Image.Image:
    """The one image of an IMAGE batch as RGB."""
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{field}: expected an IMAGE of shape (B, H, W, C), got {tuple(image.shape)}")
    if image.shape[0] != 1:
        raise ValueError(f"{field}: got a batch of {image.shape[0]} images; a context takes one "
                         f"(pick one with ImageFromBatch)")
    array = (image[0].detach().float().cpu().clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    if array.shape[-1] == 1:
        return Image.fromarray(array[..., 0], "L").convert("RGB")
    return Image.fromarray(array[..., :3], "RGB")


def mask_to_pil(mask: torch.Tensor, size: tuple[int, int], field: str) -> Image.Image:
    """A MASK as an "L" image of `size`: white where the mask is 1, which is where the context applies."""
    if mask.dim() == 3:
        if mask.shape[0] != 1:
            raise ValueError(f"{field}: got a batch of {mask.shape[0]} masks; a context takes one")
        mask = mask[0]
    if mask.dim() != 2:
        raise ValueError(f"{field}: expected a MASK of shape (B, H, W), got {tuple(mask.shape)}")
    array = (mask.detach().float().cpu().clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    image = Image.fromarray(array, "L")
    return image if image.size == size else image.resize(size, Image.Resampling.BILINEAR)


def images_to_comfy(images: torch.Tensor) -> torch.Tensor:
    """Library images (B, 3, H, W) in [0, 1] as an IMAGE (B, H, W, 3)."""
    return images.detach().float().cpu().clamp(0, 1).permute(0, 2, 3, 1).contiguous()


def comfy_to_images(image: torch.Tensor) -> torch.Tensor:
    """An IMAGE (B, H, W, C) as library images (B, 3, H, W)."""
    return image[..., :3].detach().float().permute(0, 3, 1, 2).contiguous()


def pil_to_comfy(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array.copy()).unsqueeze(0)


# -- models shared between nodes --------------------------------------------------------------------------

# Loaded pipelines by what they were loaded from. Values are held weakly: a pipeline lives exactly as long
# as ComfyUI's node-output cache (or a running node) holds it, so POST /free {"free_memory": true}, which
# drops that cache, releases it; this table only lets two loaders of the same model share one copy.
_LOADED: "weakref.WeakValueDictionary[tuple, ModelHandle]" = weakref.WeakValueDictionary()


def cached_model(key: tuple, load) -> ModelHandle:
    handle = _LOADED.get(key)
    if handle is None:
        handle = load()
        _LOADED[key] = handle
        weakref.finalize(handle, _released, key[0])
    return handle


def _released(name: str) -> None:
    logging.info("[Instruct-Imagen] released model %s", name)


def _offloaded(name: str) -> None:
    logging.info("[Instruct-Imagen] offloaded model %s", name)


def guidance_inputs() -> list:
    """The guidance scales and mode, as InstructSampler and InstructGuider both take them."""
    return [
        io.Float.Input("cfg_text", default=5.0, min=0.0, max=30.0, step=0.1, round=0.01,
                       tooltip="Guidance towards the text."),
        io.Float.Input("cfg_context", default=GuidanceConfig.context_scale, min=0.0, max=30.0, step=0.1,
                       round=0.01, tooltip="Guidance towards the context images."),
        io.Combo.Input("guidance", options=list(GUIDANCE_MODES), default="dual"),
    ]
