"""Instruct-Imagen on ComfyUI's own MODEL: a patch that stock samplers run, and its guider."""

from __future__ import annotations

from comfy_api.latest import io

from ..instruct_core.guidance import GuidanceConfig
from ..instruct_core.instruction import RESIZE_POLICIES, MultiModalInstruction
from . import paths
from .common import CATEGORY, Instruction, guidance_inputs, node_errors, with_search_aliases

MAX_CONTEXT_SIZE = 2048


class ApplyInstructImagen(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return with_search_aliases(io.Schema(
            node_id="ApplyInstructImagen",
            display_name="Apply Instruct-Imagen",
            category=CATEGORY,
            description="Patch a Stable Diffusion MODEL (SD1.x, SD2.x, SDXL) so that it follows the instruction's "
                        "context images; sample with KSampler, SamplerCustom or InstructGuider. The contexts go "
                        "through the given VAE and once through the model's own encoder; the text through the "
                        "given CLIP. With adapter 'none' the context layers are fresh and the picture is the "
                        "base model's.",
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip"),
                io.Vae.Input("vae"),
                io.Combo.Input("adapter", options=paths.adapter_choices(), default=paths.NO_ADAPTER,
                               tooltip="Trained context layers (.safetensors) from models/instruct_imagen."),
                Instruction.Input("instruction"),
                io.Float.Input("strength", default=1.0, min=0.0, max=10.0, step=0.05, optional=True,
                               tooltip="Scales every context's weight."),
                io.Int.Input("context_width", default=512, min=64, max=MAX_CONTEXT_SIZE, step=64, optional=True,
                             tooltip="Size the context images are brought to before encoding."),
                io.Int.Input("context_height", default=512, min=64, max=MAX_CONTEXT_SIZE, step=64, optional=True),
                io.Combo.Input("resize_policy", options=list(RESIZE_POLICIES), default="crop", optional=True),
            ],
            outputs=[io.Model.Output(display_name="model"),
                     io.Conditioning.Output(display_name="positive"),
                     io.Conditioning.Output(display_name="negative")],
        ), "reference image", "ip adapter", "model patch", "multi reference")

    @classmethod
    def execute(cls, model, clip, vae, adapter: str, instruction: MultiModalInstruction, strength: float = 1.0,
                context_width: int = 512, context_height: int = 512, resize_policy: str = "crop") -> io.NodeOutput:
        from .model_patch import apply_instruct_imagen

        with node_errors():
            patched, positive, negative = apply_instruct_imagen(
                model, clip, vae, paths.resolve_adapter(adapter), instruction, strength,
                (context_width, context_height), resize_policy)
        return io.NodeOutput(patched, positive, negative)


class InstructGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return with_search_aliases(io.Schema(
            node_id="InstructGuider",
            display_name="Instruct Guider (Instruct-Imagen)",
            category=CATEGORY,
            description="Guidance for SamplerCustomAdvanced over a model from Apply Instruct-Imagen: separate "
                        "scales for the text and for the context images (dual), alternating with no guidance "
                        "early on (oscillating), or one of the two per step (interleaved). Only the branches a "
                        "step needs are computed. With cfg_text = cfg_context = c, dual is KSampler's cfg c.",
            inputs=[
                io.Model.Input("model"),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                *guidance_inputs(),
            ],
            outputs=[io.Guider.Output()],
        ), "cfg guider", "dual guidance", "context guidance")

    @classmethod
    def execute(cls, model, positive, negative, cfg_text: float, cfg_context: float, guidance: str) -> io.NodeOutput:
        from .model_patch import instruct_guider

        with node_errors():
            config = GuidanceConfig(cfg_text, cfg_context, guidance)
        return io.NodeOutput(instruct_guider(model, positive, negative, config))
