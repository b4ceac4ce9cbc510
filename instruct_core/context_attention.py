"""Context cross-attention: the new layers Instruct-Imagen adds to a pretrained UNet.

Each transformer block at a configured resolution level keeps its own text cross-attention and gains a
second attention over the encoded context features of that level. The new branch is installed as a
diffusers attention processor that wraps the block's existing one, so the UNet itself is never forked:

    out = base_processor(attn, x, text) + to_out(softmax(q k^T / sqrt(d)) v)

`to_out` starts at zero, so an untrained adapter leaves the base UNet's output bit-for-bit unchanged.
A learned "null" key with a zero value is always attended to; it gives the softmax a sink, makes a batch row
without contexts (K = 0) contribute exactly zero, and keeps rows whose region masks exclude a position finite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


def fourier_positions(height: int, width: int, num_freqs: int, device, dtype) -> torch.Tensor:
    """Sin/cos features of normalised (y, x) token centres: (height*width, 4*num_freqs).

    Normalised coordinates make a context of one size line up with a target of another.
    """
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(-1, 2)
    freqs = (2.0 ** torch.arange(num_freqs, device=device, dtype=torch.float32)) * math.pi
    angles = grid[:, :, None] * freqs  # (N, 2, F)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).reshape(grid.shape[0], -1).to(dtype)


# Peak logit of a query on the context token at its own place, before training: sharp enough that an
# untrained layer reads mostly the co-located token, as the control tasks need.
ALIGNED_POSITION_GAIN = 3.0


@torch.no_grad()
def aligned_position_init(weight: torch.Tensor, heads: int, gain: float = ALIGNED_POSITION_GAIN,
                          content_heads: int = 0) -> None:
    """Start a (inner_dim, pos_dim) position projection as a scaled identity in every head but the last
    `content_heads`, which start at zero.

    With the same start for queries and keys, the positional part of each head's logit is
    gain^2 * sum(cos(freq * (p - p'))), largest where the query's place p equals the key's p'. Spatial
    controls (edges, masks, depth) are then read where they apply from the first step instead of after
    the layer has discovered alignment from random projections. That prior is strong (a peak logit of about
    25 for a 32-wide head) and training barely moves it, so a head that must find a subject elsewhere in a
    reference, or pool a style over the whole of one, has to start without it: a content head.
    """
    inner_dim, pos_dim = weight.shape
    head_dim = inner_dim // heads
    num_freqs = pos_dim // 4
    # Features are laid out [y sin, y cos, x sin, x cos] x num_freqs; a head narrower than pos_dim keeps the
    # lowest frequencies of both axes, which still single out one place.
    by_frequency = torch.tensor([part * num_freqs + f for f in range(num_freqs) for part in range(4)])
    shared = min(head_dim, pos_dim)
    weight.zero_()
    for head in range(heads - content_heads):
        rows = torch.arange(shared) + head * head_dim
        weight[rows, by_frequency[:shared]] = gain


class ContextAttention(nn.Module):
    """The parameters of one context cross-attention layer (owned by the adapter, not the UNet)."""

    def __init__(self, query_dim: int, context_dim: int, inner_dim: int, out_dim: int, heads: int, num_freqs: int,
                 content_heads: int = 0):
        super().__init__()
        if not 0 <= content_heads <= heads:
            raise ValueError(f"content_heads: {content_heads} is not in 0..{heads}, the layer's heads")
        self.heads = heads
        self.num_freqs = num_freqs
        pos_dim = 4 * num_freqs
        self.norm_context = nn.LayerNorm(context_dim)
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.pos_q = nn.Linear(pos_dim, inner_dim, bias=False)
        self.pos_k = nn.Linear(pos_dim, inner_dim, bias=False)
        aligned_position_init(self.pos_q.weight, heads, content_heads=content_heads)
        aligned_position_init(self.pos_k.weight, heads, content_heads=content_heads)
        self.null_key = nn.Parameter(torch.zeros(inner_dim))
        # No bias: with a zero value for the null token, "no context" must add exactly nothing.
        self.to_out = nn.Linear(inner_dim, out_dim, bias=False)
        nn.init.zeros_(self.to_out.weight)

    def context_keys_values(self, tokens: torch.Tensor, token_hw: tuple[int, int], value_scale: torch.Tensor):
        """Keys and values for (B, K*h*w, C) context tokens, null token first: (B, heads, 1+N, d) each."""
        batch, num_tokens, _ = tokens.shape
        normed = self.norm_context(tokens)
        positions = fourier_positions(*token_hw, self.num_freqs, tokens.device, tokens.dtype)
        positions = positions.repeat(num_tokens // positions.shape[0], 1)
        keys = self.to_k(normed) + self.pos_k(positions)
        values = self.to_v(normed) * value_scale[..., None].to(tokens.dtype)
        null_key = self.null_key.to(keys.dtype).expand(batch, 1, -1)
        keys = torch.cat([null_key, keys], dim=1)
        values = torch.cat([torch.zeros_like(values[:, :1]), values], dim=1)
        return self._split_heads(keys), self._split_heads(values)

    def forward(self, hidden_states, query_hw, keys, values, attend_mask):
        query = self.to_q(hidden_states)
        positions = fourier_positions(*query_hw, self.num_freqs, hidden_states.device, hidden_states.dtype)
        query = self._split_heads(query + self.pos_q(positions))
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=attend_mask)
        batch, heads, num_queries, head_dim = out.shape
        return self.to_out(out.transpose(1, 2).reshape(batch, num_queries, heads * head_dim))

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, num_tokens, dim = x.shape
        return x.view(batch, num_tokens, self.heads, dim // self.heads).transpose(1, 2)


@dataclass
class ContextState:
    """Encoded contexts of one batch, ready for every denoising step.

    features: level -> (B, Kmax, C, h, w) context features (padding rows are zeros)
    valid:    (B, Kmax) which slots hold a real context (a batch may mix K, K = 0 included)
    weights:  (B, Kmax) per-context strength; scales that context's values
    region_masks: (B, Kmax, H, W) in [0, 1], where in the target each context applies, or None
    The cache holds key/value projections and attention masks, computed on first use and reused at every
    step of a generation.
    """

    features: dict[int, torch.Tensor]
    valid: torch.Tensor
    weights: torch.Tensor
    region_masks: torch.Tensor | None = None
    cache: dict = field(default_factory=dict, repr=False)

    @property
    def num_rows(self) -> int:
        return self.valid.shape[0]

    @property
    def max_contexts(self) -> int:
        return self.valid.shape[1]

    def active_rows(self) -> torch.Tensor:
        """Indices of rows with at least one context; only these pay for context attention."""
        if "active_rows" not in self.cache:
            self.cache["active_rows"] = self.valid.any(dim=1).nonzero().flatten()
        return self.cache["active_rows"]

    @classmethod
    def from_encoded(cls, features, layout, weights=None, region_masks=None) -> "ContextState":
        """Build a state from per-context features (level -> (N, C, h, w)) and a layout: for each batch row,
        the indices of its contexts among the N. `weights` (N,) and `region_masks` (N, H, W) are optional."""
        num_contexts = next(iter(features.values())).shape[0] if features else 0
        max_k = max((len(row) for row in layout), default=0)
        device = next(iter(features.values())).device if features else torch.device("cpu")
        if weights is None:
            weights = torch.ones(num_contexts, device=device)
        valid = torch.zeros(len(layout), max_k, dtype=torch.bool, device=device)
        index = torch.zeros(len(layout), max_k, dtype=torch.long, device=device)
        for row, members in enumerate(layout):
            valid[row, : len(members)] = True
            index[row, : len(members)] = torch.as_tensor(list(members), dtype=torch.long)

        def gather(per_context):
            out = per_context[index]
            return out * valid.view(*valid.shape, *([1] * (out.dim() - 2))).to(out.dtype)

        padded = {level: gather(feat) for level, feat in features.items()}
        masks = gather(region_masks.float()) if region_masks is not None else None
        return cls(padded, valid, gather(weights.float().to(device)), masks)

    @classmethod
    def empty(cls, num_rows: int, like: "ContextState") -> "ContextState":
        """A state with the same levels and no contexts in any row (the null-context branch)."""
        features = {lvl: f.new_zeros((num_rows, 0, *f.shape[2:])) for lvl, f in like.features.items()}
        valid = like.valid.new_zeros((num_rows, 0))
        masks = None if like.region_masks is None else like.region_masks.new_zeros((num_rows, 0, *like.region_masks.shape[2:]))
        return cls(features, valid, like.weights.new_zeros((num_rows, 0)), masks)

    @classmethod
    def concat(cls, states: list["ContextState"]) -> "ContextState":
        """Stack states along the batch, padding K to the largest."""
        max_k = max(s.max_contexts for s in states)

        def pad(t, value=0):
            if t.shape[1] == max_k:
                return t
            widths = [0, 0] * (t.dim() - 2) + [0, max_k - t.shape[1]]
            return F.pad(t, widths, value=value)

        levels = states[0].features.keys()
        features = {lvl: torch.cat([pad(s.features[lvl]) for s in states]) for lvl in levels}
        valid = torch.cat([pad(s.valid, False) for s in states])
        weights = torch.cat([pad(s.weights) for s in states])
        masks = None
        if any(s.region_masks is not None for s in states):
            ref = next(s.region_masks for s in states if s.region_masks is not None)
            masks = torch.cat([
                pad(s.region_masks) if s.region_masks is not None
                else ref.new_ones((s.num_rows, max_k, *ref.shape[2:]))
                for s in states
            ])
        return cls(features, valid, weights, masks)

    def repeat_rows(self, times: int) -> "ContextState":
        """Each row repeated `times` times in place (row 0, row 0, ..., row 1, ...), for batch > 1."""
        rep = lambda t: None if t is None else t.repeat_interleave(times, dim=0)
        return ContextState({lvl: rep(f) for lvl, f in self.features.items()},
                            rep(self.valid), rep(self.weights), rep(self.region_masks))

    def tokens(self, level: int, rows: torch.Tensor):
        """(B', K*h*w, C) tokens, (h, w), (B', K*h*w) value scale and validity, for the given rows."""
        feat = self.features[level][rows]
        batch, k, channels, h, w = feat.shape
        tokens = feat.permute(0, 1, 3, 4, 2).reshape(batch, k * h * w, channels)
        per_token = lambda t: t[rows].repeat_interleave(h * w, dim=1)
        return tokens, (h, w), per_token(self.weights), per_token(self.valid)

    def attend_mask(self, level: int, rows: torch.Tensor, query_hw: tuple[int, int]):
        """Boolean mask (B', 1, 1 or Nq, 1+N): True where a query may attend; the null token always. None
        when every row's every slot holds a context and no region mask applies."""
        key = ("mask", level, query_hw)
        if key not in self.cache and self.region_masks is None and bool(self.valid[rows].all()):
            self.cache[key] = None  # nothing to hide: SDPA without a mask takes its faster kernels
        if key not in self.cache:
            h, w = self.features[level].shape[-2:]
            valid = self.valid[rows].repeat_interleave(h * w, dim=1)  # never touches the features' graph
            allowed = valid[:, None, :]  # (B', 1, N)
            if self.region_masks is not None:
                regions = F.interpolate(self.region_masks[rows].float(), size=query_hw, mode="area")
                inside = (regions > 0.5).flatten(2).transpose(1, 2)  # (B', Nq, K)
                allowed = allowed & inside.repeat_interleave(h * w, dim=2)
            null = torch.ones_like(allowed[..., :1])
            self.cache[key] = torch.cat([null, allowed], dim=-1)[:, None]
        return self.cache[key]


@dataclass
class ContextCall:
    """What one UNet call passes to the processors (as the `context` cross-attention kwarg): the batch's
    contexts and each level's query grid. Passing it as an argument, not through shared state, lets gradient
    checkpointing replay it during recomputation."""

    state: ContextState
    level_hw: list[tuple[int, int]]


class PassThroughProcessor:
    """Wraps the processors without context attention, so that they accept (and drop) the `context` kwarg."""

    def __init__(self, base_processor):
        self.base_processor = base_processor

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 context: ContextCall | None = None, *args, **kwargs):
        return self.base_processor(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


class ContextAttnProcessor:
    """Wraps a block's attention processor and adds the context cross-attention of one layer.

    A plain object (not an nn.Module) so that the UNet's own state dict stays the base's; the parameters live
    in the adapter. The contexts arrive per call as the `context` cross-attention kwarg.
    """

    def __init__(self, base_processor, layer: ContextAttention, level: int, name: str):
        self.base_processor = base_processor
        self.layer = layer
        self.level = level
        self.name = name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 context: ContextCall | None = None, *args, **kwargs):
        out = self.base_processor(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        state = None if context is None else context.state
        if state is None or hidden_states.dim() != 3:
            return out
        added = context_attention(self.layer, state, self.level, self.name, hidden_states,
                                  context.level_hw[self.level])
        if added is None:
            return out
        rows, extra = added
        return add_to_rows(out, rows, extra.to(out.dtype) / attn.rescale_output_factor)


def context_attention(layer: ContextAttention, state: ContextState, level: int, name: str,
                      hidden_states: torch.Tensor, query_hw: tuple[int, int]):
    """What one context-attention layer adds to its block's cross-attention output: (rows, extra), the rows
    of `hidden_states` (the cross-attention's query input, one row per row of `state`) that have contexts and
    their (rows, tokens, channels) addition; None when no row has any.

    Both hosts call this: the diffusers processor above and the ComfyUI model patch (ldm_unet.py). Keys and
    values are computed once per state and layer, and reused at every step.
    """
    if state.max_contexts == 0:
        return None
    rows = state.active_rows()
    if rows.numel() == 0:
        return None
    if query_hw[0] * query_hw[1] != hidden_states.shape[1]:
        raise RuntimeError(f"{name}: expected {query_hw} query tokens, got {hidden_states.shape[1]}")
    keys, values = _keys_values(layer, state, level, name, rows)
    mask = state.attend_mask(level, rows, query_hw)
    # The adapter may be kept in fp32 (training) while the base runs in half precision.
    layer_dtype = layer.to_out.weight.dtype
    extra = layer(hidden_states[rows].to(layer_dtype), query_hw, keys.to(layer_dtype), values.to(layer_dtype), mask)
    return rows, extra


def add_to_rows(out: torch.Tensor, rows: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
    """`out` with `extra` added to its `rows`."""
    if rows.numel() == out.shape[0]:
        return out + extra
    return out.index_add(0, rows, extra.to(out.dtype))


def _keys_values(layer: ContextAttention, state: ContextState, level: int, name: str, rows: torch.Tensor):
    key = ("kv", name)
    if key in state.cache:
        return state.cache[key]
    tokens, token_hw, scale, _ = state.tokens(level, rows)
    keys_values = layer.context_keys_values(tokens.to(layer.to_out.weight.dtype), token_hw, scale)
    # While training, a state serves one forward; caching there would also break gradient
    # checkpointing, whose recomputation must redo the same work.
    if not torch.is_grad_enabled():
        state.cache[key] = keys_values
    return keys_values
