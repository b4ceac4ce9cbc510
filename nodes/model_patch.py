"""Instruct-Imagen as a patch on ComfyUI's own MODEL: the glue between ComfyUI's model patcher and
`instruct_core.ldm_unet`, which holds the context attention itself.

Two attention patches per transformer block: `attn2_patch` keeps the block's cross-attention query input
in the block's `extra_options` (one dict per block call, shared by both patches), and `attn2_output_patch`
adds the context attention computed from it, for the layers the adapter has. Rows get contexts when their
batch chunk came from a conds-list index in `transformer_options[CONTEXT_CONDS]` (default: index 0, the
positive of CFGGuider's [positive, negative]); the negative gets none.
"""

from __future__ import annotations

import logging
import math
import weakref

import comfy.model_patcher
import comfy.patcher_extension
import numpy as np
import torch

from ..instruct_core import limits
from ..instruct_core.context_attention import add_to_rows
from ..instruct_core.guidance import cat_text
from ..instruct_core.instruction import (InstructionError, MultiModalInstruction, prepare_context_image,
                                          prepare_mask)
from ..instruct_core.ldm_unet import EncodedContexts, LdmContextAttention, LdmShape, ldm_facts, ldm_layout

CONTEXT_CONDS = "instruct_imagen_context_conds"  # transformer_options: conds-list indices whose rows get contexts
QUERY = "instruct_imagen_query"                  # extra_options: the block's cross-attention query input
PATCH = "instruct_imagen"                        # transformer_options: the patch, for InstructGuider


class ContextPatch:
    """The MODEL's context attention. Shared, not copied, by clones of the model: ModelPatcher.clone deep-copies
    model options, and a copy would duplicate the adapter and the encoded contexts."""

    def __init__(self, attention: LdmContextAttention, adapter_patcher):
        self.attention = attention
        self.adapter_patcher = adapter_patcher

    def __deepcopy__(self, memo):
        return self

    @property
    def num_contexts(self) -> int:
        return self.attention.num_contexts

    def models(self):
        """What ComfyUI's model management loads, offloads and frees with the MODEL."""
        return [self.adapter_patcher]

    def to(self, device_or_dtype):
        return self  # the adapter moves with its own ModelPatcher; encoded states are kept per device

    def on_pre_run(self, patcher) -> None:
        """A sampling run starts: the UNet's weights may have changed (a LoRA on a clone), so encode again."""
        self.attention.reset()

    def stash_query(self, n, context_attn2, value_attn2, extra_options):
        if self.attention.has_layer(extra_options.get("block"), extra_options.get("block_index", 0)):
            extra_options[QUERY] = n
        return n, context_attn2, value_attn2

    def add_context(self, n, extra_options):
        query = extra_options.pop(QUERY, None)
        if query is None:
            return n
        rows = context_rows(extra_options, n.shape[0], n.device)
        query_hw = tuple(extra_options["activations_shape"][-2:])
        added = self.attention.output(extra_options["block"], extra_options.get("block_index", 0), query, rows,
                                      query_hw)
        if added is None:
            return n
        rows, extra = added
        return add_to_rows(n, rows, extra.to(n.dtype))


class _StashQuery:
    def __init__(self, patch: ContextPatch):
        self.patch = patch

    def __deepcopy__(self, memo):
        return self

    def __call__(self, n, context_attn2, value_attn2, extra_options):
        return self.patch.stash_query(n, context_attn2, value_attn2, extra_options)


class _AddContext(_StashQuery):
    def __call__(self, n, extra_options):
        return self.patch.add_context(n, extra_options)

    def models(self):
        return self.patch.models()

    def to(self, device_or_dtype):
        return self


def context_rows(extra_options: dict, batch: int, device) -> torch.Tensor:
    """Rows of a UNet call whose conds-list index gets contexts; each index covers batch/len(chunks) rows."""
    chunks = extra_options.get("cond_or_uncond") or [0]
    with_contexts = extra_options.get(CONTEXT_CONDS, (0,))
    per_chunk = batch // len(chunks)
    rows = [torch.arange(i * per_chunk, (i + 1) * per_chunk) for i, index in enumerate(chunks)
            if index in with_contexts]
    return torch.cat(rows).to(device) if rows else torch.zeros(0, dtype=torch.long, device=device)


# -- building the patch ------------------------------------------------------------------------------------

def ldm_shape(model) -> LdmShape:
    """The block layout of a ComfyUI MODEL's UNet; a clear error for models without one (DiT, Flux...)."""
    config = model.model.model_config.unet_config
    diffusion_model = model.model.diffusion_model
    if not all(k in config for k in ("model_channels", "channel_mult", "num_res_blocks")) or \
            not hasattr(diffusion_model, "input_blocks"):
        raise InstructionError(f"model: {type(model.model).__name__} is not a UNet of the Stable Diffusion "
                               f"family (SD1.x, SD2.x, SDXL); Instruct-Imagen patches those")
    blocks = config["num_res_blocks"]
    levels = len(config["channel_mult"])
    blocks = tuple(blocks) if isinstance(blocks, (list, tuple)) else (blocks,) * levels
    return LdmShape(config["model_channels"], tuple(config["channel_mult"]), blocks)


def compute_dtype(model) -> torch.dtype:
    return model.model.manual_cast_dtype or model.model.get_dtype()


def load_adapter_for(model, adapter_path: str | None, config=None):
    """The adapter for `model`'s UNet: from a file, or fresh (zero-initialised outputs) when None."""
    from ..instruct_core.adapter_io import load_adapter_layers
    from ..instruct_core.context_unet import ContextAdapter, ContextAdapterConfig

    shape = ldm_shape(model)
    layout = ldm_layout(model.model.diffusion_model, shape)
    if adapter_path is None:
        adapter = ContextAdapter(layout, config or ContextAdapterConfig())
    else:
        unet_config = model.model.model_config.unet_config
        facts = ldm_facts(shape, unet_config.get("in_channels"), unet_config.get("context_dim"))
        adapter = load_adapter_layers(adapter_path, layout, facts)
    return adapter.to(dtype=compute_dtype(model)).eval().requires_grad_(False), shape


def encode_context_inputs(model, clip, vae, instruction: MultiModalInstruction, size: tuple[int, int],
                          resize_policy: str, strength: float) -> EncodedContexts:
    """The contexts through the given VAE and CLIP, ready for the UNet's own encoder."""
    contexts = instruction.contexts
    width, height = size
    pixels = torch.stack([
        torch.from_numpy(np.asarray(prepare_context_image(c.image, size, resize_policy).convert("RGB"),
                                    dtype=np.float32) / 255.0) for c in contexts])
    latents = model.model.process_latent_in(vae.encode(pixels)).float().cpu()
    texts, pooled = [], []
    for c in contexts:
        cond, pool = clip.encode_from_tokens(clip.tokenize(c.marker_text), return_pooled=True)
        texts.append(cond.float().cpu())
        pooled.append(None if pool is None else pool.float().cpu())
    label = None
    if getattr(model.model.diffusion_model, "num_classes", None) is not None:  # SDXL: pooled text + sizes
        label = model.model.encode_adm(pooled_output=torch.cat(pooled), width=width, height=height,
                                       target_width=width, target_height=height).float().cpu()
    masks = None
    if any(c.mask is not None for c in contexts):
        masks = torch.stack([
            torch.from_numpy(np.asarray(prepare_mask(c.mask, size, resize_policy), dtype=np.float32) / 255.0)
            if c.mask is not None else torch.ones(height, width) for c in contexts])
    weights = torch.tensor([float(c.weight) * strength for c in contexts])
    return EncodedContexts(latents, cat_text(texts), [c.modality for c in contexts], weights, masks, label)


def text_conditioning(clip, text: str) -> list:
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def apply_instruct_imagen(model, clip, vae, adapter_path: str | None, instruction: MultiModalInstruction,
                          strength: float, size: tuple[int, int], resize_policy: str):
    """(patched MODEL clone, positive, negative): the instruction's contexts attended to by the clone's UNet."""
    if not math.isfinite(strength):
        raise InstructionError(f"strength: {strength} is not a finite number")
    adapter, shape = load_adapter_for(model, adapter_path)
    # Said in the log when the last MODEL holding them is gone: where a leak would show.
    weakref.finalize(adapter, logging.info, "[Instruct-Imagen] released context layers %s", adapter_path or "none")
    instruction.validate(known_modalities=adapter.config.modalities, max_contexts=adapter.config.max_contexts)
    limits.check_contexts(instruction.contexts, *size)
    if instruction.contexts:
        contexts = encode_context_inputs(model, clip, vae, instruction, size, resize_policy, strength)
    else:
        contexts = EncodedContexts(torch.zeros(0), torch.zeros(0), [], torch.zeros(0))
    attention = LdmContextAttention(adapter, model.model.diffusion_model, shape, contexts)
    adapter_patcher = comfy.model_patcher.ModelPatcher(adapter, load_device=model.load_device,
                                                       offload_device=model.offload_device)
    patch = ContextPatch(attention, adapter_patcher)
    patched = model.clone()
    patched.set_model_attn2_patch(_StashQuery(patch))
    patched.set_model_attn2_output_patch(_AddContext(patch))
    patched.model_options["transformer_options"][PATCH] = patch
    patched.add_callback(comfy.patcher_extension.CallbacksMP.ON_PRE_RUN, patch.on_pre_run)
    return patched, text_conditioning(clip, instruction.text), text_conditioning(clip, instruction.negative)


# -- the paper's guidance as a GUIDER ----------------------------------------------------------------------

def instruct_guider(model, positive, negative, config):
    """A GUIDER for SamplerCustomAdvanced with Instruct-Imagen's guidance (instruct_core.guidance) over the
    model's contexts; built here so that this module imports ComfyUI's sampler code only when used."""
    import comfy.samplers

    from ..instruct_core.guidance import branch_parts, branch_weights, step_index

    class InstructGuidance(comfy.samplers.CFGGuider):
        """Each step evaluates only the branches whose weight is not zero, in one batched call: the conds list
        holds the positive or negative text per branch, and the rows of branches with contexts get them."""

        def predict_noise(self, x, timestep, model_options={}, seed=None):
            options = model_options.get("transformer_options", {})
            patch = options.get(PATCH)
            sigmas = options.get("sample_sigmas")
            step, steps = (step_index(sigmas, timestep), len(sigmas) - 1) if sigmas is not None else (0, 1)
            weights = branch_weights(config, step, steps, patch is not None and patch.num_contexts > 0)
            branches = sorted(weights)
            conds = [self.conds.get("positive" if branch_parts(b)[0] else "negative") for b in branches]
            options = comfy.model_patcher.create_model_options_clone(model_options)
            options.setdefault("transformer_options", {})[CONTEXT_CONDS] = tuple(
                i for i, b in enumerate(branches) if branch_parts(b)[1])
            estimates = comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, options)
            return sum(weights[b] * estimate for b, estimate in zip(branches, estimates))

    guider = InstructGuidance(model)
    guider.set_conds(positive, negative)
    return guider
