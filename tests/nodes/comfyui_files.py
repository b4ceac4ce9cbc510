"""Small random model files that a real ComfyUI loads as its own: an SD1.5 checkpoint, a LoRA for it in
ComfyUI's key format and a ControlNet for it. Written by the tests into a server's base directory; nothing is
downloaded.

ComfyUI knows an SD1.5 UNet by its 320 base channels and 768-wide text context, and builds the text encoder
and VAE at their full size whatever the file holds: those two stay full size (random), while the UNet keeps
two levels and one block per level, so a sampling step takes milliseconds.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from instruct_bench.speed_comfyui import write_random_checkpoint
from instruct_core.loading import shipped_config_dir

UNET_PREFIX = "model.diffusion_model."
# The smallest UNet that ComfyUI still detects as SD1.5: context attention on the first level and the middle.
SMALL_UNET = {"block_out_channels": [320, 320], "layers_per_block": 1,
              "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
              "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]}


def small_unet(seed: int = 0):
    """The small checkpoint's UNet as a diffusers module (random weights)."""
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(str(shipped_config_dir("sd1", "epsilon") / "unet"))
    torch.manual_seed(seed)
    return UNet2DConditionModel.from_config({**config, **SMALL_UNET})


def write_random_adapter(path: Path, unet, seed: int = 0) -> Path:
    """Context layers for `unet` (a diffusers UNet, or one on the meta device: only its layout is read) whose
    every parameter is non-zero, so that contexts change the picture."""
    from instruct_core.adapter_io import save_adapter
    from instruct_core.context_attention import aligned_position_init
    from instruct_core.context_unet import ContextAdapter, ContextAdapterConfig, ContextAugmentedUNet

    with torch.device(unet.device):
        adapter = ContextAdapter(unet, ContextAdapterConfig())
    if unet.device.type == "meta":
        adapter = adapter.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in adapter.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith(("pos_q.weight", "pos_k.weight")):
                aligned_position_init(param, adapter.layers[name.split(".")[1]].heads)
            elif "norm_context" in name:
                param.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
            elif param.dim() == 2 and "modality" not in name:
                param.copy_(noise / param.shape[1] ** 0.5)
            else:
                param.copy_(0.3 * noise)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_adapter(ContextAugmentedUNet(unet, adapter=adapter), path)


def small_sd15_config(folder: Path) -> Path:
    """The shipped SD1.5 diffusers configs, copied to `folder`, with the small UNet."""
    shutil.copytree(shipped_config_dir("sd1", "epsilon"), folder)
    unet_config = folder / "unet" / "config.json"
    unet_config.write_text(json.dumps({**json.loads(unet_config.read_text()), **SMALL_UNET}, indent=2))
    return folder


def write_small_sd15(path: Path, seed: int = 0) -> Path:
    """A single-file SD1.5 checkpoint with random weights (fp16, about 480 MB, nearly all of it text encoder and VAE)."""
    with tempfile.TemporaryDirectory() as scratch:
        return write_random_checkpoint(path, "sd15", seed=seed, config_dir=small_sd15_config(Path(scratch) / "sd15"))


def _unet_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's UNet weights under their ComfyUI names (without the `model.diffusion_model.` prefix)."""
    with safe_open(str(checkpoint), "pt") as weights:
        return {key[len(UNET_PREFIX):]: weights.get_tensor(key) for key in weights.keys()
                if key.startswith(UNET_PREFIX)}


def write_random_lora(checkpoint: Path, path: Path, rank: int = 4, scale: float = 0.5, seed: int = 0) -> Path:
    """A LoRA on every attention projection of the checkpoint's UNet, in the `lora_unet_<name>` key format
    ComfyUI's LoraLoader reads (the name is ComfyUI's own weight name with dots as underscores). Its up
    weights are not zero, so it changes the picture."""
    generator = torch.Generator().manual_seed(seed)
    lora = {}
    for name, weight in sorted(_unet_state(checkpoint).items()):
        if not (weight.dim() == 2 and ".attn" in name and name.endswith((".to_q.weight", ".to_k.weight",
                                                                          ".to_v.weight", ".to_out.0.weight"))):
            continue
        key = "lora_unet_" + name[:-len(".weight")].replace(".", "_")
        out_features, in_features = weight.shape
        lora[f"{key}.lora_down.weight"] = torch.randn(rank, in_features, generator=generator) / in_features**0.5
        lora[f"{key}.lora_up.weight"] = scale * torch.randn(out_features, rank, generator=generator)
        lora[f"{key}.alpha"] = torch.tensor(float(rank))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.float16) for k, v in lora.items()}, str(path))
    return path


def _conv(out_channels: int, in_channels: int, size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    fan_in = in_channels * size * size
    return {"weight": torch.randn(out_channels, in_channels, size, size, generator=generator) / fan_in**0.5,
            "bias": 0.01 * torch.randn(out_channels, generator=generator)}


def _block_out_channels(unet: dict[str, torch.Tensor], block: int) -> int:
    """Channels an input block hands on: its conv (block 0), downsampler or last resnet's output."""
    for name in (f"input_blocks.{block}.0.weight", f"input_blocks.{block}.0.op.weight",
                 f"input_blocks.{block}.0.out_layers.3.weight"):
        if name in unet:
            return unet[name].shape[0]
    raise KeyError(f"input block {block} has no output layer")


def write_random_controlnet(checkpoint: Path, path: Path, seed: int = 0) -> Path:
    """A ControlNet for the checkpoint in the original (ControlNet 1.x) layout: a copy of the UNet's input and
    middle blocks, the hint encoder ComfyUI builds for it, and zero convolutions that are not zero, so it
    changes the picture."""
    generator = torch.Generator().manual_seed(seed)
    unet = _unet_state(checkpoint)
    controlnet = {name: weight for name, weight in unet.items()
                  if name.startswith(("input_blocks.", "middle_block.", "time_embed."))}
    model_channels = unet["input_blocks.0.0.weight"].shape[0]
    hint_channels = [3, 16, 16, 32, 32, 96, 96, 256, model_channels]  # ComfyUI's cldm input_hint_block
    for index, (channels_in, channels_out) in enumerate(zip(hint_channels, hint_channels[1:])):
        for part, value in _conv(channels_out, channels_in, 3, generator).items():
            controlnet[f"input_hint_block.{2 * index}.{part}"] = value
    blocks = 1 + max(int(name.split(".")[1]) for name in unet if name.startswith("input_blocks."))
    for block in range(blocks):
        channels = _block_out_channels(unet, block)
        for part, value in _conv(channels, channels, 1, generator).items():
            controlnet[f"zero_convs.{block}.0.{part}"] = value
    middle_channels = unet["middle_block.2.out_layers.3.weight"].shape[0]
    for part, value in _conv(middle_channels, middle_channels, 1, generator).items():
        controlnet[f"middle_block_out.0.{part}"] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.float16).contiguous() for k, v in controlnet.items()}, str(path))
    return path
