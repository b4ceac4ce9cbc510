"""Named models: the bundled default, small models built in code, or a user's checkpoint.

The bundled default is a small pixel-space (Imagen-like) cascade; its folder holds `model.safetensors` (fp16: the
32x32 base UNet, text encoder, adapter), `config.json` (its architecture, adapter settings and how it was built),
and the 128x128 super-resolution stage (`super_resolution.safetensors`, `super_resolution.json`). The harness
(`python -m instruct_bench build-default`) trains and writes it; this module only reads it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import MissingFileError
from .pipeline import InstructImagen
from .super_resolution import SuperResolution

DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"
DEFAULT_WEIGHTS = "model.safetensors"
BUILTIN_MODELS = ("default", "tiny")
# The text guidance scale the bundled model is measured with (docs/RESULTS.md) and the demo samples at.
DEFAULT_TEXT_SCALE = 3.0


def default_model_available() -> bool:
    return (DEFAULT_MODEL_DIR / DEFAULT_WEIGHTS).is_file()


def build_default_base(architecture: dict, seed: int = 0):
    """The default model's base in `architecture` (as its config.json stores it), freshly initialised (seeded)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .loading import BaseModel
    from .tiny import tiny_tokenizer

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**architecture["text_encoder"])).eval()
    unet = UNet2DConditionModel(**architecture["unet"]).eval()
    scheduler = dict(architecture["scheduler"])
    return BaseModel(unet=unet, vae=None, text_encoders=[text_encoder],
                     tokenizers=[tiny_tokenizer(architecture["tokenizer_max_length"])], scheduler_config=scheduler,
                     prediction_type=scheduler["prediction_type"], kind="custom", vae_scaling_factor=1.0,
                     source="default")


def load_default(adapter: str | None = None, device: str = "auto", dtype: str = "auto", adapter_config=None,
                 folder: Path = DEFAULT_MODEL_DIR, super_resolution: bool = True) -> InstructImagen:
    """The bundled model as an InstructImagen; `adapter` replaces its own trained adapter. With
    `super_resolution` (the default) its super-resolution stage is loaded too, and `sample` runs it."""
    from safetensors.torch import load_file

    from .context_unet import ContextAdapterConfig, ContextAugmentedUNet
    from .loading import resolve_device, resolve_dtype

    for path in (folder / "config.json", folder / DEFAULT_WEIGHTS):
        if not path.is_file():
            raise MissingFileError(f"default model: {path} is missing (a checkout without its weights, or an "
                                   f"install that left out the package data)")
    config = json.loads((folder / "config.json").read_text())
    base = build_default_base(config["architecture"])
    tensors = load_file(str(folder / DEFAULT_WEIGHTS))
    part = lambda prefix: {k[len(prefix):]: v.float() for k, v in tensors.items() if k.startswith(prefix)}
    base.unet.load_state_dict(part("unet."))
    base.text_encoders[0].load_state_dict(part("text_encoder."), strict=False)
    if adapter is not None:
        pipe = InstructImagen.from_base(base, adapter=adapter)
    else:
        own = ContextAdapterConfig.from_dict(config["adapter_config"])
        model = ContextAugmentedUNet(base.unet, adapter_config or own)
        if adapter_config is None:
            model.adapter.load_state_dict(part("adapter."))
        pipe = InstructImagen(base, model)
    pipe.timesteps = "fractional"  # what its published figures were measured with
    target_device = resolve_device(device)
    target_dtype = torch.float32 if dtype == "auto" and target_device.type == "cpu" else resolve_dtype(dtype, target_device)
    pipe.model.to(device=target_device, dtype=target_dtype)
    pipe.base.text_encoders[0].to(target_device)
    if super_resolution:
        pipe.super_resolution = SuperResolution.load(folder, device=target_device)
        pipe.super_resolution.unet.to(dtype=target_dtype)
    return pipe


def load_pipeline(model: str = "default", adapter: str | None = None, device: str = "auto", dtype: str = "auto",
                  adapter_config=None) -> InstructImagen:
    """An InstructImagen from a model name or path and an optional adapter file (or a fresh adapter's config)."""
    from .loading import load_base, resolve_device, resolve_dtype

    if model == "default":
        return load_default(adapter=adapter, device=device, dtype=dtype, adapter_config=adapter_config)
    if model == "tiny":
        from .tiny import build_tiny_base

        target_device = resolve_device(device)
        target_dtype = resolve_dtype(dtype, target_device)
        base = build_tiny_base()
        base.unet.to(target_device)
        for encoder in base.text_encoders:
            encoder.to(target_device)
        if target_dtype != torch.float32:
            base.unet.to(dtype=target_dtype)
    else:
        base = load_base(model, dtype=dtype, device=device)
    return InstructImagen.from_base(base, adapter=adapter, adapter_config=adapter_config)
