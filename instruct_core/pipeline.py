"""Glue from an instruction to images: encode once, sample, decode.

    instruction ──encode_instruction──▶ Conditioning (text + ContextState, computed once)
                 ──GuidedDenoiser + sampler──▶ model-space sample ──decode──▶ images in [0, 1]
                 ──super-resolution stage (a cascade such as the bundled model's; optional)──▶ final images
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .adapter_io import load_adapter
from .context_attention import ContextState
from . import limits
from .context_unet import ContextAdapterConfig, ContextAugmentedUNet, levels_with_attention
from .denoiser import DiscreteDenoiser
from .guidance import Conditioning, GuidanceConfig, GuidedDenoiser, cat_text
from .instruction import InstructionError, MultiModalInstruction, check_text, prepare_context_image, prepare_mask
from .loading import BaseModel
from .samplers import SAMPLERS, check_sampler_sigmas, prepare_noise
from .schedules import (DEFAULT_SCHEDULE, SCHEDULES, DiscreteSchedule, denoise_schedule_length, get_sigmas,
                        sigmas_for_denoise)
from .super_resolution import SuperResolution

MAX_PIXELS = limits.LIMITS.max_pixels  # the default; `limits.configure(max_pixels=...)` changes the one in force
# torch generators take seeds in [-2**63, 2**64 - 1]; sampling also uses seed + 1
SEED_RANGE = (-(2**63), 2**64 - 2)


@dataclass
class GenerationResult:
    images: torch.Tensor   # (B, 3, H, W) float in [0, 1], on the CPU: the final images (after super-resolution)
    latents: torch.Tensor  # (B, C, h, w) raw VAE latents (unscaled), or pixels in [-1, 1] for pixel-space models
    seed: int
    info: dict = field(default_factory=dict)
    # the base model's own images, before a super-resolution stage (the same tensor as `images` without one)
    base_images: torch.Tensor | None = None


def pil_to_tensor(image) -> torch.Tensor:
    """PIL image -> float tensor (C, H, W) in [0, 1]."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def tensor_to_pil(image: torch.Tensor):
    """Float tensor (3, H, W) in [0, 1] -> RGB PIL image."""
    from PIL import Image

    array = (image.detach().float().cpu().permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
    return Image.fromarray(array)


def save_png(image, path) -> None:
    """Write a PIL image as PNG through a temporary file, so a reader never sees half an image."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _check_image_batch(field: str, images: torch.Tensor, channels: int, width: int, height: int,
                       batch_size: int) -> None:
    """(1 or batch_size, channels, height, width), or an InstructionError naming `field`."""
    if images.dim() != 4 or images.shape[1] != channels or tuple(images.shape[-2:]) != (height, width):
        raise InstructionError(f"{field}: expected shape (B, {channels}, {height}, {width}), "
                               f"got {tuple(images.shape)}")
    if images.shape[0] not in (1, batch_size):
        raise InstructionError(f"{field}: batch {images.shape[0]} does not match batch {batch_size}")


def start_noise_scale(sigma: float, sigma_max: float) -> float:
    """How much of the seeded noise the first sample holds, as ComfyUI's samplers start: from the top of the
    schedule, sqrt(1 + sigma^2) (the variance-preserving start, so the same seed gives the same picture in
    KSampler); from lower down (img2img), sigma, on top of the image."""
    if math.isclose(sigma, sigma_max, rel_tol=1e-5) or sigma > sigma_max:
        return math.sqrt(1.0 + sigma * sigma)
    return sigma


class MaskedDenoiser:
    """Inpainting with a mask, as ComfyUI's KSampler does it: where `keep` is 1 the sample is held on the
    init image's own noising path (init + sigma * noise), and the model's estimate there is the init."""

    def __init__(self, inner, init: torch.Tensor, noise: torch.Tensor, keep: torch.Tensor):
        self.inner, self.init, self.noise, self.keep = inner, init, noise, keep

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs) -> torch.Tensor:
        sigma_map = sigma.reshape(-1, 1, 1, 1) if torch.is_tensor(sigma) else sigma
        x = x * (1.0 - self.keep) + (self.init + self.noise * sigma_map) * self.keep
        return self.inner(x, sigma, **kwargs) * (1.0 - self.keep) + self.init * self.keep


# How a text longer than the encoder's window is read: in windows joined together, or cut at the window.
LONG_TEXT = ("chunk", "truncate")
MAX_TEXT_WINDOWS = 8  # a longer text is refused: 8 windows are 600 tokens for CLIP


def _text_tokens(tokenizer, texts: list[str]) -> list[list[int]]:
    """Each text's token ids, without start and end tokens and uncut (a long text is read in windows)."""
    return tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False).input_ids


def _count_windows(tokenizer, tokens: list[int]) -> int:
    """How many encoder windows `tokens` need (each holds the window length less its start and end tokens)."""
    room = tokenizer.model_max_length - 2
    count = max(1, -(-len(tokens) // room))
    if count > MAX_TEXT_WINDOWS:
        raise InstructionError(f"text: {len(tokens)} tokens is longer than this model reads "
                               f"({MAX_TEXT_WINDOWS} windows of {room}); shorten it")
    return count


def _window_ids(tokenizer, token_lists: list[list[int]], windows: list[int]) -> torch.Tensor:
    """Token ids, one row per window: each window framed by the start and end tokens and padded."""
    length = tokenizer.model_max_length
    room, rows = length - 2, []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for tokens, count in zip(token_lists, windows):
        for k in range(count):
            row = [tokenizer.bos_token_id, *tokens[k * room:(k + 1) * room], tokenizer.eos_token_id]
            rows.append(row + [pad] * (length - len(row)))
    return torch.tensor(rows, dtype=torch.long)


# What timestep the UNet receives for a sigma between table entries: the nearest integer one, as ComfyUI feeds
# discrete models (the default), or the interpolated fractional one (k-diffusion's way; the bundled model's).
TIMESTEP_MODES = ("nearest", "fractional")


class InstructImagen:
    """A base model (UNet, text encoders, optional VAE) with a context adapter, ready to follow instructions."""

    def __init__(self, base: BaseModel, model: ContextAugmentedUNet, long_text: str = "chunk",
                 timesteps: str = "nearest", super_resolution: SuperResolution | None = None):
        if long_text not in LONG_TEXT:
            raise ValueError(f"long_text: expected one of {', '.join(LONG_TEXT)}, got {long_text!r}")
        if timesteps not in TIMESTEP_MODES:
            raise ValueError(f"timesteps: expected one of {', '.join(TIMESTEP_MODES)}, got {timesteps!r}")
        self.base = base
        self.model = model
        self.schedule = DiscreteSchedule.from_scheduler_config(base.scheduler_config)
        self.long_text = long_text
        self.timesteps = timesteps
        # a cascade's next stage: `sample` runs it on the base's images unless told not to
        self.super_resolution = super_resolution

    @classmethod
    def from_base(cls, base: BaseModel, adapter: str | None = None,
                  adapter_config: ContextAdapterConfig | None = None) -> "InstructImagen":
        if adapter is not None:
            model = load_adapter(adapter, base.unet)
        else:
            model = ContextAugmentedUNet(base.unet, adapter_config).to(device=base.unet.device, dtype=base.unet.dtype)
        return cls(base, model)

    # -- facts -------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def known_modalities(self) -> tuple[str, ...]:
        return tuple(self.model.adapter.config.modalities)

    def weight_modules(self) -> dict[str, torch.nn.Module]:
        """Every module that holds weights, by name: what a host application moves between devices."""
        modules: dict[str, torch.nn.Module] = {"model": self.model}  # the UNet is inside it
        for index, encoder in enumerate(self.base.text_encoders):
            modules[f"text_encoder_{index}"] = encoder
        if self.base.vae is not None:
            modules["vae"] = self.base.vae
        if self.super_resolution is not None:
            modules["super_resolution"] = self.super_resolution.unet
        return modules

    @property
    def max_contexts(self) -> int:
        return self.model.adapter.config.max_contexts

    @property
    def spatial_factor(self) -> int:
        """Pixels per model-space cell: 8 for SD's VAE, 1 for a pixel-space UNet."""
        if self.base.vae is None:
            return 1
        return 2 ** (len(self.base.vae.config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        return self.spatial_factor * 2 ** (self.model.num_levels - 1)

    @property
    def native_size(self) -> int:
        return int(self.base.unet.config.sample_size) * self.spatial_factor

    # -- encoding ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompt embeddings (N, L, D) and, for SDXL-style bases, pooled embeddings (N, P)."""
        return self.embed_text(texts)

    def embed_text(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`encode_text` keeping the graph, for training the text encoders.

        A text longer than the encoder's window is, with `long_text="chunk"` (as ComfyUI encodes prompts),
        split into windows encoded one by one and joined along the sequence, so no word is lost; "truncate"
        drops the tail (as diffusers' pipelines do). Every text in the batch is brought to the same number of
        windows by repeating its own: cross-attention over a repeated sequence equals attention over it once,
        so a short text encodes exactly as it does alone. Pooled embeddings come from the first window.
        """
        for index, text in enumerate(texts):  # bounded before any tokenizer sees it
            if isinstance(text, str):
                check_text(text, f"texts[{index}]")
        chunked = self.long_text == "chunk"
        windows = [1] * len(texts)
        if chunked:  # every encoder reads the first tokenizer's number of windows: SDXL's two share one vocabulary
            first = _text_tokens(self.base.tokenizers[0], texts)
            windows = [_count_windows(self.base.tokenizers[0], tokens) for tokens in first]
        embeddings, pooled = [], None
        use_penultimate = self.base.kind == "sdxl"
        for index, (tokenizer, encoder) in enumerate(zip(self.base.tokenizers, self.base.text_encoders)):
            if chunked:
                ids = _window_ids(tokenizer, first if index == 0 else _text_tokens(tokenizer, texts), windows)
            else:
                ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                                return_tensors="pt").input_ids
            output = encoder(ids.to(encoder.device), output_hidden_states=use_penultimate)
            hidden = output.hidden_states[-2] if use_penultimate else output[0]
            # (sum of windows, L, D) -> per text, its windows side by side; shorter texts repeated by cat_text
            embeddings.append(cat_text([part.reshape(1, -1, part.shape[-1]) for part in hidden.split(windows)]))
            if hasattr(output, "text_embeds"):
                firsts = torch.tensor([0, *np.cumsum(windows)[:-1]], device=hidden.device)
                pooled = output.text_embeds[firsts]
        return torch.cat(embeddings, dim=-1).to(self.dtype), None if pooled is None else pooled.to(self.dtype)

    def token_positions(self, text: str, start: int, end: int) -> list[int]:
        """Where `embed_text([text])` holds the tokens of `text[start:end]`, a span of whole words: their indices
        along the encoded sequence, which frames each window with a start and an end token. Tokens that
        `long_text="truncate"` cuts off are left out, so a span beyond the first window gives []."""
        check_text(text, "text")
        if not 0 <= start < end <= len(text):
            raise InstructionError(f"span: expected 0 <= start < end <= {len(text)}, got {start}, {end}")
        tokenizer = self.base.tokenizers[0]
        # CLIP-style tokenizers split at spaces first: the text before a word tokenizes as it does in the whole
        before, through = (len(tokens) for tokens in _text_tokens(tokenizer, [text[:start], text[:end]]))
        room = tokenizer.model_max_length - 2
        if self.long_text != "chunk":
            through = min(through, room)
        return [i // room * tokenizer.model_max_length + 1 + i % room for i in range(before, through)]

    def added_cond(self, pooled, height: int, width: int) -> dict | None:
        """SDXL's added conditioning (pooled text + size time ids) for `height` x `width`; None for other bases."""
        if pooled is None or self.base.unet.config.addition_embed_type != "text_time":
            return None
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=self.device, dtype=self.dtype)
        return {"text_embeds": pooled, "time_ids": time_ids.expand(pooled.shape[0], -1)}

    @torch.no_grad()
    def to_model_space(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) images in [0, 1] -> scaled VAE latents, or pixels in [-1, 1]."""
        pixels = images.to(self.device) * 2 - 1
        vae = self.base.vae
        if vae is None:
            return pixels.to(self.dtype)
        latents = vae.encode(pixels.to(vae.dtype)).latent_dist.mean
        return (latents * self.base.vae_scaling_factor).to(self.dtype)

    @torch.no_grad()
    def to_images(self, sample: torch.Tensor) -> torch.Tensor:
        vae = self.base.vae
        if vae is None:
            pixels = sample.float()
        else:
            upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
            decoder = vae.to(torch.float32) if upcast else vae
            # one image at a time: the decoder's full-resolution activations are the largest tensors of a call
            pixels = torch.cat([decoder.decode(row.to(decoder.dtype) / self.base.vae_scaling_factor).sample.float()
                                for row in sample.split(1)])
            if upcast:
                vae.to(torch.float16)
        return ((pixels + 1) / 2).clamp(0, 1).cpu()

    def check_size(self, width: int, height: int, batch_size: int) -> None:
        limits.check_canvas(width, height, batch_size)
        multiple = self.size_multiple
        for name, value in (("width", width), ("height", height)):
            if value % multiple:
                raise InstructionError(f"{name}: {value} must be a positive multiple of {multiple} for this model")

    def model_facts(self) -> limits.ModelFacts:
        vae = self.base.vae
        return limits.ModelFacts.of_unet(
            self.base.unet, levels_with_attention(self.base.unet), spatial_factor=self.spatial_factor,
            vae_channels=0 if vae is None else vae.config.block_out_channels[0], dtype=self.dtype,
            device=self.device)

    def check_memory(self, width: int, height: int, rows: int, branches: int, contexts: int = 0,
                     context_size: tuple[int, int] | None = None, field: str = "batch") -> None:
        """Refuse, naming `field`, a request whose estimated peak memory is over the limit (see `limits`)."""
        context_width, context_height = context_size or (width, height)
        cells = (context_width // self.spatial_factor) * (context_height // self.spatial_factor)
        needed = limits.estimate_generation_bytes(self.model_facts(), width, height, rows, branches, contexts,
                                                  cells)
        images = f"{rows} image{'s' if rows != 1 else ''} of {width}x{height}"
        what = f"{images} with {contexts} context{'s' if contexts != 1 else ''}" if contexts else images
        limits.check_memory(field, needed, what)

    @torch.no_grad()
    def encode_instruction(self, instruction: MultiModalInstruction, context_size: tuple[int, int] | None = None,
                           resize_policy: str = "crop") -> Conditioning:
        """Encode text and contexts once (one row); the result serves every step of every sample.

        Contexts are brought to `context_size` (width, height; default: the model's native size). Attention
        uses normalised positions, so the conditioning serves any output size.
        """
        instruction.validate(known_modalities=self.known_modalities, max_contexts=self.max_contexts)
        width, height = context_size or (self.native_size, self.native_size)
        limits.check_contexts(instruction.contexts, width, height)
        self.check_size(width, height, 1)
        self.check_memory(width, height, 1, 1, len(instruction.contexts), field="contexts")
        text, pooled = self.encode_text([instruction.text, instruction.negative])
        cond = Conditioning(text=text[:1], null_text=text[1:])
        if pooled is not None:
            cond.added_text, cond.added_null = {"text_embeds": pooled[:1]}, {"text_embeds": pooled[1:]}
        if instruction.contexts:
            cond.context_state = self._encode_contexts(instruction, width, height, resize_policy)
        return cond

    def _encode_contexts(self, instruction, width, height, resize_policy) -> ContextState:
        contexts = instruction.contexts
        images = torch.stack([pil_to_tensor(prepare_context_image(c.image, (width, height), resize_policy))
                              for c in contexts])
        marker_embeds, marker_pooled = self.encode_text([c.marker_text for c in contexts])
        features = self.model.encode_contexts(
            self.to_model_space(images), marker_embeds, [c.modality for c in contexts],
            added_cond_kwargs=self.added_cond(marker_pooled, height, width))
        masks = None
        if any(c.mask is not None for c in contexts):
            masks = torch.stack([
                pil_to_tensor(prepare_mask(c.mask, (width, height), resize_policy))[0] if c.mask is not None
                else torch.ones(height, width) for c in contexts]).to(self.device)
        weights = torch.tensor([float(c.weight) for c in contexts], device=self.device)
        return ContextState.from_encoded(features, [list(range(len(contexts)))], weights, masks)

    # -- sampling ----------------------------------------------------------------------------------------
    def denoiser(self) -> DiscreteDenoiser:
        def model_fn(x_in, t, cond):
            return self.model(x_in.to(self.dtype), t.to(self.device), cond.text, cond.context_state,
                              cond.added_cond_kwargs).float()
        return DiscreteDenoiser(model_fn, self.schedule, self.base.prediction_type,
                                quantize=self.timesteps == "nearest")

    @torch.no_grad()
    def generate(self, instruction: MultiModalInstruction, *, width: int | None = None,
                 height: int | None = None, resize_policy: str = "crop", **sample_args) -> GenerationResult:
        """Follow `instruction`: encode it once at the output size, then `sample` (see there for arguments)."""
        width = self.native_size if width is None else width
        height = self.native_size if height is None else height
        self.check_size(width, height, 1)
        batch_size = sample_args.get("batch_size", 1)
        self.check_size(width, height, limits.require_int("batch", batch_size, 1, limits.LIMITS.max_batch))
        contexts = len(instruction.contexts)
        self.check_memory(width, height, batch_size, 4 if contexts else 2, contexts)
        cond = self.encode_instruction(instruction, (width, height), resize_policy)
        return self.sample(cond, width=width, height=height, **sample_args)

    @torch.no_grad()
    def sample(self, cond: Conditioning, *, seed: int = 0, steps: int = 20, sampler: str = "dpmpp_2m",
               schedule: str = DEFAULT_SCHEDULE, guidance: GuidanceConfig | None = None, width: int | None = None,
               height: int | None = None, batch_size: int = 1, init_image: torch.Tensor | None = None,
               denoise: float = 1.0, mask: torch.Tensor | None = None,
               callback: Callable[[dict], None] | None = None, upscale: bool = True) -> GenerationResult:
        """Sample `batch_size` images per conditioning row. `init_image` (B or 1, 3, H, W) in [0, 1] with
        `denoise` < 1 is img2img; with `mask` (B or 1, 1, H, W) in [0, 1], only where the mask is 1 is
        regenerated and the rest keeps `init_image` (inpainting). `callback(info)` runs after every step and
        may raise SamplingCancelled. With a super-resolution stage (`self.super_resolution`) and `upscale`,
        the images are the stage's (factor times the size; `base_images` and `latents` stay at the base size)."""
        width = self.native_size if width is None else width
        height = self.native_size if height is None else height
        self._check_sample_arguments(cond, seed, steps, sampler, schedule, denoise, init_image is not None,
                                     batch_size, guidance)
        total = cond.num_rows * batch_size
        self.check_size(width, height, total)
        if not isinstance(upscale, bool):
            raise InstructionError(f"upscale: expected True or False, got {upscale!r}")
        stage = self.super_resolution if upscale else None
        if stage is not None:
            stage.check_output_size(width, height, total)
        contexts = cond.context_state.max_contexts if cond.has_contexts else 0
        self.check_memory(width, height, total, 4 if contexts else 2, contexts)
        cond = self._with_size(cond.repeat_rows(batch_size), width, height)
        sigmas = self._sigmas(steps, schedule, denoise if init_image is not None else 1.0)
        try:
            check_sampler_sigmas(sampler, sigmas)
        except ValueError as error:
            raise InstructionError(f"{error} (schedule {schedule}, {steps} steps)") from None
        shape = (total, self.base.unet.config.in_channels, height // self.spatial_factor, width // self.spatial_factor)
        noise = prepare_noise(shape, seed).to(self.device)
        x = noise * start_noise_scale(float(sigmas[0]), self.schedule.sigma_max)
        init = None
        if init_image is not None:
            init = self._init_sample(init_image, width, height, total)
            x = x + init
        elif mask is not None:
            raise InstructionError("mask: needs an init image (the pixels to keep)")
        generator = torch.Generator("cpu").manual_seed(seed + 1)
        guided = GuidedDenoiser(self.denoiser(), cond, guidance or GuidanceConfig(), sigmas)
        if mask is not None:
            keep = 1.0 - self._latent_mask(mask, width, height, total, shape[-2:])
            guided = MaskedDenoiser(guided, init, noise, keep)
        sample = SAMPLERS[sampler](guided, x, sigmas.to(self.device), callback=callback, generator=generator)
        if mask is not None:
            sample = sample * (1.0 - keep) + init * keep
        if not bool(torch.isfinite(sample).all()):
            raise InstructionError(f"result: sampling gave NaN or infinite values (sampler {sampler}, schedule "
                                   f"{schedule}, {steps} steps, guidance {guidance or GuidanceConfig()}); nothing "
                                   f"was decoded")
        latents = sample.float() / (self.base.vae_scaling_factor if self.base.vae is not None else 1.0)
        info = {"steps": len(sigmas) - 1, "sampler": sampler, "schedule": schedule}
        base_images = images = self.to_images(sample)
        if stage is not None:
            images = stage.upscale(base_images, cond.text, seed=seed)
            info["super_resolution"] = {"factor": stage.factor, "steps": stage.config.steps,
                                        "noise_level": stage.config.noise_level, "denoise": stage.config.denoise}
        return GenerationResult(images, latents.cpu(), seed, info, base_images)

    @staticmethod
    def _check_sample_arguments(cond, seed, steps, sampler, schedule, denoise, with_init, batch_size,
                                guidance) -> None:
        """Every sampling argument well typed and within the limits, before anything is allocated."""
        if not isinstance(cond, Conditioning):
            raise InstructionError(f"cond: expected a Conditioning, got {type(cond).__name__}")
        limits.require_int("seed", seed, *SEED_RANGE)
        if sampler not in SAMPLERS:
            raise InstructionError(f"sampler: {sampler!r} is not one of {', '.join(SAMPLERS)}")
        if schedule not in SCHEDULES:
            raise InstructionError(f"schedule: {schedule!r} is not one of {', '.join(SCHEDULES)}")
        limits.require_int("steps", steps, 1, limits.LIMITS.max_steps)
        limits.require_number("denoise", denoise, 0.0, 1.0, low_open=True)
        if with_init and denoise <= 0.9999:
            try:
                denoise_schedule_length(steps, denoise)
            except ValueError as error:
                raise InstructionError(str(error)) from None
        limits.require_int("batch", batch_size, 1, limits.LIMITS.max_batch)
        if guidance is not None:
            if not isinstance(guidance, GuidanceConfig):
                raise InstructionError(f"guidance: expected a GuidanceConfig, got {type(guidance).__name__}")
            limits.check_guidance_scale("guidance text_scale", guidance.text_scale)
            limits.check_guidance_scale("guidance context_scale", guidance.context_scale)

    def _with_size(self, cond: Conditioning, width: int, height: int) -> Conditioning:
        """Add SDXL's size conditioning (time ids) for this output size."""
        if cond.added_text is None or self.base.unet.config.addition_embed_type != "text_time":
            return cond
        with_ids = lambda added: self.added_cond(added["text_embeds"], height, width)
        return Conditioning(cond.text, cond.null_text, cond.context_state, with_ids(cond.added_text),
                            with_ids(cond.added_null))

    def _sigmas(self, steps: int, schedule: str, denoise: float) -> torch.Tensor:
        if denoise >= 1.0:
            return get_sigmas(self.schedule, steps, schedule).float()
        return sigmas_for_denoise(lambda n: get_sigmas(self.schedule, n, schedule), steps, denoise).float()

    def _latent_mask(self, mask: torch.Tensor, width: int, height: int, batch_size: int, latent_size) -> torch.Tensor:
        _check_image_batch("mask", mask, 1, width, height, batch_size)
        if not torch.isfinite(mask).all():
            raise InstructionError("mask: holds NaN or infinite values")
        mask = torch.nn.functional.interpolate(mask.float().clamp(0, 1), size=tuple(latent_size), mode="area")
        return mask.to(self.device).expand(batch_size, -1, -1, -1)

    def _init_sample(self, init_image: torch.Tensor, width: int, height: int, batch_size: int) -> torch.Tensor:
        _check_image_batch("init_image", init_image, 3, width, height, batch_size)
        sample = self.to_model_space(init_image).float()
        return sample.expand(batch_size, -1, -1, -1)


def save_images(images, out: Path) -> list[Path]:
    """Write (B, 3, H, W) images in [0, 1] as PNGs; atomic per file so a reader never sees half an image."""
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if images.shape[0] == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}")
                                                  for i in range(images.shape[0])]
    for image, path in zip(images, paths):
        save_png(tensor_to_pil(image), path)
    return paths
