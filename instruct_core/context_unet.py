"""The context-augmented UNet: a diffusers UNet2DConditionModel plus an adapter of new parameters.

Context encoding follows Instruct-Imagen: each context image (VAE latent, or pixels for a pixel-space UNet)
runs through the *same* UNet's input conv, down blocks and mid block (shared weights), conditioned on its
marker text at a fixed clean timestep, with a learned per-modality embedding added to the time embedding.
The features at each resolution level are kept; the new context cross-attention layers of that level attend
to them (see context_attention.py).

Levels are numbered by resolution: level i holds tensors downsampled i times (0 = input resolution); the mid
block belongs to the lowest level. A down block's feature is its last output before downsampling; the
lowest level's feature is the mid block's output.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .context_attention import (ContextAttention, ContextAttnProcessor, ContextCall, ContextState,
                                PassThroughProcessor)
from .instruction import DEFAULT_MAX_CONTEXTS, DEFAULT_MODALITIES

# UNet config keys that decide whether an adapter's layers fit a base.
FINGERPRINT_KEYS = (
    "in_channels", "block_out_channels", "down_block_types", "up_block_types", "mid_block_type",
    "layers_per_block", "cross_attention_dim", "attention_head_dim", "num_attention_heads",
    "transformer_layers_per_block", "addition_embed_type", "projection_class_embeddings_input_dim",
)


def base_fingerprint(unet) -> dict:
    """The architecture facts an adapter depends on, JSON-ready."""
    config = dict(unet.config)
    facts = {}
    for key in FINGERPRINT_KEYS:
        value = config.get(key)
        facts[key] = list(value) if isinstance(value, tuple) else value
    return facts


def fingerprint_digest(facts: dict) -> str:
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class ContextAdapterConfig:
    """What the adapter adds. `levels=None` picks the two lowest-resolution levels that have attention."""

    levels: tuple[int, ...] | None = None
    modalities: tuple[str, ...] = DEFAULT_MODALITIES
    max_contexts: int = DEFAULT_MAX_CONTEXTS
    num_freqs: int = 8
    encode_timestep: int = 0
    # Width of each context-attention head; None takes the heads of the base layer it sits beside. A base
    # whose heads are very narrow (diffusers reads `attention_head_dim` as a head count) needs wider ones:
    # a 2-wide head cannot match positions.
    head_dim: int | None = None
    # Heads per layer that start without the positional prior (the last ones): they may look anywhere in a
    # context, as a subject drawn elsewhere or a style spread over the whole reference needs. The others
    # start reading the context token at the query's own place, as spatial controls need.
    content_heads: int = 0

    def to_dict(self) -> dict:
        data = asdict(self)
        data["levels"] = None if self.levels is None else list(self.levels)
        data["modalities"] = list(self.modalities)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "ContextAdapterConfig":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if known.get("levels") is not None:
            known["levels"] = tuple(int(x) for x in known["levels"])
        if "modalities" in known:
            known["modalities"] = tuple(known["modalities"])
        return cls(**known)


_PROCESSOR_NAME = re.compile(r"^(down_blocks\.(\d+)|mid_block|up_blocks\.(\d+))\..*\.attn2\.processor$")


def processor_level(name: str, num_levels: int) -> int | None:
    """Resolution level of a cross-attention processor name, or None for other attention."""
    match = _PROCESSOR_NAME.match(name)
    if match is None:
        return None
    if match.group(2) is not None:
        return int(match.group(2))
    if match.group(3) is not None:
        return num_levels - 1 - int(match.group(3))
    return num_levels - 1


def levels_with_attention(unet) -> list[int]:
    num_levels = len(unet.config.block_out_channels)
    found = {processor_level(name, num_levels) for name in unet.attn_processors}
    return sorted(level for level in found if level is not None)


def level_channels(unet, level: int) -> int:
    return unet.config.block_out_channels[level]


@dataclass
class BaseLayer:
    """One cross-attention layer of a base UNet, as the adapter needs to know it."""

    level: int
    query_dim: int
    inner_dim: int
    out_dim: int
    heads: int
    query_weight: torch.Tensor  # the base layer's to_q weight: the context layer's starting query projection


@dataclass
class BaseLayout:
    """What an adapter is built against: the base's cross-attention layers by adapter key (the diffusers
    processor name with dots as underscores, whatever the host's own module names), the feature channels of
    each resolution level and the width of the time embedding."""

    layers: dict[str, BaseLayer]
    level_channels: list[int]
    time_dim: int

    @property
    def levels_with_attention(self) -> list[int]:
        return sorted({layer.level for layer in self.layers.values()})


def diffusers_layout(unet) -> BaseLayout:
    """The layout of a diffusers UNet2DConditionModel."""
    num_levels = len(unet.config.block_out_channels)
    attn_modules = dict(unet.named_modules())
    layers = {}
    for name in unet.attn_processors:
        level = processor_level(name, num_levels)
        if level is None:
            continue
        attn = attn_modules[name[: -len(".processor")]]
        layers[name.replace(".", "_")] = BaseLayer(level, attn.to_q.in_features, attn.to_q.out_features,
                                                   attn.to_out[0].out_features, attn.heads, attn.to_q.weight)
    return BaseLayout(layers, list(unet.config.block_out_channels), unet.time_embedding.linear_2.out_features)


class ContextAdapter(nn.Module):
    """Only the new parameters: modality embeddings and one ContextAttention per configured layer.

    `base` is a diffusers UNet or the BaseLayout of any host's UNet (see ldm_unet.py)."""

    def __init__(self, base, config: ContextAdapterConfig):
        super().__init__()
        layout = base if isinstance(base, BaseLayout) else diffusers_layout(base)
        self.config = config
        available = layout.levels_with_attention
        levels = config.levels if config.levels is not None else tuple(available[-2:])
        missing = sorted(set(levels) - set(available))
        if missing:
            raise ValueError(f"levels: {missing} have no cross-attention in this UNet (available: {available})")
        self.levels = tuple(sorted(levels))
        # Zero start: an untrained adapter encodes every modality exactly as the base would.
        self.modality_embedding = nn.Embedding(len(config.modalities), layout.time_dim)
        nn.init.zeros_(self.modality_embedding.weight)
        self.layers = nn.ModuleDict()
        self.layer_levels: dict[str, int] = {}
        for key, base_layer in layout.layers.items():
            if base_layer.level not in self.levels:
                continue
            self.layers[key] = self._context_layer(key, base_layer, layout.level_channels[base_layer.level])
            self.layer_levels[key] = base_layer.level

    def _context_layer(self, key: str, base: BaseLayer, context_dim: int) -> ContextAttention:
        config = self.config
        if config.head_dim is not None and base.inner_dim % config.head_dim:
            raise ValueError(f"head_dim: {config.head_dim} does not divide {key}'s width {base.inner_dim}")
        heads = base.heads if config.head_dim is None else base.inner_dim // config.head_dim
        if config.content_heads > heads:
            raise ValueError(f"content_heads: {config.content_heads} is more than {key}'s {heads} heads")
        layer = ContextAttention(query_dim=base.query_dim, context_dim=context_dim, inner_dim=base.inner_dim,
                                 out_dim=base.out_dim, heads=heads, num_freqs=config.num_freqs,
                                 content_heads=config.content_heads)
        with torch.no_grad():
            layer.to_q.weight.copy_(base.query_weight)
        return layer

    def modality_index(self, modality: str) -> int:
        try:
            return self.config.modalities.index(modality)
        except ValueError:
            raise ValueError(f"modality: {modality!r} is not known to this adapter "
                             f"(known: {', '.join(self.config.modalities)})") from None


class ContextAugmentedUNet(nn.Module):
    """A base UNet (frozen by default) with context cross-attention installed through attention processors."""

    def __init__(self, unet, adapter_config: ContextAdapterConfig | None = None, adapter: ContextAdapter | None = None):
        super().__init__()
        self.unet = unet
        self.adapter = adapter if adapter is not None else ContextAdapter(unet, adapter_config or ContextAdapterConfig())
        self.encoder_calls = 0  # how many times contexts were encoded: once per generation
        self._install_processors()

    @property
    def config(self):
        return self.unet.config

    @property
    def dtype(self):
        return self.unet.dtype

    @property
    def device(self):
        return self.unet.device

    @property
    def num_levels(self) -> int:
        return len(self.unet.config.block_out_channels)

    def _install_processors(self):
        processors = {}
        for name, processor in self.unet.attn_processors.items():
            key = name.replace(".", "_")
            if isinstance(processor, (ContextAttnProcessor, PassThroughProcessor)):
                processor = processor.base_processor
            if key in self.adapter.layers:
                processors[name] = ContextAttnProcessor(processor, self.adapter.layers[key],
                                                        self.adapter.layer_levels[key], key)
            else:
                processors[name] = PassThroughProcessor(processor)
        self.unet.set_attn_processor(processors)

    def remove_processors(self):
        """Give the base UNet back its original processors."""
        self.unet.set_attn_processor({
            name: p.base_processor if isinstance(p, (ContextAttnProcessor, PassThroughProcessor)) else p
            for name, p in self.unet.attn_processors.items()
        })

    def _level_shapes(self, height: int, width: int) -> list[tuple[int, int]]:
        shapes = [(height, width)]
        for _ in range(self.num_levels - 1):
            height, width = (height + 1) // 2, (width + 1) // 2
            shapes.append((height, width))
        return shapes

    def forward(self, sample, timestep, encoder_hidden_states, context_state: ContextState | None = None,
                added_cond_kwargs: dict | None = None):
        """One UNet evaluation with the contexts of `context_state` attended to (None: plain base UNet)."""
        kwargs = None
        if context_state is not None:
            kwargs = {"context": ContextCall(context_state, self._level_shapes(*sample.shape[-2:]))}
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                         added_cond_kwargs=added_cond_kwargs, cross_attention_kwargs=kwargs, return_dict=False)[0]

    def encode_contexts(self, images: torch.Tensor, text_embeddings: torch.Tensor, modalities: list[str],
                        added_cond_kwargs: dict | None = None) -> dict[int, torch.Tensor]:
        """Run N context images through the UNet's own encoder: level -> (N, C, h, w) features."""
        self.encoder_calls += 1
        unet = self.unet
        ids = torch.tensor([self.adapter.modality_index(m) for m in modalities], device=images.device)
        timestep = torch.full((images.shape[0],), self.adapter.config.encode_timestep, device=images.device)
        emb = self._time_embedding(images, timestep, text_embeddings, added_cond_kwargs)
        emb = emb + self.adapter.modality_embedding(ids).to(emb.dtype)
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        hidden = unet.process_encoder_hidden_states(text_embeddings, added_cond_kwargs)
        sample = unet.conv_in(images)
        features = {}  # no `context` kwarg below: contexts never attend to contexts
        for level, block in enumerate(unet.down_blocks):
            if getattr(block, "has_cross_attention", False):
                sample, residuals = block(hidden_states=sample, temb=emb, encoder_hidden_states=hidden)
            else:
                sample, residuals = block(hidden_states=sample, temb=emb)
            if level in self.adapter.levels:
                features[level] = residuals[len(block.resnets) - 1]
        lowest = self.num_levels - 1
        if unet.mid_block is not None and lowest in self.adapter.levels:
            if getattr(unet.mid_block, "has_cross_attention", False):
                features[lowest] = unet.mid_block(sample, emb, encoder_hidden_states=hidden)
            else:
                features[lowest] = unet.mid_block(sample, emb)
        return features

    def _time_embedding(self, sample, timestep, text_embeddings, added_cond_kwargs):
        unet = self.unet
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
        class_emb = unet.get_class_embed(sample=sample, class_labels=None)
        if class_emb is not None:
            emb = torch.cat([emb, class_emb], dim=-1) if unet.config.class_embeddings_concat else emb + class_emb
        aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=text_embeddings, added_cond_kwargs=added_cond_kwargs)
        return emb + aug if aug is not None else emb
