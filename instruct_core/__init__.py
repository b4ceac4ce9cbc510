"""Instruct-Imagen core: multi-modal instructions on a context-augmented diffusion UNet.

Nothing in this package imports ComfyUI; `nodes/` adapts it. Heavy parts (torch, diffusers) load on first use.
"""

from .errors import InstructImagenError, MissingFileError
from .instruction import (
    DEFAULT_MODALITIES,
    Context,
    InstructionError,
    InstructionWarning,
    MultiModalInstruction,
    load_instruction,
    save_instruction,
)

__version__ = "0.1.0"

_LAZY = {
    "InstructImagen": "pipeline", "GenerationResult": "pipeline",
    "ContextAugmentedUNet": "context_unet", "ContextAdapterConfig": "context_unet",
    "GuidanceConfig": "guidance", "load_base": "loading", "ModelLoadError": "loading",
    "save_adapter": "adapter_io", "load_adapter": "adapter_io", "AdapterError": "adapter_io",
    "SAMPLERS": "samplers", "SamplingCancelled": "samplers",
}

__all__ = ["DEFAULT_MODALITIES", "Context", "InstructImagenError", "MissingFileError", "InstructionError",
           "InstructionWarning", "MultiModalInstruction", "load_instruction", "save_instruction", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'instruct_core' has no attribute {name!r}")
