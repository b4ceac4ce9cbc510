"""Measurements of what limits the bundled model: how far apart its text encoder holds the words it must follow.

`word_separation` encodes captions of one-object scenes that differ in a single word (a colour, or a shape for
comparison) and reports, per kind of word:

- `cosine`: the mean cosine similarity of the encoder's final states over the tokens from the changed word to
  the end of the caption (where a causal encoder carries it), between two captions that differ in that word
  only: 1.0 means the encoder cannot tell them apart;
- `probe_accuracy`: a ridge-regression probe from the captions' mean-pooled states to the word, trained on three
  quarters of the captions and tested on the rest (chance is one over the number of words).

A probe near 1 with a cosine near 1 means the word is there but as a small difference the UNet has to amplify.

`encoder_binding` asks the same of two-object captions: does the state at each object's words name that object's
colour, or the other's as well?

`colour_reading` and `drawn_depth_order` read a model's own images (`python -m instruct_bench diagnose --examples N`):

- `colour_reading`: where each plain object's named colour ends up, as the evaluator reads it: at the object's own
  cell ("at_place", the results page's colour), else at another object's cell of the same scene ("elsewhere": the
  colour is drawn, on the wrong object), else at neither ("absent": the colour is not drawn at all). Mostly
  elsewhere means colours are read but not bound to their objects; mostly absent means they are not read.
- `drawn_depth_order`: depth order judged by the colours the image itself gives the two overlapping objects (their
  parts that nothing covers) rather than by the colours the caption names, so an image that draws the wrong
  colours still shows which object it puts in front; it tells a model that ignores the depth map's order from
  one whose order the colour metric cannot read.

`text_routing` reads the base's own text cross-attention rather than its images: in two-object scenes, how much
of the attention a word gets at its own object's pixels, against what the same word of the other object gets
there. A share of 0.5 means the text reaches every pixel alike (the word is not routed to its object, so which
colour goes where has to be decoded from a summary of the whole caption); a model that routes each object's
words to its pixels approaches 1.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from . import scenes
from .metrics import dilate, colour_distance, pixels_of
from .scenes import Scene


def _one_object_scene(rng: np.random.Generator, colour: str, shape: str) -> Scene:
    scene = scenes.sample_scene(rng, num_objects=1)
    obj = replace(scene.objects[0], colour=colour, shape=shape, pattern="plain")
    return replace(scene, objects=(obj,))


@torch.no_grad()
def _states(pipe, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Final hidden states (N, L, D) of the first encoder window and the tokens' ids (N, L)."""
    tokenizer = pipe.base.tokenizers[0]
    ids = tokenizer(texts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids
    states = pipe.base.text_encoders[0](ids.to(pipe.device)).last_hidden_state.float().cpu().numpy()
    return states, ids.numpy()


def _cosine_after_change(a: np.ndarray, b: np.ndarray, ids_a: np.ndarray, ids_b: np.ndarray) -> float:
    """Mean cosine of two captions' states from their first differing token to the end of the longer one."""
    differ = np.nonzero(ids_a != ids_b)[0]
    start = int(differ[0]) if len(differ) else 0
    x, y = a[start:], b[start:]
    cos = (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1) + 1e-8)
    return float(cos.mean())


def _probe_accuracy(features: np.ndarray, labels: np.ndarray, classes: int, ridge: float = 1.0) -> float:
    split = len(labels) * 3 // 4
    mean, std = features[:split].mean(0), features[:split].std(0) + 1e-6
    x = (features - mean) / std
    x = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    targets = np.eye(classes)[labels]
    train = x[:split]
    weights = np.linalg.solve(train.T @ train + ridge * np.eye(train.shape[1]), train.T @ targets[:split])
    return float(((x[split:] @ weights).argmax(-1) == labels[split:]).mean())


def word_separation(pipe, captions: int = 400, seed: int = 0) -> dict[str, dict[str, float]]:
    """Per kind of word ("colour", "shape"): `cosine`, `probe_accuracy`, `chance` (see the module notes)."""
    rng = np.random.default_rng(seed)
    colours, shapes = list(scenes.COLOURS), list(scenes.SHAPES)
    results: dict[str, dict[str, float]] = {}
    for kind, words in (("colour", colours), ("shape", shapes)):
        texts, others, labels = [], [], []
        for _ in range(captions):
            colour, shape = str(rng.choice(colours)), str(rng.choice(shapes))
            scene = _one_object_scene(rng, colour, shape)
            word = colour if kind == "colour" else shape
            other = str(rng.choice([w for w in words if w != word]))
            changed = replace(scene, objects=(replace(scene.objects[0], **{kind: other}),))
            texts.append(scenes.caption(scene))
            others.append(scenes.caption(changed))
            labels.append(words.index(word))
        states, ids = _states(pipe, texts)
        other_states, other_ids = _states(pipe, others)
        cosine = np.mean([_cosine_after_change(states[i], other_states[i], ids[i], other_ids[i])
                          for i in range(captions)])
        mask = (ids != pipe.base.tokenizers[0].pad_token_id)[..., None]
        pooled = (states * mask).sum(1) / mask.sum(1)
        results[kind] = {"cosine": float(cosine),
                         "probe_accuracy": _probe_accuracy(pooled, np.asarray(labels), len(words)),
                         "chance": 1.0 / len(words)}
    return results


def encoder_binding(pipe, captions: int = 400, seed: int = 0) -> dict[str, dict[str, float]]:
    """In captions of two plain objects of different colours: how well a linear probe (as in `word_separation`) on
    the encoder's state at each object's last place word names that object's colour ("own") and the other
    object's ("other"), per object in caption order ("first", "second"), with the same probe on shuffled colours
    beside them ("shuffled": what a probe reads from nothing). A causal encoder's first object comes before the
    other colour is named; the second object's state can hold both, and if a probe names each of them there,
    that state still tells which colour is whose (a state holding only the pair could give each probe half)."""
    rng = np.random.default_rng(seed)
    colours = list(scenes.COLOURS)
    texts, objects = [], []
    while len(texts) < captions:
        scene = scenes.sample_scene(rng, num_objects=2)
        pair = tuple(replace(o, subject=None, pattern="plain") for o in scene.objects)
        if pair[0].colour != pair[1].colour:
            texts.append(scenes.caption(replace(scene, objects=pair, style=None)))
            objects.append(pair)
    states, _ = _states(pipe, texts)
    tokenizer = pipe.base.tokenizers[0]
    features: list[list[np.ndarray]] = [[], []]
    labels: list[list[int]] = [[], []]
    for row, pair in enumerate(objects):
        positions = _word_positions(pipe, texts[row], pair)
        if positions is None or max(positions["place"]) + 1 >= tokenizer.model_max_length:
            continue  # a caption longer than the encoder's window
        for index, obj in enumerate(pair):
            features[index].append(states[row, positions["place"][index]])
            labels[index].append(colours.index(obj.colour))
    report = {}
    for index, name in enumerate(("first", "second")):
        found, own, other = np.stack(features[index]), np.asarray(labels[index]), np.asarray(labels[1 - index])
        report[name] = {"own": _probe_accuracy(found, own, len(colours)),
                        "other": _probe_accuracy(found, other, len(colours)),
                        "shuffled": _probe_accuracy(found, rng.permutation(own), len(colours))}
    return report


def colour_reading(examples, output) -> dict[str, float]:
    """Shares of the plain objects whose named colour the evaluator reads at their own cell ("at_place"), only at
    another object's cell of the scene ("elsewhere"), or at neither ("absent"); "objects" counts them, and
    "at_place_N" gives at_place in scenes of N plain objects (3 for three or more). `output` is the evaluator's
    reading of the examples' images, one row each."""
    colours = list(scenes.COLOURS)
    tallies: dict[str, list[float]] = {"at_place": [], "elsewhere": [], "absent": []}
    by_count: dict[int, list[float]] = {}
    for row, example in enumerate(examples):
        scene = example.scene
        if scene.style is not None:
            continue  # a style repaints the colours: the caption's names no longer apply
        plain = [obj for obj in scene.objects if obj.subject is None]
        read = output.colour[row].argmax(-1)
        for obj in plain:
            named = colours.index(obj.colour)
            at_place = read[obj.cell] == named
            others = [o.cell for o in scene.objects if o is not obj and o.colour != obj.colour]
            elsewhere = not at_place and any(read[cell] == named for cell in others)
            tallies["at_place"].append(float(at_place))
            tallies["elsewhere"].append(float(elsewhere))
            tallies["absent"].append(float(not at_place and not elsewhere))
            by_count.setdefault(min(len(plain), 3), []).append(float(at_place))
    report = {name: float(np.mean(values)) if values else float("nan") for name, values in tallies.items()}
    report["objects"] = len(tallies["at_place"])
    report.update({f"at_place_{count}": float(np.mean(values)) for count, values in sorted(by_count.items())})
    return report


_MIN_DRAWN_PIXELS = 3      # of an object's uncovered part, at 32 x 32, to take its drawn colours from
_DRAWN_COLOUR_GAP = 40.0   # max-channel distance (0..255) between two objects' mean drawn colours to tell them apart


def drawn_depth_order(image, scene: Scene, size: int = 32) -> float | None:
    """For the scene's two most overlapping objects, the share of their overlap whose pixels are nearer to the
    colours the image draws on the nearer object's uncovered part than to those on the farther one's (each pixel
    to its nearest such colour), rims left out (anti-aliasing mixes colours there). None when they do not overlap
    beyond their rims, either uncovered part is too small, or the image draws both alike (then no colour tells
    them apart)."""
    plan = scenes.layout(scene, size)
    masks = plan.object_masks
    shared = scenes.overlaps(scene, size)
    np.fill_diagonal(shared, 0)
    if shared.max() == 0:
        return None
    a, b = (int(i) for i in np.unravel_index(np.argmax(shared), shared.shape))
    near, far = (a, b) if scene.objects[a].depth < scene.objects[b].depth else (b, a)
    pixels = pixels_of(image, size)
    others = masks.sum(0) > 1  # anything two silhouettes share, a third object's included
    uncovered = []
    for index in (near, far):
        own = masks[index] & ~others
        own &= ~dilate(~masks[index], 1)
        uncovered.append(pixels[own])
    overlap = masks[near] & masks[far]
    overlap &= ~dilate(~overlap, 1)
    if min(len(part) for part in uncovered) < _MIN_DRAWN_PIXELS or not overlap.any():
        return None
    if float(np.abs(uncovered[0].mean(0) - uncovered[1].mean(0)).max()) < _DRAWN_COLOUR_GAP:
        return None
    region = pixels[overlap][:, None]  # (P, 1, 3)
    to_near = colour_distance(region, uncovered[0]).min(-1)[:, 0]
    to_far = colour_distance(region, uncovered[1]).min(-1)[:, 0]
    return float((to_near < to_far).mean())


# Text-to-image and the controls: every object's colour is named and nothing repaints it; depth's map sets an order.
COLOUR_TASKS = ("text_to_image", "edge_to_image", "sketch_to_image", "mask_to_image", "depth_to_image")


def drawing_report(pipe, evaluator, settings) -> dict[str, dict]:
    """`colour_reading` per task of COLOUR_TASKS on its split under `settings` (the results page's by default), and
    for depth-to-image its depth order three ways: the results page's (by the named colours), the same over the
    examples whose two overlapping objects both show their named colour at their place, and `drawn_depth_order`;
    with "drawn_swap": the share of examples whose drawn order is the map's both for the map and for the map with
    the objects' depths exchanged (the same seed). `pipe` None reads the true images instead."""
    from .evaluation import generate_for, has_overlapping_objects
    from .metrics import depth_order
    from .tasks import make_split, swap_depths

    def images_for(examples):
        return [e.target for e in examples] if pipe is None else generate_for(pipe, examples, settings)

    report: dict[str, dict] = {}
    for task in COLOUR_TASKS:
        examples = make_split(task, settings.split, settings.examples_per_task, seed=settings.seed)
        images = images_for(examples)
        output = evaluator.predict(images)
        report[task] = colour_reading(examples, output)
        if task != "depth_to_image":
            continue
        overlapping = [i for i, e in enumerate(examples) if has_overlapping_objects(e)]
        swapped = [swap_depths(examples[i]) for i in overlapping]
        swapped_images = images_for(swapped)
        named, named_bound, drawn, follows = [], [], [], []
        for i, other_example, other_image in zip(overlapping, swapped, swapped_images):
            example = examples[i]
            order = depth_order(images[i], example.scene)
            if order is not None:
                named.append(order)
                a, b = other_example.meta["depths_swapped"]
                pair = [example.scene.objects[a], example.scene.objects[b]]
                read = output.colour[i].argmax(-1)
                if all(read[o.cell] == list(scenes.COLOURS).index(o.colour) for o in pair):
                    named_bound.append(order)
            orders = (drawn_depth_order(images[i], example.scene), drawn_depth_order(other_image, other_example.scene))
            if orders[0] is not None:
                drawn.append(orders[0])
            if None not in orders:
                follows.append(float(min(orders) > 0.5))
        report[task].update({
            "depth_order": _mean(named), "depth_order_readable": len(named),
            "depth_order_colours_at_place": _mean(named_bound), "colours_at_place_examples": len(named_bound),
            "drawn_depth_order": _mean(drawn), "drawn_readable": len(drawn),
            "drawn_swap": _mean(follows), "drawn_swap_readable": len(follows)})
    return report


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


# A noisy target at these timesteps shows where the objects are, as a sampler's image does midway.
ROUTING_TIMESTEPS = (300, 700)
ROUTED_WORDS = ("colour", "shape", "place")
_ROUTED_FIELDS = {"colour": "colour", "shape": "shape", "place": "where"}  # the SceneObject field each word names
# the tasks whose text alone says which colour goes where (a mask or edges fix only the shapes)
ROUTING_TASKS = ("text_to_image", "mask_to_image", "edge_to_image")


def _word_positions(pipe, text: str, objects) -> dict[str, list[int]] | None:
    """Where the encoded `text` (`InstructImagen.token_positions`) holds each object's colour, shape and last place
    word (a word's last token: a causal encoder's state there has read all of it), each searched within the
    object's own phrase (a template's or the background's colour words come before it); None when a phrase or
    word is not found or the encoder's window cuts it off."""
    found: dict[str, list[int]] = {kind: [] for kind in ROUTED_WORDS}
    spans = scenes.find_placed_phrases(text, objects)
    if spans is None:
        return None
    for obj, (phrase_at, phrase_end) in zip(objects, spans):
        words = {"colour": obj.colour, "shape": obj.shape, "place": obj.where.split()[-1]}
        word_from = phrase_at
        for kind in ROUTED_WORDS:
            at = _whole_word(text, words[kind], word_from, phrase_end)
            positions = pipe.token_positions(text, at, at + len(words[kind])) if at >= 0 else []
            if not positions:
                return None
            found[kind].append(positions[-1])
            word_from = at + len(words[kind])
    return found


def _whole_word(text: str, word: str, start: int, end: int) -> int:
    """Index of the first `word` in text[start:end] that stands as a whole word, else -1."""
    at = text.find(word, start, end)
    while at >= 0 and ((at > 0 and text[at - 1].isalnum())
                       or (at + len(word) < len(text) and text[at + len(word)].isalnum())):
        at = text.find(word, at + 1, end)
    return at


def _attention_weights(attn, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """The attention probabilities (heads, pixels, tokens) of the first row of a diffusers cross-attention, in
    float32 on the CPU, as its processor computes them (default scale, no normalisation before the projections)."""
    if any(getattr(attn, name, None) is not None for name in ("spatial_norm", "group_norm", "norm_cross",
                                                              "norm_q", "norm_k")):
        raise ValueError("text_routing: a cross-attention that normalises its inputs is not read here")
    query, key = attn.to_q(hidden[:1]).float(), attn.to_k(context[:1]).float()
    heads, width = attn.heads, query.shape[-1] // attn.heads
    query = query.view(1, -1, heads, width).transpose(1, 2)
    key = key.view(1, -1, heads, width).transpose(1, 2)
    return (query @ key.transpose(-1, -2) * width ** -0.5).softmax(-1)[0].cpu()


@torch.no_grad()
def text_routing(pipe, task: str = "text_to_image", split: str = "test", examples: int = 48,
                 seed: int = 1234) -> dict[str, dict]:
    """Per kind of word (colour, shape, place), over the base's text cross-attention layers, the noisy targets of
    ROUTING_TIMESTEPS (with the example's contexts) and every ordered pair of non-subject objects (a, b) that
    differ in that word, where a covers pixels at the layer's resolution: `share`, the mean over layers of the
    mean of attention(a's word at a's pixels) / (that + attention(b's word at a's pixels)), heads averaged;
    `by_layer`, that mean per layer; `mass_share`, one ratio of the sums instead; `best_head`, the share of the
    head (of any layer) that scores highest on the even-numbered examples, measured on the odd-numbered ones (the
    highest of many heads, read on the examples that chose it, would be biased up; NaN below two examples).
    "pairs" counts the ordered object pairs."""
    from diffusers.models.attention_processor import Attention

    from .tasks import make_split

    captured: dict[str, tuple] = {}

    def keep(name):
        def pre_hook(module, args, kwargs):
            captured[name] = (module, args[0] if args else kwargs["hidden_states"], kwargs["encoder_hidden_states"])
        return pre_hook

    handles = [module.register_forward_pre_hook(keep(name), with_kwargs=True)
               for name, module in pipe.base.unet.named_modules()
               if isinstance(module, Attention) and name.endswith("attn2")]
    # kind -> layer -> per pair and timestep: (the example's number, the attention per head to a's own word and to
    # b's, at a's pixels)
    own_and_other: dict[str, dict[str, list[tuple]]] = {kind: {} for kind in ROUTED_WORDS}
    measured = 0
    pairs = dict.fromkeys(ROUTED_WORDS, 0)
    alphas = pipe.schedule.alphas_cumprod.float()
    try:
        for example in make_split(task, split, examples, seed=seed):
            scene = example.scene
            objects = [(i, o) for i, o in enumerate(scene.objects) if o.subject is None]
            if scene.style is not None or len(objects) < 2:
                continue
            positions = _word_positions(pipe, example.instruction.text, [o for _, o in objects])
            if positions is None:
                continue
            measured += 1
            for kind in ROUTED_WORDS:
                field = _ROUTED_FIELDS[kind]
                pairs[kind] += sum(getattr(a, field) != getattr(b, field) for _, a in objects for _, b in objects)
            masks = scenes.layout(scene, pipe.native_size).object_masks
            cond = pipe.encode_instruction(example.instruction)
            image = torch.from_numpy(pixels_of(example.target, pipe.native_size) / 255).permute(2, 0, 1)[None]
            clean = pipe.to_model_space(image).float().cpu()
            noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed))
            for timestep in ROUTING_TIMESTEPS:
                alpha = alphas[timestep]
                noisy = (alpha.sqrt() * clean + (1 - alpha).sqrt() * noise).to(pipe.device, pipe.dtype)
                captured.clear()
                pipe.model(noisy, torch.tensor([timestep], device=pipe.device), cond.text, cond.context_state,
                           None)
                for name, (attn, hidden, context) in captured.items():
                    weights = _attention_weights(attn, hidden, context)
                    for kind, found in _pair_attention(weights, masks, objects, positions).items():
                        if found:
                            own_and_other[kind].setdefault(name, []).extend(
                                (measured, own, other) for own, other in found)
    finally:
        for handle in handles:
            handle.remove()
    return {kind: _routing_summary(layers, pairs[kind]) for kind, layers in own_and_other.items()}


def _pair_attention(weights: torch.Tensor, masks: np.ndarray, objects, positions: dict[str, list[int]]
                    ) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """Per kind of word, from one layer's attention (heads, pixels, tokens): for every ordered pair of `objects`
    (index, object) that differ in that word, where a covers pixels at the layer's resolution, the attention per
    head to a's own word and to b's, at a's pixels."""
    side = int(round(weights.shape[1] ** 0.5))
    cells = masks.reshape(len(masks), side, masks.shape[1] // side, side, -1).mean((2, 4)) > 0.5
    found: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {kind: [] for kind in ROUTED_WORDS}
    for kind in ROUTED_WORDS:
        field, words = _ROUTED_FIELDS[kind], positions[kind]
        for (a, obj_a), word_a in zip(objects, words):
            at_a = weights[:, torch.from_numpy(cells[a].reshape(-1))]
            if not at_a.shape[1]:  # the object covers no pixel at this layer's resolution
                continue
            found[kind] += [(at_a[..., word_a].mean(-1).numpy(), at_a[..., word_b].mean(-1).numpy())
                            for (_, obj_b), word_b in zip(objects, words)
                            if getattr(obj_a, field) != getattr(obj_b, field)]
    return found


def _routing_summary(layers: dict[str, list[tuple]], pairs: int) -> dict:
    """`text_routing`'s figures for one kind of word from its per-layer (example, own, other) attention."""
    if not layers:
        return {"share": float("nan"), "mass_share": float("nan"), "best_head": float("nan"), "by_layer": {},
                "pairs": pairs}
    by_layer, best = {}, (-1.0, float("nan"))  # best: (share on the even examples, share on the odd ones)
    own_sum = other_sum = 0.0
    for name, values in layers.items():
        even = np.array([number % 2 == 0 for number, _, _ in values])
        own = np.stack([v[1] for v in values])  # (pairs x timesteps, heads)
        other = np.stack([v[2] for v in values])
        share = own / (own + other)
        by_layer[name] = float(share.mean())
        own_sum, other_sum = own_sum + float(own.sum()), other_sum + float(other.sum())
        if even.any() and not even.all():
            head = int(share[even].mean(0).argmax())
            best = max(best, (float(share[even, head].mean()), float(share[~even, head].mean())))
    return {"share": float(np.mean(list(by_layer.values()))), "mass_share": own_sum / (own_sum + other_sum),
            "best_head": best[1], "by_layer": by_layer, "pairs": pairs}
