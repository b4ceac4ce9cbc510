"""Instruct-Imagen for ComfyUI: the node pack's entry point.

Imports are relative only: ComfyUI-Manager may install the pack under any folder name.
"""

WEB_DIRECTORY = "./web"

# pytest imports the repository root as a package, or as a plain module when the folder's name is no
# Python name (a checkout in "my-pack/"): then there is no package to import relatively from.
if __package__:
    try:
        from .nodes import comfy_entrypoint
    except ModuleNotFoundError as error:
        # Outside ComfyUI its modules are missing and there is nothing to register. Inside ComfyUI they always
        # exist, so any other error is real.
        if error.name not in ("comfy_api", "comfy", "folder_paths"):
            raise

__all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
