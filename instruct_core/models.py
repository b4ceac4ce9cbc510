"""Named models: the bundled default, small models built in code, or a user's checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from .pipeline import InstructImagen

DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"
BUILTIN_MODELS = ("default", "tiny")


def default_model_available() -> bool:
    return (DEFAULT_MODEL_DIR / "model.safetensors").is_file()


def load_pipeline(model: str = "default", adapter: str | None = None, device: str = "auto", dtype: str = "auto",
                  adapter_config=None) -> InstructImagen:
    """An InstructImagen from a model name or path and an optional adapter file (or a fresh adapter's config)."""
    from .loading import load_base, resolve_device, resolve_dtype

    if model == "default" and default_model_available():
        from .default_model import load_default

        return load_default(adapter=adapter, device=device, dtype=dtype, adapter_config=adapter_config)
    if model in BUILTIN_MODELS:
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
