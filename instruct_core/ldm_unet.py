"""Context attention on a UNet in the original LDM (CompVis) layout, the one ComfyUI and single-file
checkpoints use: `input_blocks`, `middle_block`, `output_blocks`, `time_embed`.

The adapter names its layers after diffusers' processors (`down_blocks_1_attentions_0_transformer_blocks_0_
attn2_processor`); here they are mapped to the LDM places (`("input", 4)`, transformer block 0), so one
adapter file serves both. Nothing here imports a host application: the host hands over its UNet module,
its layout numbers and, per cross-attention call, where it is and its query input.

    LdmContextAttention.output(place, block_index, query, rows, query_hw) -> (rows', addition)

The contexts run once through the UNet's own input blocks and middle block (the shared encoder), lazily on
the first call that needs them, and the features are kept for every later step and batch row.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from .context_attention import ContextState, context_attention
from .context_unet import BaseLayer, BaseLayout, ContextAdapter

_LAYER_KEY = re.compile(r"^(?:down_blocks_(\d+)_attentions_(\d+)|mid_block_attentions_0|up_blocks_(\d+)_attentions_(\d+))"
                        r"_transformer_blocks_(\d+)_attn2_processor$")


@dataclass(frozen=True)
class LdmShape:
    """The numbers that fix an LDM UNet's block layout (its config's names)."""

    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: tuple[int, ...]  # per level

    @property
    def num_levels(self) -> int:
        return len(self.channel_mult)

    def first_input_block(self, level: int) -> int:
        """Index in input_blocks of the level's first resnet (block 0 is the input conv; each level ends
        with a downsampler)."""
        return 1 + sum(n + 1 for n in self.num_res_blocks[:level])

    def first_output_block(self, up_index: int) -> int:
        return sum(n + 1 for n in self.num_res_blocks[::-1][:up_index])

    def level_channels(self, level: int) -> int:
        return self.model_channels * self.channel_mult[level]


def ldm_place(key: str, shape: LdmShape) -> tuple[tuple[str, int], int]:
    """The LDM place of an adapter layer: ((block kind, block id), transformer block index), as ComfyUI's
    `transformer_options["block"]` and `["block_index"]` name it."""
    match = _LAYER_KEY.match(key)
    if match is None:
        raise ValueError(f"adapter layer {key!r} is not a cross-attention layer of a UNet")
    down, down_attn, up, up_attn, depth = match.groups()
    if down is not None:
        return ("input", shape.first_input_block(int(down)) + int(down_attn)), int(depth)
    if up is not None:
        return ("output", shape.first_output_block(int(up)) + int(up_attn)), int(depth)
    return ("middle", 0), int(depth)


def ldm_layer_key(place: tuple[str, int], depth: int, shape: LdmShape) -> tuple[str, int]:
    """The adapter key and resolution level of the cross-attention at an LDM place (inverse of ldm_place)."""
    kind, block = place
    if kind == "middle":
        return f"mid_block_attentions_0_transformer_blocks_{depth}_attn2_processor", shape.num_levels - 1
    counts = shape.num_res_blocks if kind == "input" else shape.num_res_blocks[::-1]
    start = 1 if kind == "input" else 0
    for index, count in enumerate(counts):
        if block < start + count + (kind == "output"):
            prefix = "down_blocks" if kind == "input" else "up_blocks"
            level = index if kind == "input" else shape.num_levels - 1 - index
            return f"{prefix}_{index}_attentions_{block - start}_transformer_blocks_{depth}_attn2_processor", level
        start += count + 1
    raise ValueError(f"{kind} block {block} is outside this UNet")


def _transformer_blocks(module):
    """The transformer blocks of an LDM block's spatial transformer (its module 1), or none."""
    if len(module) < 2 or not hasattr(module[1], "transformer_blocks"):
        return []
    return list(module[1].transformer_blocks)


def ldm_layout(diffusion_model, shape: LdmShape) -> BaseLayout:
    """The BaseLayout of an LDM UNet module: every transformer block's cross-attention (`attn2`)."""
    places = [(("input", i), block) for i, block in enumerate(diffusion_model.input_blocks)]
    places.append((("middle", 0), diffusion_model.middle_block))
    places += [(("output", i), block) for i, block in enumerate(diffusion_model.output_blocks)]
    layers = {}
    for place, block in places:
        for depth, transformer in enumerate(_transformer_blocks(block)):
            attn = getattr(transformer, "attn2", None)
            if attn is None:
                continue
            key, level = ldm_layer_key(place, depth, shape)
            layers[key] = BaseLayer(level, attn.to_q.in_features, attn.to_q.out_features,
                                    attn.to_out[0].out_features, attn.heads, attn.to_q.weight)
    time_dim = diffusion_model.time_embed[-1].out_features
    return BaseLayout(layers, [shape.level_channels(level) for level in range(shape.num_levels)], time_dim)


def ldm_facts(shape: LdmShape, in_channels: int, context_dim: int) -> dict:
    """The base facts an adapter file records (context_unet.FINGERPRINT_KEYS) that an LDM layout fixes."""
    return {"in_channels": in_channels, "block_out_channels": [shape.level_channels(level)
                                                              for level in range(shape.num_levels)],
            "layers_per_block": shape.num_res_blocks[0] if len(set(shape.num_res_blocks)) == 1
            else list(shape.num_res_blocks), "cross_attention_dim": context_dim}


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """The LDM UNet's sinusoidal timestep features, cosines first."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
                      / half)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


@torch.no_grad()
def encode_contexts(diffusion_model, shape: LdmShape, adapter: ContextAdapter, latents: torch.Tensor,
                    text: torch.Tensor, modalities: list[str], label: torch.Tensor | None = None
                    ) -> dict[int, torch.Tensor]:
    """Run N context latents (model space) through the UNet's own input blocks and middle block at the
    adapter's encode timestep, each with its modality embedding added to the time embedding and its marker
    text as cross-attention context: level -> (N, C, h, w) features, as ContextAugmentedUNet.encode_contexts
    computes them on a diffusers UNet. `label` is the class/ADM vector of models that take one (SDXL)."""
    ids = torch.tensor([adapter.modality_index(m) for m in modalities], device=latents.device)
    timesteps = torch.full((latents.shape[0],), adapter.config.encode_timestep, device=latents.device)
    features_of = timestep_embedding(timesteps, diffusion_model.model_channels).to(latents.dtype)
    emb = diffusion_model.time_embed(features_of)
    emb = emb + adapter.modality_embedding(ids).to(emb.dtype)
    if label is not None:
        emb = emb + diffusion_model.label_emb(label)
    lowest = shape.num_levels - 1
    wanted = {shape.first_input_block(level) + shape.num_res_blocks[level] - 1: level
              for level in adapter.levels if level != lowest}
    features, h = {}, latents
    # No patches in the options below: contexts never attend to contexts.
    for index, block in enumerate(diffusion_model.input_blocks):
        h = block(h, emb, text, {})
        if index in wanted:
            features[wanted[index]] = h
        if lowest not in adapter.levels and len(features) == len(wanted):
            return features  # the rest of the encoder would be computed for nothing
    if lowest in adapter.levels:
        features[lowest] = diffusion_model.middle_block(h, emb, text, {})
    return features


@dataclass
class EncodedContexts:
    """Context inputs ready for the encoder: model-space latents (N, C, h, w), marker text embeddings
    (N, L, D), modality names, weights (N,) and optional region masks (N, H, W)."""

    latents: torch.Tensor
    text: torch.Tensor
    modalities: list[str]
    weights: torch.Tensor
    region_masks: torch.Tensor | None = None
    label: torch.Tensor | None = None


@dataclass
class LdmContextAttention:
    """The adapter's context attention on an LDM UNet, for a host's attention patches.

    States (features, keys/values, masks) are computed once per (device, dtype, rows) and kept until
    `reset()`, which a host calls when the UNet's weights may have changed (a new sampling run)."""

    adapter: ContextAdapter
    diffusion_model: object
    shape: LdmShape
    contexts: EncodedContexts
    places: dict = field(init=False)
    _features: dict = field(default_factory=dict, init=False, repr=False)
    _states: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        self.places = {ldm_place(key, self.shape): key for key in self.adapter.layers}

    @property
    def num_contexts(self) -> int:
        return self.contexts.latents.shape[0]

    def reset(self) -> None:
        self._features.clear()
        self._states.clear()

    def has_layer(self, place: tuple[str, int] | None, block_index: int) -> bool:
        return place is not None and (tuple(place), block_index) in self.places

    def output(self, place: tuple[str, int], block_index: int, query: torch.Tensor, rows: torch.Tensor,
               query_hw: tuple[int, int]):
        """(rows', addition) for the cross-attention at `place`, whose query input is `query` (B, N, C);
        only `rows` have contexts. None where the adapter has no layer or there are no contexts."""
        key = self.places.get((tuple(place), block_index))
        if key is None or self.num_contexts == 0 or rows.numel() == 0:
            return None
        state = self._state(len(rows), query.device, query.dtype)
        layer = self.adapter.layers[key]
        added = context_attention(layer, state, self.adapter.layer_levels[key], key, query[rows], query_hw)
        if added is None:
            return None
        local, extra = added
        return rows[local], extra

    def _state(self, num_rows: int, device: torch.device, dtype: torch.dtype) -> ContextState:
        key = (num_rows, device, dtype)
        if key not in self._states:
            one = self._one_row_state(device, dtype)
            self._states[key] = one.repeat_rows(num_rows)
        return self._states[key]

    def _one_row_state(self, device, dtype) -> ContextState:
        if (device, dtype) not in self._features:
            c = self.contexts
            move = lambda t: None if t is None else t.to(device, dtype)
            features = encode_contexts(self.diffusion_model, self.shape, self.adapter, move(c.latents),
                                       move(c.text), c.modalities, move(c.label))
            masks = None if c.region_masks is None else c.region_masks.to(device)
            self._features[(device, dtype)] = ContextState.from_encoded(
                features, [list(range(self.num_contexts))], c.weights.to(device), masks)
        return self._features[(device, dtype)]
