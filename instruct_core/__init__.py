"""Instruct-Imagen core: multi-modal instructions on a context-augmented diffusion UNet.

Nothing in this package imports ComfyUI; `nodes/` adapts it.
"""

__version__ = "0.1.0"
