"""What the bundled model draws when its text cross-attention is given the routing it does not learn.

A diagnosis of what limits the named colours and depth order (docs/RESULTS.md), not a way to sample: it needs each
scene's object masks. Each object's pixels may attend only to their own object's phrase ("a large orange diamond on
the left") among the objects' phrases, and the background to none of them. `strict` also closes every other token
(the words between the phrases, the end and padding tokens, which a causal encoder fills with every phrase before
them) to an object's pixels, leaving them their own phrase and the start token. An object's pixels are its whole
silhouette (`masks="whole"`: where two objects overlap, both phrases are open) or only where it is seen
(`masks="shown"`: the nearer object owns the overlap, as the depth map shows it).

The routing is an additive bias on the base UNet's text cross-attention, put in through the diffusers attention
processors the adapter wraps; the rows it applies to are recognised by their encoded text, so guidance's
unconditional rows and the context encoder's marker texts pass unchanged. `train` fine-tunes a model with the
routing given (the trainer's examples carry their scenes), and `measure` scores it on the benchmark with the
routing given or not: `python -m instruct_bench given-routing`.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import scenes

# An object's own pixels at an attention layer's resolution: cells it covers by more than this share, and always
# the cell it covers most, so a small object keeps a cell on the coarsest grid.
OWN_CELL_COVER = 0.3

# Which pixels are an object's own: its whole silhouette, or where it is seen
ROUTING_MASKS = ("whole", "shown")

# The fine-tuning mix: every task that names colours, with a share of the others so they are not forgotten
ROUTING_MIX = {"text_to_image": 0.20, "mask_to_image": 0.12, "edge_to_image": 0.10, "sketch_to_image": 0.08,
               "depth_to_image": 0.15, "subject": 0.10, "styled_generation": 0.09, "style_transfer": 0.08,
               "inpainting": 0.08}


def phrase_tokens(pipe, text: str, objects) -> list[list[int]] | None:
    """Where the encoded `text` holds each object's phrase (`InstructImagen.token_positions`); None when one is
    not found or the encoder's window cuts it off."""
    spans = scenes.find_placed_phrases(text, objects)
    found = [pipe.token_positions(text, start, end) for start, end in spans or []]
    return found if spans is not None and all(found) else None


@dataclass
class _Row:
    text: torch.Tensor          # (tokens, channels) float32: the encoded text it is recognised by
    phrases: list[list[int]]    # token indices of each object's phrase
    masks: torch.Tensor         # (objects, size, size) float32
    # `blocked` per grid side: every layer at that side, at every sampling step, asks for the same one
    blocked_at: dict = field(default_factory=dict)


class GivenRouting:
    """The routing of the examples in hand. `set_examples` replaces them; `matched` counts the rows of
    cross-attention calls the routing was applied to (to tell it reached the model)."""

    def __init__(self, strict: bool = True, masks: str = "whole"):
        if masks not in ROUTING_MASKS:
            raise ValueError(f"given routing: masks {masks!r} is not one of {', '.join(ROUTING_MASKS)}")
        self.strict = strict
        self.masks = masks
        self.rows: list[_Row] = []
        self.matched = 0

    def set_examples(self, pipe, texts: list[str], scene_list: list, size: int) -> int:
        """Route the rows that encode each of `texts` by its scene (None: not routed); returns how many are. A
        text that two examples share is routed only when both give it the same masks: rows are told apart by
        their text alone."""
        self.rows = []
        by_text: dict[str, list] = {}
        for text, scene in zip(texts, scene_list):
            by_text.setdefault(text, []).append(scene)
        for text, shared in by_text.items():
            scene = shared[0]
            plain = [index for index, obj in enumerate(scene.objects) if obj.subject is None] if scene else []
            phrases = phrase_tokens(pipe, text, [scene.objects[i] for i in plain]) if text and plain else None
            if phrases is None:
                continue
            masks = [self._object_masks(scenes.layout(s, size))[plain] if s is not None and len(s.objects) == len(
                scene.objects) else None for s in shared]
            if any(m is None or not np.array_equal(m, masks[0]) for m in masks):
                continue
            with torch.no_grad():
                encoded = pipe.encode_text([text])[0][0].float().cpu()
            self.rows.append(_Row(encoded, phrases, torch.from_numpy(masks[0].astype(np.float32))))
        return len(self.rows)

    def _object_masks(self, plan: scenes.Layout) -> np.ndarray:
        return plan.shown_masks() if self.masks == "shown" else plan.object_masks

    def bias(self, context: torch.Tensor, pixels: int) -> torch.Tensor | None:
        """(rows, 1, pixels, tokens) additive attention bias for a cross-attention call over `context`; None
        when none of its rows is one of ours."""
        rows, tokens = context.shape[:2]
        side = int(round(pixels ** 0.5))
        if side * side != pixels:
            raise ValueError(f"given routing: {pixels} query tokens are not a square grid")
        bias, found = torch.zeros(rows, 1, pixels, tokens), False
        text = context.detach().float().cpu()
        for index in range(rows):
            # guidance repeats a shorter text to the batch's length (`guidance.cat_text`)
            row = next((r for r in self.rows if tokens % len(r.text) == 0
                        and torch.equal(text[index], r.text.repeat(tokens // len(r.text), 1))), None)
            if row is None:
                continue
            found, self.matched = True, self.matched + 1
            if side not in row.blocked_at:
                row.blocked_at[side] = self.blocked(row, side)
            blocked = row.blocked_at[side].repeat(1, tokens // len(row.text))
            bias[index, 0] = torch.where(blocked, float("-inf"), 0.0)
        return bias if found else None

    def blocked(self, row: _Row, side: int) -> torch.Tensor:
        """(pixels, tokens) True where a pixel of a `side` x `side` grid may not attend to a token. Never a whole
        pixel's row: the start token and the words outside the phrases stay open, in strict mode the start token."""
        cover = F.adaptive_avg_pool2d(row.masks[:, None], side).reshape(len(row.phrases), -1)
        own = cover > OWN_CELL_COVER
        own[torch.arange(len(row.phrases)), cover.argmax(1)] = True
        pixels, tokens = own.shape[1], len(row.text)
        blocked = torch.zeros(pixels, tokens, dtype=torch.bool)
        for index, phrase in enumerate(row.phrases):
            blocked[:, phrase] |= ~own[index][:, None]
        if self.strict:
            open_tokens = torch.zeros(pixels, tokens, dtype=torch.bool)
            for index, phrase in enumerate(row.phrases):
                open_tokens[:, phrase] |= own[index][:, None]
            open_tokens[:, 0] = True
            blocked |= own.any(0)[:, None] & ~open_tokens
        return blocked


class GivenRoutingProcessor:
    """A text cross-attention processor with the routing's bias; the processor it stands in for runs every call
    the routing has no row for."""

    def __init__(self, routing: GivenRouting, replaced):
        self.routing = routing
        self.replaced = replaced

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        bias = None
        if encoder_hidden_states is not None and hidden_states.dim() == 3 and attention_mask is None:
            bias = self.routing.bias(encoder_hidden_states, hidden_states.shape[1])
        if bias is None:
            return self.replaced(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if any(getattr(attn, name, None) is not None for name in ("spatial_norm", "group_norm", "norm_cross",
                                                                  "norm_q", "norm_k")):
            raise ValueError("given routing: a cross-attention that normalises its inputs is not supported")
        rows = hidden_states.shape[0]
        query, key, value = (attn.to_q(hidden_states), attn.to_k(encoder_hidden_states),
                             attn.to_v(encoder_hidden_states))
        width = query.shape[-1] // attn.heads
        query, key, value = (t.view(rows, -1, attn.heads, width).transpose(1, 2) for t in (query, key, value))
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias.to(query))
        out = attn.to_out[1](attn.to_out[0](out.transpose(1, 2).reshape(rows, -1, attn.heads * width)))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def _text_attentions(pipe):
    from diffusers.models.attention_processor import Attention

    return [module for name, module in pipe.base.unet.named_modules()
            if isinstance(module, Attention) and name.endswith("attn2")]


@contextmanager
def given(pipe, routing: GivenRouting):
    """`pipe`'s base text cross-attentions with the routing, restored on leaving."""
    swapped = []
    for attn in _text_attentions(pipe):
        # the adapter's processors wrap the base's; the routing goes in place of that base processor
        holder = attn.processor if hasattr(attn.processor, "base_processor") else None
        if holder is not None:
            swapped.append((holder, "base_processor", holder.base_processor))
            holder.base_processor = GivenRoutingProcessor(routing, holder.base_processor)
        else:
            swapped.append((attn, "processor", attn.processor))
            attn.processor = GivenRoutingProcessor(routing, attn.processor)
    try:
        yield routing
    finally:
        for owner, field, processor in swapped:
            setattr(owner, field, processor)


def routed_generate(routing: GivenRouting):
    """`evaluation.generate_for` with each example routed by its scene."""
    from .evaluation import generate_for

    def generate(pipe, examples, settings):
        routed = routing.set_examples(pipe, [e.instruction.text for e in examples], [e.scene for e in examples],
                                      examples[0].target.width)
        matched = routing.matched
        with given(pipe, routing):
            images = generate_for(pipe, examples, settings)
        if routed and routing.matched == matched:
            raise RuntimeError("given routing: no cross-attention row was recognised as an example's text")
        return images
    return generate


def measure(pipe, tasks, settings, evaluator, routing: GivenRouting | None) -> dict:
    """{task: {metric: [mean, low, high]}} on the test split, routed when `routing` is given."""
    from .evaluation import generate_for, score_task
    from .tasks import make_split

    generate = generate_for if routing is None else routed_generate(routing)
    return {task: score_task(pipe, task, make_split(task, settings.split, settings.examples_per_task,
                                                    seed=settings.seed), settings, evaluator, generate)
            for task in tasks}


def train(pipe, routing: GivenRouting | None, steps: int, work_dir: Path, train_text_encoder: bool, seed: int = 0,
          progress=None, routed_share: float = 1.0):
    """Fine-tune `pipe` (its base and adapter, the text encoder when asked) on `ROUTING_MIX` with the routing
    given (None: without it, the same recipe), as the build's phases train: batch 12, 3e-4 decaying linearly
    after 20 warm-up steps. `routed_share` < 1 routes that share of the examples (drawn per step, seeded), so the
    rest still learn to place objects from the text alone."""
    if not 0.0 <= routed_share <= 1.0:
        raise ValueError(f"routed_share: expected a share in [0, 1], got {routed_share}")
    from instruct_core.train.trainer import Trainer

    from .build_default import phase_trainer_config
    from .tasks import BenchmarkTaskDataset

    batches = []  # those this run trained on (none when a finished run is resumed)

    class RoutedTrainer(Trainer):
        def _loss(self, module, examples, sample_seed):
            batches.append(len(examples))
            if routing is not None:
                routed = np.random.default_rng([seed, self.step]).random(len(examples)) < routed_share
                routing.set_examples(self.pipe, [e.text for e in examples],
                                     [e.annotations.get("scene") if r else None for e, r in zip(examples, routed)],
                                     self.config.data.resolution)
            return super()._loss(module, examples, sample_seed)

    phase = {"steps": steps, "batch_size": 12, "lr": 3e-4, "warmup_steps": min(20, steps), "lr_schedule": "linear",
             "train_text_encoder": train_text_encoder}
    data = BenchmarkTaskDataset(ROUTING_MIX, length=100_000, seed=seed + 8, size=pipe.native_size)
    trainer = RoutedTrainer(phase_trainer_config(phase, work_dir, seed, "full"), pipe, data, progress=progress)
    matched = 0 if routing is None else routing.matched
    with given(pipe, routing) if routing is not None else nullcontext():
        result = trainer.run(resume=True)
    if routing is not None and routed_share > 0 and batches and routing.matched == matched:
        raise RuntimeError("given routing: no training row was recognised as an example's text")
    pipe.base.unet.requires_grad_(False)
    pipe.base.text_encoders[0].requires_grad_(False)
    pipe.model.eval()
    return result
