"""Measurements of what limits the bundled model: how far apart its text encoder holds the words it must follow.

`word_separation` encodes captions of one-object scenes that differ in a single word (a colour, or a shape for
comparison) and reports, per kind of word:

- `cosine`: the mean cosine similarity of the encoder's final states over the tokens from the changed word to
  the end of the caption (where a causal encoder carries it), between two captions that differ in that word
  only: 1.0 means the encoder cannot tell them apart;
- `probe_accuracy`: a ridge-regression probe from the captions' mean-pooled states to the word, trained on three
  quarters of the captions and tested on the rest (chance is one over the number of words).

A probe near 1 with a cosine near 1 means the word is there but as a small difference the UNet has to amplify.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from . import scenes
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
