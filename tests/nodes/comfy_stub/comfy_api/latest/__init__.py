"""comfy_api.latest: the extension base class and the `io` schema module, as in ComfyUI 0.8."""

from abc import ABC, abstractmethod

from . import _io as io

IO = io


class ComfyExtension(ABC):
    async def on_load(self) -> None:
        """Called when an extension is loaded."""

    @abstractmethod
    async def get_node_list(self) -> list:
        """Returns a list of nodes that this extension provides."""


__all__ = ["ComfyExtension", "io", "IO"]
