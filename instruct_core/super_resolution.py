"""Super-resolution stage of the cascade: a small pixel-space diffusion model, as in Imagen.

    base output (h x w, in [0, 1]) --noise augmentation at `noise_level`--> upsampled, concatenated to the noisy
    high-resolution sample --UNet(text, noise level)--> factor*h x factor*w
    (a `residual` stage diffuses the difference from the bicubic-upsampled base output, and adds it back)

The low-resolution input is corrupted with the diffusion's own forward process at timestep `noise_level`
(noise-conditioning augmentation, Ho et al. 2021 / Saharia et al. 2022), and the model is told that level through
its class embedding, so at sampling time it can be asked to trust the input less or more. The text comes from
the base model's text encoder (the embeddings the base was sampled with), so the stage adds no encoder of its own.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import limits
from .context_unet import levels_with_attention
from .denoiser import DiscreteDenoiser
from .errors import InstructImagenError, MissingFileError
from .samplers import SAMPLERS, prepare_noise
from .schedules import SCHEDULES, DiscreteSchedule, get_sigmas, sigmas_for_denoise

SUPER_RESOLUTION_WEIGHTS = "super_resolution.safetensors"
SUPER_RESOLUTION_CONFIG = "super_resolution.json"

# Attention only at the coarsest level: at full resolution it would cost most of the time and, as in
# Imagen's super-resolution models, the text matters there least. Cross-attention only (no self-attention, and
# no middle block, whose attention would be self-attention), as there too: the stage trains on crops and samples
# whole images, and self-attention over a crop's few positions does not carry over to a whole image's many.
DEFAULT_UNET = {
    "sample_size": 128,
    "in_channels": 6,
    "out_channels": 3,
    "block_out_channels": [32, 64, 96, 128],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 64,
    "attention_head_dim": 32,
    "norm_num_groups": 32,
    "class_embed_type": "timestep",
    "only_cross_attention": True,
    "mid_block_type": None,
}
DEFAULT_SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
                     "prediction_type": "v_prediction"}


class SuperResolutionError(InstructImagenError, ValueError):
    """A super-resolution request or file that cannot be used; the message names what is wrong."""


@dataclass
class SuperResolutionConfig:
    """Architecture and sampling defaults of a super-resolution stage (stored beside its weights)."""

    factor: int = 4
    unet: dict = field(default_factory=lambda: dict(DEFAULT_UNET))
    scheduler: dict = field(default_factory=lambda: dict(DEFAULT_SCHEDULER))
    # sampling defaults: what the published figures were measured with (3 steps keep the stage within the base's
    # own sampling time on a CPU; more drew no better edges on the training split)
    steps: int = 3
    sampler: str = "dpmpp_2m"
    schedule: str = "karras_capped"
    noise_level: int = 100
    # below 1: start from the upsampled base image noised to that part of the schedule (as img2img), so every
    # step is spent on the fine detail the base image lacks; from pure noise (1.0) the bundled stage drew grain
    # and broken rims, at 0.3 and 0.5 it measured alike (training split; CHANGELOG.md)
    denoise: float = 0.3
    # the largest augmentation level seen in training; a request above it is refused
    max_noise_level: int = 350
    # diffuse the difference from the bicubic-upsampled input rather than the image: the stage then only has
    # to learn the detail bicubic misses, and where it has learned little it leaves bicubic's image as it is
    residual: bool = False
    # a residual stage diffuses the difference times this: about an image's spread over the difference's, so
    # the noise schedule, made for images, does not bury the difference at the first steps of noise
    residual_scale: float = 1.0

    def __post_init__(self):
        if not (isinstance(self.residual_scale, (int, float)) and self.residual_scale > 0):
            raise SuperResolutionError(f"super-resolution config: residual_scale must be a number above 0, got "
                                       f"{self.residual_scale!r}")

    @classmethod
    def from_dict(cls, data: dict) -> "SuperResolutionConfig":
        known = {name for name in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SuperResolutionError(f"super-resolution config: unknown fields {', '.join(unknown)}")
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)


class SuperResolution:
    """A trained super-resolution UNet with its noise schedule; `upscale` runs the stage."""

    def __init__(self, unet, config: SuperResolutionConfig):
        self.unet = unet
        self.config = config
        self.schedule = DiscreteSchedule.from_scheduler_config(config.scheduler)

    @classmethod
    def build(cls, config: SuperResolutionConfig | None = None, seed: int = 0) -> "SuperResolution":
        """A freshly initialised (seeded) stage of `config`'s architecture."""
        from diffusers import UNet2DConditionModel

        config = config or SuperResolutionConfig()
        torch.manual_seed(seed)
        return cls(UNet2DConditionModel(**config.unet).eval(), config)

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> "SuperResolution":
        """The stage stored in `folder` (`super_resolution.json` + `super_resolution.safetensors`)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        for path in (folder / SUPER_RESOLUTION_CONFIG, folder / SUPER_RESOLUTION_WEIGHTS):
            if not path.is_file():
                raise MissingFileError(f"super-resolution stage: {path} is missing")
        config = SuperResolutionConfig.from_dict(json.loads((folder / SUPER_RESOLUTION_CONFIG).read_text()))
        stage = cls.build(config)
        tensors = {name: value.float() for name, value in load_file(str(folder / SUPER_RESOLUTION_WEIGHTS)).items()}
        try:
            missing, unexpected = stage.unet.load_state_dict(tensors, strict=False)
        except RuntimeError as error:  # shapes that differ
            missing, unexpected = [str(error).splitlines()[1].strip() if "\n" in str(error) else str(error)], []
        if missing or unexpected:
            raise SuperResolutionError(f"super-resolution stage: {folder / SUPER_RESOLUTION_WEIGHTS} does not match "
                                       f"its config ({len(missing)} weights missing or of another shape, "
                                       f"{len(unexpected)} unexpected; first: {(missing + unexpected)[0]})")
        stage.unet.to(device)
        return stage

    def save(self, folder: str | Path, metadata: dict | None = None) -> None:
        """Weights (fp16) and config into `folder`, each through a temporary file."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        weights = {name: value.detach().to("cpu", torch.float16).contiguous()
                   for name, value in self.unet.state_dict().items()}
        temporary = folder / (SUPER_RESOLUTION_WEIGHTS + ".tmp")
        save_file(weights, str(temporary), metadata={k: str(v) for k, v in (metadata or {}).items()})
        temporary.replace(folder / SUPER_RESOLUTION_WEIGHTS)
        temporary = folder / (SUPER_RESOLUTION_CONFIG + ".tmp")
        temporary.write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        temporary.replace(folder / SUPER_RESOLUTION_CONFIG)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def factor(self) -> int:
        return self.config.factor

    def model_facts(self) -> limits.ModelFacts:
        return limits.ModelFacts.of_unet(self.unet, levels_with_attention(self.unet), spatial_factor=1,
                                         vae_channels=0, dtype=self.dtype, device=self.device)

    # -- the model as the samplers and the trainer see it ----------------------------------------------------
    def augment(self, low: torch.Tensor, noise_level: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Low-resolution pixels in [-1, 1] through the forward process to `noise_level` (per row), upsampled."""
        alpha = self.schedule.alphas_cumprod.to(low.device, torch.float32)[noise_level.long()]
        alpha = alpha.reshape(-1, 1, 1, 1)
        noisy = alpha.sqrt() * low + (1 - alpha).sqrt() * noise
        size = (low.shape[-2] * self.factor, low.shape[-1] * self.factor)
        return F.interpolate(noisy, size=size, mode="bilinear", align_corners=False)

    def anchor(self, low: torch.Tensor) -> torch.Tensor:
        """Clean low-resolution pixels in [-1, 1], upsampled bicubically: what a residual stage adds its sample
        to, and where a partial denoise of an image stage starts."""
        size = (low.shape[-2] * self.factor, low.shape[-1] * self.factor)
        return F.interpolate(low, size=size, mode="bicubic", align_corners=False).clamp(-1, 1)

    def model_output(self, x_in: torch.Tensor, t: torch.Tensor, low: torch.Tensor, noise_level: torch.Tensor,
                     text: torch.Tensor) -> torch.Tensor:
        """The UNet's raw prediction for the scaled noisy sample `x_in` at timesteps `t`, given the augmented,
        upsampled low-resolution image `low`."""
        dtype = self.dtype
        return self.unet(torch.cat([x_in, low], dim=1).to(dtype), t.to(self.device),
                         encoder_hidden_states=text.to(dtype), class_labels=noise_level.to(self.device)).sample

    def training_loss(self, low: torch.Tensor, high: torch.Tensor, text: torch.Tensor,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """v-prediction MSE for one batch: `low` (B, 3, h, w) and `high` (B, 3, factor*h, factor*w) in [-1, 1],
        `text` (B, L, D) embeddings; timesteps and augmentation levels uniform, the latter up to max_noise_level."""
        rows = high.shape[0]
        draw = lambda *shape: torch.randn(shape, generator=generator).to(high.device)
        timesteps = torch.randint(0, self.schedule.num_timesteps, (rows,), generator=generator).to(high.device)
        levels = torch.randint(0, self.config.max_noise_level + 1, (rows,), generator=generator).to(high.device)
        augmented = self.augment(low, levels, draw(*low.shape))
        alpha = self.schedule.alphas_cumprod.to(high.device, torch.float32)[timesteps].reshape(-1, 1, 1, 1)
        if self.config.residual:
            high = (high - self.anchor(low)) * self.config.residual_scale
        noise = draw(*high.shape)
        noisy = alpha.sqrt() * high + (1 - alpha).sqrt() * noise
        target = alpha.sqrt() * noise - (1 - alpha).sqrt() * high
        prediction = self.model_output(noisy, timesteps, augmented, levels, text)
        return F.mse_loss(prediction.float(), target)

    # -- sampling ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def upscale(self, images: torch.Tensor, text: torch.Tensor, *, seed: int = 0, steps: int | None = None,
                sampler: str | None = None, schedule: str | None = None, noise_level: int | None = None,
                denoise: float | None = None, callback=None) -> torch.Tensor:
        """(B, 3, h, w) images in [0, 1] and their text embeddings (B or 1, L, D) -> (B, 3, factor*h,
        factor*w) in [0, 1], on the CPU. Unset sampling arguments take the stage's measured defaults."""
        config = self.config
        steps = config.steps if steps is None else steps
        sampler = sampler or config.sampler
        schedule = schedule or config.schedule
        noise_level = config.noise_level if noise_level is None else noise_level
        denoise = config.denoise if denoise is None else denoise
        self.check_request(images, text, steps, sampler, schedule, noise_level)
        limits.require_number("super-resolution denoise", denoise, 0.0, 1.0, low_open=True)
        rows, _, height, width = images.shape
        text = text.expand(rows, -1, -1) if text.shape[0] == 1 else text
        levels = torch.full((rows,), int(noise_level), device=self.device)
        generator = torch.Generator("cpu").manual_seed(int(seed) + 2)
        low = images.to(self.device, torch.float32) * 2 - 1
        augmented = self.augment(low, levels, prepare_noise(low.shape, generator).to(self.device))
        cond = {"low": augmented, "noise_level": levels, "text": text.to(self.device)}
        denoiser = DiscreteDenoiser(lambda x_in, t, **kw: self.model_output(x_in, t, **kw).float(), self.schedule,
                                    config.scheduler["prediction_type"])
        full = lambda count: get_sigmas(self.schedule, count, schedule)
        sigmas = (full(steps) if denoise >= 1.0 else sigmas_for_denoise(full, steps, denoise)).float().to(self.device)
        shape = (rows, 3, height * self.factor, width * self.factor)
        noise = prepare_noise(shape, generator).to(self.device)
        anchor = self.anchor(low)
        if denoise >= 1.0:
            x = noise * float((sigmas[0] ** 2 + 1).sqrt())
        else:  # a residual stage starts from no difference, an image stage from the upsampled image
            x = (0 if config.residual else anchor) + noise * float(sigmas[0])
        sample = SAMPLERS[sampler](denoiser, x, sigmas, extra_args=cond, callback=callback, generator=generator)
        if config.residual:
            sample = anchor + sample / config.residual_scale
        if not bool(torch.isfinite(sample).all()):
            raise SuperResolutionError("super-resolution: sampling gave NaN or infinite values")
        return ((sample.float() + 1) / 2).clamp(0, 1).cpu()

    def check_request(self, images, text, steps, sampler, schedule, noise_level) -> None:
        """Every argument of `upscale` checked, naming the one that is wrong, before anything is allocated."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            raise SuperResolutionError(f"super-resolution images: expected (B, 3, H, W), got "
                                       f"{tuple(getattr(images, 'shape', ()))}")
        if not isinstance(text, torch.Tensor) or text.dim() != 3 or text.shape[0] not in (1, images.shape[0]):
            raise SuperResolutionError(f"super-resolution text: expected (1 or {images.shape[0]}, L, D) embeddings, "
                                       f"got {tuple(getattr(text, 'shape', ()))}")
        if text.shape[-1] != self.unet.config.cross_attention_dim:
            raise SuperResolutionError(f"super-resolution text: embeddings of width {text.shape[-1]}, this stage "
                                       f"reads {self.unet.config.cross_attention_dim} (a text encoder of another "
                                       f"model)")
        limits.require_int("super-resolution steps", steps, 1, limits.LIMITS.max_steps)
        if sampler not in SAMPLERS:
            raise SuperResolutionError(f"super-resolution sampler: {sampler!r} is not one of {', '.join(SAMPLERS)}")
        if schedule not in SCHEDULES:
            raise SuperResolutionError(f"super-resolution schedule: {schedule!r} is not one of "
                                       f"{', '.join(SCHEDULES)}")
        limits.require_int("super-resolution noise level", noise_level, 0, self.config.max_noise_level)
        self.check_output_size(images.shape[-1], images.shape[-2], images.shape[0])

    def check_output_size(self, width: int, height: int, rows: int) -> None:
        """Refuse base images whose upscaled size, or the memory the stage needs for it, is over the limits,
        before the base samples them."""
        out_width, out_height = width * self.factor, height * self.factor
        try:
            limits.check_canvas(out_width, out_height, rows)
            # no guidance and no contexts: one branch of the stage's UNet at the upscaled size
            needed = limits.estimate_generation_bytes(self.model_facts(), out_width, out_height, rows, 1, 0, 0)
            limits.check_memory("memory", needed, f"super-resolution of {rows} image{'s' if rows != 1 else ''} "
                                                  f"to {out_width}x{out_height}")
        except InstructImagenError as error:
            raise SuperResolutionError(f"upscale: {width}x{height} base images become {out_width}x{out_height} "
                                       f"after super-resolution, over the limits ({error}); ask for a smaller size "
                                       f"or skip the stage (upscale off)") from None
