"""The adapter on a UNet in the LDM layout (the one ComfyUI runs): names mapped to places, adapters loaded
against a host's layout, and the LDM timestep features. The patch itself runs in a real ComfyUI in
tests/nodes/test_comfyui_patch.py."""

import re

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.embeddings import get_timestep_embedding

from instruct_core.adapter_io import AdapterError, load_adapter_layers, save_adapter
from instruct_core.context_unet import (ContextAdapter, ContextAdapterConfig, ContextAugmentedUNet,
                                        base_fingerprint, diffusers_layout)
from instruct_core.ldm_unet import LdmShape, ldm_layer_key, ldm_place, timestep_embedding
from instruct_core.loading import _unet_key, shipped_config_dir
from instruct_core.tiny import tiny_unet


def meta_unet(family: str) -> UNet2DConditionModel:
    folder = shipped_config_dir(family, "epsilon") / "unet"
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(folder)))


def shape_of(unet) -> LdmShape:
    config = unet.config
    channels = config.block_out_channels
    return LdmShape(channels[0], tuple(c // channels[0] for c in channels),
                    (config.layers_per_block,) * len(channels))


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_every_layer_maps_to_its_place_in_the_single_file_layout(family):
    """ldm_place agrees with the key mapping the library writes single files with, and inverts."""
    unet = meta_unet(family)
    shape = shape_of(unet)
    layers = [name for name in unet.attn_processors if name.endswith("attn2.processor")]
    assert layers
    for name in layers:
        key = name.replace(".", "_")
        ldm = _unet_key(name[: -len(".processor")] + ".to_q.weight", shape.num_res_blocks[0], set())
        kind, block, depth = re.fullmatch(r"(input|middle|output)_blocks?\.(\d+)\.1\.transformer_blocks\.(\d+)"
                                          r"\.attn2\.to_q\.weight", ldm.replace("middle_block", "middle_blocks.0")
                                          ).groups()
        place = ((kind, int(block) if kind != "middle" else 0), int(depth))
        assert ldm_place(key, shape) == place
        assert ldm_layer_key(*place, shape) == (key, diffusers_layout(unet).layers[key].level)


def test_a_layer_name_that_is_not_cross_attention_is_refused():
    with pytest.raises(ValueError, match="not a cross-attention layer"):
        ldm_place("down_blocks_1_attentions_0_transformer_blocks_0_attn1_processor", LdmShape(4, (1, 2), (1, 1)))


def test_timestep_features_are_diffusers_flipped_sinusoids():
    steps = torch.tensor([0.0, 1.0, 999.0, 417.5])
    expected = get_timestep_embedding(steps, 320, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert torch.allclose(timestep_embedding(steps, 320), expected, atol=1e-6)


def test_an_adapter_file_loads_against_a_host_layout(tmp_path):
    torch.manual_seed(0)
    unet = tiny_unet()
    model = ContextAugmentedUNet(unet, ContextAdapterConfig())
    with torch.no_grad():
        for param in model.adapter.parameters():
            param.add_(torch.randn_like(param))
    path = save_adapter(model, tmp_path / "a.safetensors")
    facts = {k: base_fingerprint(unet)[k] for k in ("in_channels", "block_out_channels", "cross_attention_dim")}
    loaded = load_adapter_layers(path, diffusers_layout(unet), facts)
    assert isinstance(loaded, ContextAdapter) and loaded.levels == model.adapter.levels
    for key, value in model.adapter.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    other = dict(facts, cross_attention_dim=facts["cross_attention_dim"] * 2)
    with pytest.raises(AdapterError, match="trained for another base UNet.*cross_attention_dim"):
        load_adapter_layers(path, diffusers_layout(unet), other)
