"""Small models built in code from configs: for tests, benchmarks and the out-of-the-box job.

Weights are seeded random values; everything is offline (the CLIP tokenizer ships with the package).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer


TOKENIZER_DIR = Path(__file__).parent / "configs" / "clip_tokenizer"

TINY_SCHEDULER = {
    "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon",
    "set_alpha_to_one": False, "steps_offset": 1,
}


def tiny_tokenizer(max_length: int = 32) -> CLIPTokenizer:
    tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), local_files_only=True)
    tokenizer.model_max_length = max_length
    return tokenizer


def tiny_text_encoder(hidden_size: int = 32, max_length: int = 32) -> CLIPTextModel:
    config = CLIPTextConfig(vocab_size=49408, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=max_length,
                            projection_dim=hidden_size)
    return CLIPTextModel(config).eval()


def tiny_unet(in_channels: int = 4, sample_size: int = 16, channels=(32, 64), cross_attention_dim: int = 32,
              layers_per_block: int = 1, first_attention_level: int = 0) -> UNet2DConditionModel:
    """Attention at levels first_attention_level .. levels-2 (and the mid block), as SD; pixel-space models
    skip the full-resolution level, where attention is costly and, as in Imagen, little needed."""
    levels = len(channels)
    attends = [first_attention_level <= level < levels - 1 for level in range(levels)]
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
        block_out_channels=tuple(channels), layers_per_block=layers_per_block,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=8,
    )


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8, sample_size=32)


def build_tiny_base(seed: int = 0, pixel_space: bool = True, sample_size: int = 32,
                    prediction_type: str = "epsilon", channels=(32, 64, 64)) -> "BaseModel":
    """A random-weight base: pixel-space (Imagen-like, no VAE) by default, or latent with a tiny VAE."""
    from .loading import BaseModel

    torch.manual_seed(seed)
    text_encoder = tiny_text_encoder()
    vae = None if pixel_space else tiny_vae().eval()
    unet = tiny_unet(in_channels=3 if pixel_space else 4, sample_size=sample_size, channels=channels,
                     first_attention_level=1 if pixel_space else 0).eval()
    return BaseModel(
        unet=unet, vae=vae, text_encoders=[text_encoder], tokenizers=[tiny_tokenizer()],
        scheduler_config=dict(TINY_SCHEDULER, prediction_type=prediction_type), prediction_type=prediction_type,
        kind="custom", vae_scaling_factor=0.18215 if vae is not None else 1.0, source="tiny",
    )


def tiny_super_resolution(seed: int = 0, steps: int = 3, text_width: int = 32):
    """A random-weight super-resolution stage (4x) that reads the tiny base's text embeddings."""
    from .super_resolution import SuperResolution, SuperResolutionConfig

    unet = {"sample_size": 32, "in_channels": 6, "out_channels": 3, "block_out_channels": [16, 32],
            "layers_per_block": 1, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "cross_attention_dim": text_width,
            "attention_head_dim": 8, "norm_num_groups": 8, "class_embed_type": "timestep"}
    return SuperResolution.build(SuperResolutionConfig(unet=unet, steps=steps), seed=seed)
