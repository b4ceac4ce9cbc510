"""Loading a base model with an adapter, and saving an adapter."""

from __future__ import annotations

import comfy.model_management
from comfy_api.latest import io

from . import paths
from .common import CATEGORY, Model, ModelHandle, cached_model, node_errors, with_search_aliases

DTYPES = ("auto", "fp32", "fp16", "bf16")


class InstructImagenLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return with_search_aliases(io.Schema(
            node_id="InstructImagenLoader",
            display_name="Instruct-Imagen Loader",
            category=CATEGORY,
            description="A base model (a checkpoint from models/checkpoints, or the built-in 'default' or 'tiny') "
                        "with context layers: an adapter from models/instruct_imagen, or fresh ones that leave "
                        "the base model's output unchanged.",
            inputs=[
                io.Combo.Input("model", options=paths.base_model_choices(), default="default",
                               tooltip="'default': the bundled model; 'tiny': a small random model for tests; "
                                       "otherwise a Stable Diffusion checkpoint (SD1.x, SD2.x, SDXL)."),
                io.Combo.Input("adapter", options=paths.adapter_choices(), default=paths.NO_ADAPTER,
                               tooltip="Trained context layers (.safetensors) from models/instruct_imagen."),
                io.Combo.Input("dtype", options=list(DTYPES), default="auto",
                               tooltip="auto: fp16 on a GPU, fp32 on the CPU."),
            ],
            outputs=[Model.Output(display_name="model")],
        ), "load checkpoint", "model loader", "adapter loader")

    @classmethod
    def execute(cls, model: str, adapter: str, dtype: str) -> io.NodeOutput:
        from ..instruct_core.loading import resolve_dtype
        from ..instruct_core.models import load_pipeline

        device = comfy.model_management.get_torch_device()
        with node_errors():
            source = paths.resolve_base_model(model)
            adapter_path = paths.resolve_adapter(adapter)
            key = (model, adapter_path, dtype, str(device))

            def load() -> ModelHandle:
                # Weights start on the offload device, in the compute device's dtype; the first node that
                # runs the model asks ComfyUI to load it, as ComfyUI's own loaders do.
                pipe = load_pipeline(source, adapter_path, device=str(comfy.model_management.unet_offload_device()),
                                     dtype=resolve_dtype(dtype, device))
                return ModelHandle(pipe, model, None if adapter_path is None else adapter, dtype)

            return io.NodeOutput(cached_model(key, load))


class AdapterSaver(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return with_search_aliases(io.Schema(
            node_id="AdapterSaver",
            display_name="Save Instruct-Imagen Adapter",
            category=CATEGORY,
            description="Write the model's context layers to models/instruct_imagen/<name>.safetensors.",
            inputs=[
                Model.Input("model"),
                io.String.Input("adapter_name", default="my_adapter"),
                io.Boolean.Input("overwrite", default=False),
            ],
            outputs=[io.String.Output(display_name="adapter")],
            is_output_node=True,
        ), "save lora", "save adapter", "save model")

    @classmethod
    def execute(cls, model: ModelHandle, adapter_name: str, overwrite: bool) -> io.NodeOutput:
        from ..instruct_core.adapter_io import save_adapter

        path = paths.adapter_save_path(adapter_name)
        if path.exists() and not overwrite:
            raise ValueError(f"adapter_name: {path.name} already exists in {path.parent}; "
                             f"choose another name or turn on overwrite")
        with node_errors():
            save_adapter(model.pipe.model, path, {"saved_by": "AdapterSaver", "base_model": model.name})
        return io.NodeOutput(path.name, ui={"text": [f"saved {path}"]})
