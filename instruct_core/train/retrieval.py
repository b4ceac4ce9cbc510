"""Stage-1 data: neighbour clusters of similar images, and retrieval-augmented training examples.

As in Re-Imagen and Instruct-Imagen, every item anchors a cluster of its nearest neighbours (near
duplicates removed); an example asks the model to generate one member of a cluster from its caption
while looking at three other members as [ref#1]..[ref#3]:

    items ──Embedder──▶ (N, D) ──build_index (faiss, cosine)──▶ form_clusters ──▶ RetrievalExamples

Embeddings are pluggable (`Embedder`): precomputed ones from a file, the base model's own UNet
encoder and text encoder (`ModelEmbedder`, offline, no extra weights), or a pixel statistic for tests.
"""

from __future__ import annotations

import json
import math
import operator
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from PIL import Image

from .data import DataError, ImageTextItem, TrainingExample
from ..instruction import MARKER_PATTERN, Context, MultiModalInstruction, prepare_context_image

if TYPE_CHECKING:
    from ..pipeline import InstructImagen

__all__ = [
    "CLUSTER_FORMAT_VERSION",
    "INDEX_KINDS",
    "TEMPLATES",
    "Cluster",
    "ClusterStats",
    "Embedder",
    "ModelEmbedder",
    "PixelEmbedder",
    "PrecomputedEmbedder",
    "RetrievalExamples",
    "apply_condition_dropout",
    "build_index",
    "form_clusters",
    "load_clusters",
    "normalize_rows",
    "save_clusters",
    "search_neighbours",
    "strip_markers",
]

INDEX_KINDS = ("auto", "flat", "ivf", "hnsw")
CLUSTER_FORMAT_VERSION = 1

# Instruction phrasings; {refs} becomes "[ref#1], [ref#2] and [ref#3]". Each is written so that
# `strip_markers` leaves a plain instruction when condition dropout removes the contexts.
TEMPLATES = (
    "Generate an image similar to {refs}: {caption}",
    "Create an image like {refs}: {caption}",
    "{caption}, in the manner of {refs}",
    "Based on {refs}, generate an image of {caption}",
    "Make a picture resembling {refs} showing {caption}",
)


# --------------------------------------------------------------------------------------------
# Embedders


class Embedder(Protocol):
    def embed(self, items: Sequence[ImageTextItem]) -> np.ndarray:
        """(N, D) float32 embeddings, one row per item, in item order."""


def normalize_rows(embeddings: Any) -> np.ndarray:
    """Rows scaled to unit length, as a contiguous float32 copy; zero or non-finite rows are refused."""
    matrix = np.array(embeddings, dtype=np.float32, copy=True, order="C")
    if matrix.ndim != 2 or matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise ValueError(f"embeddings: expected a non-empty (N, D) array, got shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        row = int(np.flatnonzero(~np.isfinite(matrix).all(axis=1))[0])
        raise ValueError(f"embeddings: row {row} is not finite")
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"embeddings: row {int(np.flatnonzero(norms[:, 0] == 0)[0])} is all zeros")
    matrix /= norms
    return matrix


class PrecomputedEmbedder:
    """Embeddings the user computed elsewhere (CLIP, DINO, ...).

    A `.npy` holds an (N, D) array whose rows are in item order, so it fits only the exact item list
    it was made for; a `.npz` with `keys` (strings) and `embeddings` (N, D) is matched by
    `item.key` and survives items being skipped or reordered. Files are read without pickle.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.keys, self.embeddings = _read_embeddings(self.path)

    def embed(self, items: Sequence[ImageTextItem]) -> np.ndarray:
        if self.keys is None:
            if len(self.embeddings) != len(items):
                raise ValueError(f"{self.path}: {len(self.embeddings)} rows for {len(items)} items; a .npy "
                                 f"must have one row per item in order (use a .npz with keys to match by key)")
            return normalize_rows(self.embeddings)
        row_of = {key: row for row, key in enumerate(self.keys)}
        missing = [item.key for item in items if item.key not in row_of]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise ValueError(f"{self.path}: no embedding for key {missing[0]!r}{more}")
        return normalize_rows(self.embeddings[[row_of[item.key] for item in items]])


def _read_embeddings(path: Path) -> tuple[list[str] | None, np.ndarray]:
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            embeddings, keys = loaded, None
        else:
            with loaded:
                if "embeddings" not in loaded.files or "keys" not in loaded.files:
                    raise ValueError(f"a .npz needs arrays 'keys' and 'embeddings', found {loaded.files}")
                # Keys must be saved as a string array (np.array(list_of_str)): object arrays need pickle.
                embeddings, keys = loaded["embeddings"], [str(key) for key in loaded["keys"]]
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: cannot read embeddings: {error}") from None
    if embeddings.ndim != 2:
        raise ValueError(f"{path}: embeddings must be (N, D), got shape {embeddings.shape}")
    if keys is not None and len(keys) != len(embeddings):
        raise ValueError(f"{path}: {len(keys)} keys for {len(embeddings)} embedding rows")
    return keys, embeddings.astype(np.float32, copy=False)


class ModelEmbedder:
    """Embeddings from the base model itself, so stage 1 needs no weights beyond the checkpoint.

    Image part: the lowest-resolution feature of the UNet encoder (run as for a context image, with
    the empty caption), mean-pooled over space. Text part: the caption's text embedding, mean-pooled
    over tokens. Each part is L2-normalised and the two are concatenated (and scaled by 1/sqrt(2)),
    so the inner product of two rows is the mean of their image and caption cosine similarities.
    """

    def __init__(self, pipe: InstructImagen, *, batch_size: int = 16, size: int | None = None,
                 resize_policy: str = "crop", modality: str = "image"):
        if batch_size < 1:
            raise ValueError(f"batch_size: must be at least 1, got {batch_size}")
        if modality not in pipe.known_modalities:
            raise ValueError(f"modality: {modality!r} is not one of this model's {', '.join(pipe.known_modalities)}")
        self.pipe = pipe
        self.batch_size = batch_size
        self.size = size if size is not None else pipe.native_size
        pipe.check_size(self.size, self.size, 1)
        self.resize_policy = resize_policy
        self.modality = modality

    def embed(self, items: Sequence[ImageTextItem]) -> np.ndarray:
        import torch

        with torch.no_grad():
            empty, empty_pooled = self.pipe.encode_text([""])
            rows = [self._embed_batch(items[start:start + self.batch_size], empty, empty_pooled)
                    for start in range(0, len(items), self.batch_size)]
        return np.concatenate(rows, axis=0) if rows else np.zeros((0, 0), np.float32)

    def _embed_batch(self, items, empty, empty_pooled) -> np.ndarray:
        import torch

        from ..pipeline import pil_to_tensor

        pipe, n, size = self.pipe, len(items), self.size
        images = torch.stack([pil_to_tensor(prepare_context_image(item.load(), (size, size), self.resize_policy))
                              for item in items])
        pooled = None if empty_pooled is None else empty_pooled.expand(n, -1)
        features = pipe.model.encode_contexts(
            pipe.to_model_space(images), empty.expand(n, -1, -1), [self.modality] * n,
            added_cond_kwargs=pipe.added_cond(pooled, size, size))
        image_part = features[max(features)].float().mean(dim=(-2, -1))
        text_part = pipe.encode_text([item.caption for item in items])[0].float().mean(dim=1)
        parts = [torch.nn.functional.normalize(part, dim=1) for part in (image_part, text_part)]
        return (torch.cat(parts, dim=1) / math.sqrt(2)).cpu().numpy().astype(np.float32)


class PixelEmbedder:
    """A model-free embedding: a joint RGB colour histogram plus a tiny mean-removed thumbnail.

    It finds recolourings and crops of the same picture, not semantic neighbours: meant for tests,
    smoke runs and very small sets, where loading a model to embed is not worth it.
    """

    def __init__(self, thumbnail: int = 8, bins: int = 4):
        if thumbnail < 1 or not 1 <= bins <= 16:
            raise ValueError("thumbnail must be >= 1 and bins in 1..16")
        self.thumbnail = thumbnail
        self.bins = bins

    def embed(self, items: Sequence[ImageTextItem]) -> np.ndarray:
        return np.stack([self._embed_image(item.load()) for item in items]).astype(np.float32)

    def _embed_image(self, image: Image.Image) -> np.ndarray:
        small = np.asarray(image.convert("RGB").resize((32, 32), Image.Resampling.BOX), dtype=np.int64)
        levels = small * self.bins // 256
        codes = (levels[..., 0] * self.bins + levels[..., 1]) * self.bins + levels[..., 2]
        histogram = np.bincount(codes.ravel(), minlength=self.bins ** 3).astype(np.float64)
        size = (self.thumbnail, self.thumbnail)
        thumb = np.asarray(image.convert("RGB").resize(size, Image.Resampling.BOX), dtype=np.float64).ravel()
        thumb -= thumb.mean()
        parts = [_unit(histogram), _unit(thumb)]
        return _unit(np.concatenate(parts))


def _unit(vector: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(vector)
    return vector / norm if norm > 0 else vector


# --------------------------------------------------------------------------------------------
# Index and neighbours


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError("stage-1 retrieval needs faiss: pip install faiss-cpu (or faiss-gpu)") from None
    return faiss


def build_index(embeddings: Any, kind: str = "auto", *, flat_below: int = 50_000, nlist: int | None = None,
                nprobe: int | None = None, hnsw_m: int = 32, ef_search: int = 128, seed: int = 0):
    """A faiss index over L2-normalised rows, searched by inner product (= cosine similarity).

    "auto" is exact ("flat") below `flat_below` items and "ivf" above. "ivf" clusters the space into
    `nlist` cells (default 4·sqrt(N), at least 39 training points per cell), trained on a seeded
    sample of 256 points per cell, and searches `nprobe` cells (default nlist/50, at least 16):
    about 2% of the data per query, which keeps all-against-all search over millions of items
    feasible at a recall that suits neighbour mining. "hnsw" needs no training and trades memory
    for recall; `ef_search` sets its search breadth.
    """
    if kind not in INDEX_KINDS:
        raise ValueError(f"kind: {kind!r} is not one of {', '.join(INDEX_KINDS)}")
    faiss = _faiss()
    vectors = normalize_rows(embeddings)
    count, dim = vectors.shape
    if kind == "auto":
        kind = "flat" if count < flat_below else "ivf"
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "ivf":
        index = _ivf_index(faiss, vectors, nlist, nprobe, seed)
    else:
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = max(40, 2 * hnsw_m)
        index.hnsw.efSearch = ef_search
    index.add(vectors)
    return index


def _ivf_index(faiss, vectors: np.ndarray, nlist: int | None, nprobe: int | None, seed: int):
    count, dim = vectors.shape
    if nlist is None:
        nlist = max(1, min(int(4 * math.sqrt(count)), count // 39))
    if not 1 <= nlist <= count:
        raise ValueError(f"nlist: must be between 1 and the number of items ({count}), got {nlist}")
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    sample_size = min(count, 256 * nlist)
    sample = np.sort(np.random.default_rng(seed).choice(count, sample_size, replace=False))
    index.train(vectors[sample])
    index.nprobe = min(nlist, nprobe if nprobe is not None else max(16, nlist // 50))
    return index


def search_neighbours(index, queries: Any, k: int, *, batch_size: int = 16_384) -> tuple[np.ndarray, np.ndarray]:
    """Top-`k` (similarities, ids), each (N, k), best first; missing results have id -1."""
    vectors = normalize_rows(queries)
    k = min(k, index.ntotal)
    scores, ids = [], []
    for start in range(0, len(vectors), batch_size):
        batch_scores, batch_ids = index.search(vectors[start:start + batch_size], k)
        scores.append(batch_scores)
        ids.append(batch_ids)
    return np.concatenate(scores), np.concatenate(ids)


# --------------------------------------------------------------------------------------------
# Clusters


@dataclass
class Cluster:
    """An anchor item and the members of its cluster, `members[0] == anchor`, all item indices."""

    anchor: int
    members: list[int]


@dataclass
class ClusterStats:
    items: int = 0
    clusters: int = 0
    too_few_neighbours: int = 0   # anchors left with fewer than cluster_size - 1 usable neighbours
    duplicates_removed: int = 0   # neighbours passed over as near-duplicates

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (f"{self.clusters} clusters from {self.items} items; {self.too_few_neighbours} dropped with "
                f"too few neighbours, {self.duplicates_removed} near-duplicate neighbours removed")


def form_clusters(embeddings: Any, index=None, top_k: int = 10, cluster_size: int = 5,
                  duplicate_threshold: float = 0.98, *,
                  min_similarity: float | None = None) -> tuple[list[Cluster], ClusterStats]:
    """One cluster per anchor item: the anchor and its nearest `cluster_size - 1` neighbours.

    For each item its `top_k` nearest neighbours (itself excluded) are taken best first; one whose
    cosine similarity to the anchor or to a member already kept reaches `duplicate_threshold` is a
    near-duplicate and is passed over, since an exact copy as reference teaches the model to copy.
    Neighbours below `min_similarity` (off by default, as in the papers) do not count either.
    Anchors left with too few neighbours form no cluster. `index` defaults to `build_index(embeddings)`.
    """
    if cluster_size < 2 or top_k < cluster_size - 1:
        raise ValueError(f"cluster_size: need 2 <= cluster_size <= top_k + 1, got {cluster_size} with top_k {top_k}")
    vectors = normalize_rows(embeddings)
    index = build_index(vectors) if index is None else index
    if index.ntotal != len(vectors):
        raise ValueError(f"index: holds {index.ntotal} vectors but there are {len(vectors)} embeddings")
    _, found = search_neighbours(index, vectors, top_k + 1)
    neighbours = _without_self(found, top_k)
    stats = ClusterStats(items=len(vectors))
    clusters: list[Cluster] = []
    chunk = max(1, 2**22 // max(1, top_k * vectors.shape[1]))  # bounds the (chunk, k, D) gather
    for start in range(0, len(vectors), chunk):
        anchors = np.arange(start, min(start + chunk, len(vectors)))
        kept, duplicates = _keep_distinct(vectors, anchors, neighbours[anchors], cluster_size - 1,
                                          duplicate_threshold, min_similarity)
        stats.duplicates_removed += int(duplicates.sum())
        for anchor, row_kept, row in zip(anchors, kept, neighbours[anchors]):
            if row_kept.sum() < cluster_size - 1:
                stats.too_few_neighbours += 1
            else:
                clusters.append(Cluster(int(anchor), [int(anchor)] + [int(j) for j in row[row_kept]]))
    stats.clusters = len(clusters)
    return clusters, stats


def _without_self(found: np.ndarray, top_k: int) -> np.ndarray:
    """Each row's results minus the query itself and faiss's -1 padding, first `top_k`, -1 padded."""
    valid = (found != np.arange(len(found))[:, None]) & (found >= 0)
    order = np.argsort(~valid, axis=1, kind="stable")  # valid results first, rank order kept
    result = np.take_along_axis(np.where(valid, found, -1), order, axis=1)[:, :top_k]
    if result.shape[1] < top_k:
        result = np.pad(result, ((0, 0), (0, top_k - result.shape[1])), constant_values=-1)
    return result


def _keep_distinct(vectors: np.ndarray, anchors: np.ndarray, neighbours: np.ndarray, need: int,
                   threshold: float, min_similarity: float | None) -> tuple[np.ndarray, np.ndarray]:
    """The greedy pass of form_clusters for a chunk of anchors at once: (kept mask, duplicates per anchor)."""
    valid = neighbours >= 0
    gathered = vectors[np.where(valid, neighbours, 0)]                      # (m, k, D)
    to_anchor = np.einsum("mkd,md->mk", gathered, vectors[anchors])         # (m, k)
    if min_similarity is not None:
        valid &= to_anchor >= min_similarity
    pairwise = np.einsum("mkd,mjd->mkj", gathered, gathered)                # (m, k, k)
    kept = np.zeros(neighbours.shape, dtype=bool)
    count = np.zeros(len(anchors), dtype=np.int64)
    duplicates = np.zeros(len(anchors), dtype=np.int64)
    for t in range(neighbours.shape[1]):
        open_ = valid[:, t] & (count < need)
        duplicate = (to_anchor[:, t] >= threshold) | ((pairwise[:, t, :] >= threshold) & kept).any(axis=1)
        kept[:, t] = open_ & ~duplicate
        duplicates += open_ & duplicate
        count += kept[:, t]
    return kept, duplicates


def save_clusters(path: str | os.PathLike, clusters: Sequence[Cluster], *,
                  items: Sequence[ImageTextItem] | None = None, stats: ClusterStats | None = None) -> None:
    """Write clusters as JSON, atomically. With `items`, their keys are stored too, so
    `load_clusters` can map the clusters onto a later reading of the same dataset by key."""
    document = {
        "version": CLUSTER_FORMAT_VERSION,
        "keys": None if items is None else [item.key for item in items],
        "clusters": [list(map(int, cluster.members)) for cluster in clusters],
        "stats": None if stats is None else stats.to_dict(),
    }
    path = Path(path)
    handle, temp_name = tempfile.mkstemp(dir=path.absolute().parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as temp_file:
            json.dump(document, temp_file, separators=(",", ":"))
            temp_file.write("\n")
        os.replace(temp_name, path)
    except BaseException:
        os.unlink(temp_name)
        raise


def load_clusters(path: str | os.PathLike, items: Sequence[ImageTextItem] | None = None) -> list[Cluster]:
    """Read clusters written by `save_clusters`.

    Given `items` and a file with keys, member indices are remapped by key onto `items`, and clusters
    with a member no longer present are dropped; without keys, indices must fit `items` as they are.
    """
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: cannot read clusters: {error}") from None
    if not isinstance(document, dict) or document.get("version") != CLUSTER_FORMAT_VERSION:
        raise DataError(f"{path}: version: expected a cluster file of version {CLUSTER_FORMAT_VERSION}")
    keys, raw = document.get("keys"), document.get("clusters")
    if not isinstance(raw, list):
        raise DataError(f"{path}: clusters: expected a list")
    if keys is not None and (not isinstance(keys, list) or not all(isinstance(k, str) for k in keys)):
        raise DataError(f"{path}: keys: expected a list of strings")
    limit = len(keys) if keys is not None else (len(items) if items is not None else None)
    for number, members in enumerate(raw):
        if (not isinstance(members, list) or not members
                or not all(isinstance(m, int) and not isinstance(m, bool) and m >= 0 for m in members)
                or (limit is not None and max(members) >= limit)):
            raise DataError(f"{path}: clusters[{number}]: expected a non-empty list of item indices")
    if items is not None and keys is not None:
        new_index = {item.key: position for position, item in enumerate(items)}
        raw = [[new_index.get(keys[m], -1) for m in members] for members in raw]
        raw = [members for members in raw if min(members) >= 0]
    return [Cluster(members[0], members) for members in raw]


# --------------------------------------------------------------------------------------------
# Examples


class RetrievalExamples:
    """Training examples from clusters: generate one member from its caption, given `num_context`
    other members as [ref#1]..[ref#n] (modality "image", marker text "[ref#k] <caption>").

    Example `i` comes from cluster `i`; which member is the target, which are the contexts, and
    the phrasing are drawn from `rng`, by default one seeded by (seed, i), so an index always
    yields the same example. Images are decoded when an example is built.
    """

    def __init__(self, items: Sequence[ImageTextItem], clusters: Sequence[Cluster], num_context: int = 3,
                 seed: int = 0, *, templates: Sequence[str] = TEMPLATES, modality: str = "image",
                 task: str = "retrieval"):
        if num_context < 1:
            raise ValueError(f"num_context: must be at least 1, got {num_context}")
        if not clusters:
            raise ValueError("clusters: no clusters to build examples from")
        if not templates or not all("{refs}" in t and "{caption}" in t for t in templates):
            raise ValueError("templates: each must contain {refs} and {caption}")
        for number, cluster in enumerate(clusters):
            if len(set(cluster.members)) < num_context + 1:
                raise ValueError(f"clusters[{number}]: {len(set(cluster.members))} distinct members, "
                                 f"need {num_context + 1} (a target and {num_context} contexts)")
            if max(cluster.members) >= len(items) or min(cluster.members) < 0:
                raise ValueError(f"clusters[{number}]: member index out of range for {len(items)} items")
        self.items = items
        self.clusters = list(clusters)
        self.num_context = num_context
        self.seed = seed
        self.templates = tuple(templates)
        self.modality = modality
        self.task = task

    def __len__(self) -> int:
        return len(self.clusters)

    def __getitem__(self, index: int, rng: np.random.Generator | None = None) -> TrainingExample:
        index = operator.index(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} examples")
        index %= len(self)
        rng = np.random.default_rng([self.seed, index]) if rng is None else rng
        members = list(dict.fromkeys(self.clusters[index].members))
        order = rng.permutation(len(members))
        target = self.items[members[order[0]]]
        references = [self.items[members[j]] for j in order[1:1 + self.num_context]]
        template = self.templates[int(rng.integers(len(self.templates)))]
        contexts = [
            Context(id=k, modality=self.modality, text=f"[ref#{k}] {_plain(item.caption)}", image=item.load())
            for k, item in enumerate(references, start=1)
        ]
        text = template.format(refs=_marker_list(len(contexts)), caption=_plain(target.caption))
        return TrainingExample(MultiModalInstruction(text=text, contexts=contexts), target.load(), self.task)


def _marker_list(count: int) -> str:
    markers = [f"[ref#{k}]" for k in range(1, count + 1)]
    return markers[0] if count == 1 else ", ".join(markers[:-1]) + " and " + markers[-1]


# A caption with a marker-like "[ref#2]" in it would refer to a context it does not have.
_MARKER_LIKE = re.compile(r"\[\s*ref\s*#[^\[\]]{0,32}\]", re.IGNORECASE)


def _plain(caption: str) -> str:
    return " ".join(_MARKER_LIKE.sub(" ", caption).split())


# --------------------------------------------------------------------------------------------
# Condition dropout

_REF = MARKER_PATTERN.pattern
# A run of markers ("[ref#1], [ref#2] and [ref#3]") with the phrase that introduces it, if any.
_MARKER_RUN = re.compile(
    r"(?:\b(?:similar to|like|resembling|based on|in the (?:manner|style) of|as in|with|using|from)\s+)?"
    rf"{_REF}(?:\s*(?:,\s*and|,|and|&|or)\s*{_REF})*",
    re.IGNORECASE,
)


def strip_markers(text: str) -> str:
    """`text` with every [ref#N] run (and its introducing phrase) removed and punctuation tidied:
    "Generate an image similar to [ref#1] and [ref#2]: a red car" -> "Generate an image: a red car"."""
    stripped = _MARKER_RUN.sub(" ", text)
    if stripped == text:
        return text
    stripped = re.sub(r"\s+([,.:;!?])", r"\1", " ".join(stripped.split()))
    stripped = re.sub(r"([,:;])(?:\s*[,:;])+", r"\1", stripped)
    stripped = stripped.strip(" ,:;")
    return stripped[:1].upper() + stripped[1:] if stripped[:1] != text.lstrip()[:1] else stripped


def apply_condition_dropout(example: TrainingExample, rng: np.random.Generator, p_drop_all: float = 0.1,
                            p_drop_context: float = 0.1) -> TrainingExample:
    """Classifier-free guidance dropout, one uniform draw from `rng` per call.

    With probability `p_drop_all` the text and the contexts are both dropped (text ""); with
    `p_drop_context` only the contexts, their markers stripped from the text (`strip_markers`);
    otherwise the example is returned unchanged. Dropped examples are built without validation
    since an empty text is exactly what the unconditional branch trains on.
    """
    if p_drop_all < 0 or p_drop_context < 0 or p_drop_all + p_drop_context > 1:
        raise ValueError("p_drop_all, p_drop_context: need both >= 0 and a sum <= 1")
    draw = rng.random()
    instruction = example.instruction
    if draw < p_drop_all:
        text = ""
    elif draw < p_drop_all + p_drop_context:
        text = strip_markers(instruction.text)
    else:
        return example
    dropped = MultiModalInstruction(text=text, contexts=[], negative=instruction.negative,
                                    base_dir=instruction.base_dir)
    return replace(example, instruction=dropped)
