"""ComfyUI nodes for Instruct-Imagen. Each node converts ComfyUI's types and calls `instruct_core`."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import paths
from .instruction_nodes import ContextImage, InstructionBuilder, InstructionFromJSON, InstructionToJSON
from .model_nodes import AdapterSaver, InstructImagenLoader
from .patch_nodes import ApplyInstructImagen, InstructGuider
from .sampling_nodes import InstructSampler, MultiModalEncode
from .training_nodes import FineTuneStage

NODES = [
    InstructImagenLoader,
    ContextImage,
    InstructionBuilder,
    MultiModalEncode,
    InstructSampler,
    InstructionFromJSON,
    InstructionToJSON,
    AdapterSaver,
    FineTuneStage,
    ApplyInstructImagen,
    InstructGuider,
]


class InstructImagenExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> InstructImagenExtension:
    paths.register_adapter_folder()
    paths.install_example_inputs()
    return InstructImagenExtension()
