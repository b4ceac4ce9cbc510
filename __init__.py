"""Instruct-Imagen for ComfyUI: the node pack's entry point.

Imports are relative only: ComfyUI-Manager may install the pack under any folder name.
"""

WEB_DIRECTORY = "./web"

try:
    from .nodes import comfy_entrypoint
except ModuleNotFoundError as error:
    # Outside ComfyUI (pytest imports the repository root as a package, for one) its modules are missing
    # and there is nothing to register. Inside ComfyUI they always exist, so any other error is real.
    if error.name not in ("comfy_api", "comfy", "folder_paths"):
        raise

__all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
