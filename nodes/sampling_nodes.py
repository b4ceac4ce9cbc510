"""Encoding an instruction once, and sampling images from it."""

from __future__ import annotations

import comfy.model_management
import comfy.utils
import torch
from comfy_api.latest import io
from PIL import Image

from ..instruct_core.guidance import GuidanceConfig
from ..instruct_core.instruction import RESIZE_POLICIES, MultiModalInstruction
from ..instruct_core.samplers import SAMPLERS
from ..instruct_core.schedules import DEFAULT_SCHEDULE, SCHEDULES
from .common import (
    CATEGORY,
    Conditioning,
    EncodedInstruction,
    Instruction,
    Model,
    ModelHandle,
    comfy_to_images,
    guidance_inputs,
    images_to_comfy,
    node_errors,
    sampling_memory,
    with_search_aliases,
)

MAX_SIZE = 4096
MAX_SEED = 0xFFFFFFFFFFFFFFFE  # the sampler also seeds seed + 1
PREVIEW_SIZE = 512
# Stable Diffusion 1.x latent -> RGB, the projection ComfyUI's own latent previews use.
SD_LATENT_RGB = torch.tensor([[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350],
                              [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]])


class MultiModalEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return with_search_aliases(io.Schema(
            node_id="MultiModalEncode",
            display_name="Multi-Modal Encode (Instruct-Imagen)",
            category=CATEGORY,
            description="Encode the instruction's text and context images once; every sampler step and every "
                        "sample of a batch reuses the result.",
            inputs=[
                Model.Input("model"),
                Instruction.Input("instruction"),
                io.Int.Input("context_width", default=0, min=0, max=MAX_SIZE, step=4,
                             tooltip="Size contexts are resized to; 0: the model's native size."),
                io.Int.Input("context_height", default=0, min=0, max=MAX_SIZE, step=4),
                io.Combo.Input("resize_policy", options=list(RESIZE_POLICIES), default="crop"),
            ],
            outputs=[Conditioning.Output(display_name="conditioning")],
        ), "text encode", "clip text encode", "conditioning")

    @classmethod
    def execute(cls, model: ModelHandle, instruction: MultiModalInstruction, context_width: int,
                context_height: int, resize_policy: str) -> io.NodeOutput:
        pipe = model.on_compute_device()
        size = (context_width or pipe.native_size, context_height or pipe.native_size)
        with node_errors():
            cond = pipe.encode_instruction(instruction, size, resize_policy)
        summary = {"text": instruction.text, "contexts": [(c.id, c.modality) for c in instruction.contexts]}
        return io.NodeOutput(EncodedInstruction(cond, model.key, size, summary))


class InstructSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return with_search_aliases(io.Schema(
            node_id="InstructSampler",
            display_name="Instruct Sampler (Instruct-Imagen)",
            category=CATEGORY,
            description="Sample images that follow the encoded instruction. LATENT holds raw VAE latents (for a "
                        "pixel-space model such as 'tiny', the pixels in [-1, 1]) at the base size; IMAGE is the "
                        "final result: for a cascade such as the bundled 'default' model, the super-resolution "
                        "stage's (128x128 from the 32x32 base) unless upscale is off.",
            inputs=[
                Model.Input("model"),
                Conditioning.Input("conditioning"),
                io.Int.Input("seed", default=0, min=0, max=MAX_SEED, control_after_generate=True),
                io.Int.Input("steps", default=20, min=1, max=1000),
                io.Combo.Input("sampler", options=list(SAMPLERS), default="dpmpp_2m"),
                io.Combo.Input("schedule", options=list(SCHEDULES), default=DEFAULT_SCHEDULE),
                *guidance_inputs(),
                io.Int.Input("width", default=0, min=0, max=MAX_SIZE, step=4,
                             tooltip="0: the model's native size. Ignored when a latent or init image is given."),
                io.Int.Input("height", default=0, min=0, max=MAX_SIZE, step=4),
                io.Int.Input("batch_size", default=1, min=1, max=64),
                io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01,
                               tooltip="Below 1 with a latent or init image: how much of it is redrawn."),
                io.Latent.Input("latent", optional=True, tooltip="Start from this LATENT (img2img)."),
                io.Image.Input("init_image", optional=True, tooltip="Start from this IMAGE (img2img)."),
                io.Boolean.Input("upscale", default=True, optional=True,
                                 tooltip="Run the model's super-resolution stage on the result (models that have "
                                         "one, such as 'default': 32x32 to 128x128). Off: IMAGE at the base size."),
            ],
            outputs=[io.Latent.Output(display_name="LATENT"), io.Image.Output(display_name="IMAGE")],
        ), "ksampler", "generate image", "txt2img", "img2img")

    @classmethod
    def execute(cls, model: ModelHandle, conditioning: EncodedInstruction, seed: int, steps: int, sampler: str,
                schedule: str, cfg_text: float, cfg_context: float, guidance: str, width: int, height: int,
                batch_size: int, denoise: float, latent=None, init_image=None, upscale: bool = True) -> io.NodeOutput:
        if conditioning.model_key != model.key:
            raise ValueError("conditioning: it was encoded by another model; connect the same model to "
                             "MultiModalEncode and InstructSampler")
        pipe = model.pipe
        init = mask = None
        if latent is not None:
            model.on_compute_device()  # the latent is decoded through the model's VAE
            init = latent_to_images(pipe, latent["samples"])
            if latent.get("noise_mask") is not None:  # SetLatentNoiseMask, VAEEncodeForInpaint
                mask = noise_mask_for(latent["noise_mask"], init.shape[-2:])
        elif init_image is not None:
            init = comfy_to_images(init_image)
        if init is not None:
            height, width = init.shape[-2:]
            batch_size = max(batch_size, init.shape[0]) if init.shape[0] == 1 else init.shape[0]
        width, height = width or pipe.native_size, height or pipe.native_size
        rows = 3 if conditioning.cond.has_contexts else 2  # at most, the guidance branches of one UNet call
        pipe = model.on_compute_device(sampling_memory(pipe, batch_size, width, height, rows))
        progress = comfy.utils.ProgressBar(steps)
        with node_errors():
            result = pipe.sample(
                conditioning.cond, seed=seed, steps=steps, sampler=sampler, schedule=schedule,
                guidance=GuidanceConfig(cfg_text, cfg_context, guidance), width=width, height=height,
                batch_size=batch_size, init_image=init, denoise=denoise if init is not None else 1.0,
                mask=mask, callback=step_callback(pipe, progress), upscale=upscale)
        return io.NodeOutput({"samples": result.latents}, images_to_comfy(result.images))


def latent_to_images(pipe, samples: torch.Tensor) -> torch.Tensor:
    """A LATENT's raw samples as images in [0, 1], through the model's VAE (or as pixels, without one)."""
    channels = pipe.base.unet.config.in_channels
    if samples.dim() != 4 or samples.shape[1] != channels:
        raise ValueError(f"latent: expected samples of shape (B, {channels}, h, w) for this model, got "
                         f"{tuple(samples.shape)}")
    scale = pipe.base.vae_scaling_factor if pipe.base.vae is not None else 1.0
    return pipe.to_images(samples.to(pipe.device, pipe.dtype) * scale)


def noise_mask_for(noise_mask: torch.Tensor, size) -> torch.Tensor:
    """A LATENT's noise_mask ((H, W), (B, H, W) or (B, 1, H, W), any resolution; 1 = regenerate) at the
    image size, as (B, 1, H, W)."""
    if noise_mask.dim() not in (2, 3, 4) or (noise_mask.dim() == 4 and noise_mask.shape[1] != 1):
        raise ValueError(f"latent: noise_mask of shape {tuple(noise_mask.shape)} is not a mask")
    mask = noise_mask.reshape(-1, 1, *noise_mask.shape[-2:]).float()
    return torch.nn.functional.interpolate(mask, size=tuple(size), mode="bilinear", align_corners=False)


def step_callback(pipe, progress):
    """Per-step progress with a preview of the current estimate; stops within one step on interrupt."""
    def callback(info: dict) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        progress.update_absolute(info["i"] + 1, info["total"], preview(pipe, info["denoised"]))
    return callback


def preview(pipe, denoised: torch.Tensor):
    """A cheap preview of the first sample: the pixels of a pixel-space model, an RGB projection of SD latents."""
    sample = denoised[0].detach().float().cpu()
    if pipe.base.vae is None and sample.shape[0] == 3:
        rgb = (sample + 1) / 2
    elif sample.shape[0] == 4:
        rgb = (torch.einsum("chw,cr->rhw", sample / max(pipe.base.vae_scaling_factor, 1e-6) * 0.18215,
                            SD_LATENT_RGB) + 1) / 2
    else:
        return None
    array = (rgb.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype("uint8")
    return ("JPEG", Image.fromarray(array), PREVIEW_SIZE)
