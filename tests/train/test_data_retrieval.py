"""Stage-1 data: dataset readers and their skip report, faiss clusters, retrieval examples, dropout."""

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image, ImageDraw

from instruct_core.train.data import DataError, DataReport, ImageTextItem, expand_braces, read_dataset
from instruct_core.train.retrieval import (
    TEMPLATES,
    Cluster,
    ModelEmbedder,
    PixelEmbedder,
    PrecomputedEmbedder,
    RetrievalExamples,
    apply_condition_dropout,
    build_index,
    form_clusters,
    load_clusters,
    save_clusters,
    search_neighbours,
    strip_markers,
)

GROUPS = 5
VARIANTS = 6
# Foreground and background per group: disjoint colours, so groups are far apart for PixelEmbedder.
COLOURS = [((230, 40, 40), (250, 250, 240)), ((40, 160, 40), (20, 20, 60)), ((40, 60, 220), (240, 220, 120)),
           ((240, 200, 40), (90, 30, 110)), ((30, 200, 200), (120, 60, 20))]
SHAPES = ["ellipse", "rectangle", "triangle", "ellipse", "rectangle"]


def shape_image(group: int, variant: int, size: int = 32) -> Image.Image:
    """Group = colours and shape; variant = position and size (similar, but not near-duplicates)."""
    fg, bg = COLOURS[group]
    image = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(image)
    x, y, extent = 4 + 3 * (variant % 3), 4 + 4 * (variant // 3), 14 + 2 * variant
    box = [x, y, min(size - 1, x + extent), min(size - 1, y + extent)]
    if SHAPES[group] == "triangle":
        draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=fg)
    else:
        getattr(draw, SHAPES[group])(box, fill=fg)
    return image


def caption(group: int, variant: int) -> str:
    return f"a {SHAPES[group]} in colour scheme {group}, variant {variant}"


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def group_of(key: str) -> int:
    return int(key.split("/")[1][1:])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """5 groups x 6 variants, an exact copy of g0/v0, and six bad records (one per skip reason)."""
    root = tmp_path_factory.mktemp("folder")
    for group in range(GROUPS):
        (root / "shapes" / f"g{group}").mkdir(parents=True)
        for variant in range(VARIANTS):
            stem = root / "shapes" / f"g{group}" / f"v{variant}"
            shape_image(group, variant).save(stem.with_suffix(".png"))
            stem.with_suffix(".txt").write_text(caption(group, variant) + "\n")
    (root / "shapes" / "g0" / "copy.png").write_bytes((root / "shapes" / "g0" / "v0.png").read_bytes())
    (root / "shapes" / "g0" / "copy.txt").write_text("an exact copy of variant 0")
    bad = root / "bad"
    bad.mkdir()
    (bad / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (bad / "corrupt.txt").write_text("corrupt")
    (bad / "truncated.png").write_bytes(png_bytes(shape_image(1, 1))[:-40])  # header fine, data cut
    (bad / "truncated.txt").write_text("truncated")
    shape_image(2, 2).save(bad / "nocaption.png")
    shape_image(3, 3).save(bad / "empty.png")
    (bad / "empty.txt").write_text("  \n\t")
    (bad / "orphan.txt").write_text("a caption without its image")
    Image.new("RGB", (100, 100), (1, 2, 3)).save(bad / "big.png")
    (bad / "big.txt").write_text("too many pixels")
    return root


@pytest.fixture(scope="module")
def items(folder):
    return read_dataset(folder, max_image_pixels=64 * 64)


@pytest.fixture(scope="module")
def pixel_clusters(items):
    embeddings = PixelEmbedder().embed(items)
    return embeddings, *form_clusters(embeddings)


# -- readers ---------------------------------------------------------------------------------


def test_folder_reader_keeps_good_items_and_reports_each_skip(folder):
    report = DataReport()
    items = read_dataset(folder, report=report, max_image_pixels=64 * 64)
    assert len(items) == GROUPS * VARIANTS + 1
    assert [item.key for item in items][:3] == ["shapes/g0/copy.png", "shapes/g0/v0.png", "shapes/g0/v1.png"]
    assert items[1].caption == caption(0, 0)  # trailing newline stripped
    assert report.kept == 31
    assert report.skipped == {"unreadable_image": 2, "missing_caption": 1, "empty_caption": 1,
                              "missing_image": 1, "image_too_large": 1}
    assert sorted(report.examples["unreadable_image"]) == ["bad/corrupt.png", "bad/truncated.png"]
    assert report.examples["missing_caption"] == ["bad/nocaption.png"]
    assert report.examples["missing_image"] == ["bad/orphan.txt"]
    assert report.summary().startswith(f"kept 31 items from {folder}, skipped 6: 2 unreadable_image")
    assert json.loads(json.dumps(report.to_dict()))["skipped"] == report.skipped
    assert np.array_equal(np.asarray(items[1].load()), np.asarray(shape_image(0, 0)))


def test_nothing_usable_raises_data_error_naming_the_source(tmp_path):
    (tmp_path / "a.png").write_bytes(b"garbage")
    (tmp_path / "a.txt").write_text("caption")
    (tmp_path / "b.txt").write_text("orphan")
    report = DataReport()
    with pytest.raises(DataError, match=f"{tmp_path}: no usable items.*1 missing_image.*1 unreadable_image"):
        read_dataset(tmp_path, report=report)
    assert report.kept == 0 and report.total_skipped == 2
    with pytest.raises(DataError, match="no such file"):
        read_dataset(tmp_path / "missing")


def test_jsonl_manifest_resolves_paths_keeps_extra_and_skips_bad_lines(tmp_path):
    (tmp_path / "img").mkdir()
    for variant in range(3):
        shape_image(1, variant).save(tmp_path / "img" / f"{variant}.png")
    records = [
        {"image": "img/0.png", "caption": " a green\nrectangle ", "subject": "box", "group": 1},
        {"image": "img/1.png", "caption": "second", "key": "custom-key"},
        "{not json",
        {"image": "img/missing.png", "caption": "gone"},
        {"image": "img/2.png"},
        {"image": "img/2.png", "caption": ""},
        {"image": 5, "caption": "image is not a path"},
        {"image": "img/2.png", "caption": "same key again", "key": "custom-key"},
    ]
    manifest = tmp_path / "meta" / "train.jsonl"
    manifest.parent.mkdir()
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    manifest.write_text("\n".join(lines).replace("img/", "../img/") + "\n\n")
    report = DataReport()
    items = read_dataset(manifest, report=report)
    assert [item.key for item in items] == ["../img/0.png", "custom-key"]
    assert items[0].caption == "a green rectangle"
    assert items[0].extra == {"subject": "box", "group": 1}
    assert items[1].extra == {}
    assert report.skipped == {"bad_record": 2, "missing_image": 1, "missing_caption": 1, "empty_caption": 1,
                              "duplicate_key": 1}
    assert report.examples["bad_record"] == ["line 3", "line 7"]


def _write_shard(path, samples, compress=False):
    """samples: list of (key, {extension: bytes}) in order."""
    with tarfile.open(path, "w:gz" if compress else "w") as tar:
        for key, members in samples:
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_tar_shards_by_brace_pattern_folder_and_single_file(tmp_path):
    images = {f"{s}{i:02d}": shape_image(s + i % 2, i) for s in range(2) for i in range(3)}
    for shard in range(2):
        samples = [(key, {"png": png_bytes(image), "txt": f"caption {key}".encode(), "json": b"{}"})
                   for key, image in images.items() if key.startswith(str(shard))]
        if shard == 1:
            samples += [("nocap", {"png": png_bytes(images["000"])}), ("noimage", {"txt": b"only text"}),
                        ("corrupt", {"jpg": b"\xff\xd8\xff garbage", "txt": b"bad jpeg"})]
        _write_shard(tmp_path / f"shards-{shard:03d}.tar", samples)
    (tmp_path / "shards-002.tar").write_bytes(b"not a tar file at all" * 40)
    report = DataReport()
    items = read_dataset(str(tmp_path / "shards-{000..002}.tar"), report=report)
    assert [item.key for item in items] == list(images)
    assert report.skipped == {"missing_caption": 1, "missing_image": 1, "unreadable_image": 1,
                              "unreadable_shard": 1}
    assert report.examples["unreadable_shard"] == ["shards-002.tar"]
    for item in items:
        assert item.caption == f"caption {item.key}" and item.image is None  # decoded on demand
        assert np.array_equal(np.asarray(item.load()), np.asarray(images[item.key]))
    assert [i.key for i in read_dataset(tmp_path)] == list(images)
    assert [i.key for i in read_dataset(tmp_path / "shards-000.tar")] == ["000", "001", "002"]


def test_compressed_shard_and_shard_cut_short(tmp_path):
    samples = [(f"k{i}", {"png": png_bytes(shape_image(i, i)), "txt": b"x"}) for i in range(3)]
    _write_shard(tmp_path / "a.tar.gz", samples, compress=True)
    compressed = tmp_path / "gz.tar"
    compressed.write_bytes((tmp_path / "a.tar.gz").read_bytes())
    items = read_dataset(compressed)
    assert np.array_equal(np.asarray(items[2].load()), np.asarray(shape_image(2, 2)))
    _write_shard(tmp_path / "full.tar", samples)
    with tarfile.open(tmp_path / "full.tar") as tar:
        second = tar.getmember("k1.png")
    cut = tmp_path / "cut.tar"
    cut.write_bytes((tmp_path / "full.tar").read_bytes()[: second.offset_data + second.size // 2])
    report = DataReport()
    assert [item.key for item in read_dataset(cut, report=report)] == ["k0"]
    assert report.skipped == {"unreadable_shard": 1}


def test_expand_braces():
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9", "b-10"]
    with pytest.raises(DataError, match="more than"):
        expand_braces("{0..999999999}")


def test_root_confines_manifest_paths_and_symlinks(tmp_path):
    inside, outside = tmp_path / "inside", tmp_path / "outside"
    (inside / "sub").mkdir(parents=True)
    outside.mkdir()
    shape_image(0, 0).save(inside / "ok.png")
    shape_image(1, 1).save(outside / "secret.png")
    (inside / "link.png").symlink_to(outside / "secret.png")
    (inside / "link.txt").write_text("through a symlink")
    (inside / "ok.txt").write_text("fine")
    records = [{"image": "ok.png", "caption": "fine"}, {"image": "../outside/secret.png", "caption": "dots"},
               {"image": str(outside / "secret.png"), "caption": "absolute"},
               {"image": "link.png", "caption": "link"}, {"image": "sub/../ok.png", "caption": "stays", "key": "k"}]
    manifest = inside / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in records))
    report = DataReport()
    items = read_dataset(manifest, root=inside, report=report)
    assert [item.key for item in items] == ["ok.png", "k"]
    assert report.skipped == {"outside_root": 3}
    report = DataReport()
    assert [item.key for item in read_dataset(inside, root=inside, report=report)] == ["ok.png"]
    assert report.skipped == {"outside_root": 1}
    with pytest.raises(DataError, match="outside the allowed root"):
        read_dataset(outside, root=inside)
    assert len(read_dataset(manifest)) == 5  # without a root, nothing is confined


# -- embeddings, index, clusters -------------------------------------------------------------


def test_pixel_clusters_have_five_members_from_the_anchor_group_without_copies(items, pixel_clusters):
    embeddings, clusters, stats = pixel_clusters
    norms = np.linalg.norm(embeddings, axis=1)
    assert embeddings.dtype == np.float32 and np.allclose(norms, 1, atol=1e-5)
    assert stats.clusters == len(clusters) == len(items) and stats.too_few_neighbours == 0
    copy, original = 0, 1  # shapes/g0/copy.png is an exact copy of shapes/g0/v0.png
    assert items[copy].key.endswith("copy.png") and items[original].key.endswith("v0.png")
    for index, cluster in enumerate(clusters):
        assert cluster.anchor == index == cluster.members[0]
        assert len(cluster.members) == len(set(cluster.members)) == 5
        assert {group_of(items[m].key) for m in cluster.members} == {group_of(items[index].key)}
        assert not {copy, original} <= set(cluster.members)
    assert stats.duplicates_removed >= 2  # each copy is removed at least from the other's cluster


def _reference_clusters(embeddings, top_k, size, threshold):
    """form_clusters written as the papers describe it, one anchor at a time."""
    x = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    sims = x @ x.T
    clusters, too_few, duplicates = [], 0, 0
    for anchor in range(len(x)):
        ranked = [j for j in np.argsort(-sims[anchor], kind="stable") if j != anchor][:top_k]
        kept = [anchor]
        for j in ranked:
            if len(kept) == size:
                break
            if any(sims[j, m] >= threshold for m in kept):
                duplicates += 1
            else:
                kept.append(int(j))
        if len(kept) == size:
            clusters.append(kept)
        else:
            too_few += 1
    return clusters, too_few, duplicates


def test_form_clusters_agrees_with_reference_on_planted_duplicates():
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(150, 8)).astype(np.float32)
    embeddings[10:40] = embeddings[0:30] + 0.01 * rng.normal(size=(30, 8))  # near-duplicates
    embeddings[40:45] = embeddings[0] + 1e-4 * rng.normal(size=(5, 8))     # copies (no exact ties)
    clusters, stats = form_clusters(embeddings, top_k=10, cluster_size=5, duplicate_threshold=0.98)
    expected, too_few, duplicates = _reference_clusters(embeddings, 10, 5, 0.98)
    assert [c.members for c in clusters] == expected
    assert (stats.too_few_neighbours, stats.duplicates_removed) == (too_few, duplicates)
    assert duplicates > 30


def test_clusters_too_small_after_duplicates_are_dropped_and_counted():
    embeddings = np.eye(5, dtype=np.float32) + 0.1
    embeddings[1] = embeddings[0]
    clusters, stats = form_clusters(embeddings)
    assert clusters == []
    assert (stats.items, stats.clusters, stats.too_few_neighbours, stats.duplicates_removed) == (5, 0, 5, 5)
    clusters, stats = form_clusters(embeddings[1:], cluster_size=4)
    assert len(clusters) == 4
    _, stats = form_clusters(embeddings[1:], cluster_size=4, min_similarity=0.99)
    assert stats.too_few_neighbours == 4


def test_ivf_and_hnsw_find_the_flat_neighbours_on_separated_groups():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(8, 16)) * 10
    embeddings = (np.repeat(centres, 50, axis=0) + rng.normal(size=(400, 16))).astype(np.float32)
    _, exact = search_neighbours(build_index(embeddings, "flat"), embeddings, 6)
    assert (exact[:, 0] == np.arange(400)).all()
    for index in (build_index(embeddings, "ivf", nlist=8, nprobe=2), build_index(embeddings, "hnsw")):
        _, found = search_neighbours(index, embeddings, 6)
        assert np.array_equal(np.sort(found, axis=1), np.sort(exact, axis=1))
    assert build_index(embeddings).ntotal == 400  # auto: flat at this size
    with pytest.raises(ValueError, match="kind"):
        build_index(embeddings, "lsh")


def test_precomputed_npy_by_order_and_npz_by_key(tmp_path, items):
    rng = np.random.default_rng(2)
    embeddings = rng.normal(size=(len(items), 12)).astype(np.float32)
    np.save(tmp_path / "e.npy", embeddings)
    expected = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    assert np.allclose(PrecomputedEmbedder(tmp_path / "e.npy").embed(items), expected, atol=1e-6)
    order = rng.permutation(len(items))
    keys = np.array([items[i].key for i in order])
    np.savez(tmp_path / "e.npz", keys=keys, embeddings=embeddings[order])
    assert np.allclose(PrecomputedEmbedder(tmp_path / "e.npz").embed(items), expected, atol=1e-6)
    with pytest.raises(ValueError, match="rows for 30 items"):
        PrecomputedEmbedder(tmp_path / "e.npy").embed(items[1:])
    stranger = ImageTextItem("not/there.png", "x")
    with pytest.raises(ValueError, match="no embedding for key 'not/there.png'"):
        PrecomputedEmbedder(tmp_path / "e.npz").embed([stranger])


def test_clusters_from_crafted_precomputed_embeddings(tmp_path, items):
    """Row = group axis + t * private axis with t growing with the variant number, so an anchor's
    neighbours are its group ordered by variant; the copy of v0 shares v0's row exactly."""
    rows = np.zeros((len(items), 64), np.float32)
    variant = [0 if item.key.endswith("copy.png") else int(item.key[-5]) for item in items]
    for row, item in enumerate(items):
        rows[row, group_of(item.key)] = 1.0
        rows[row, 8 + row] = 0.3 + 0.1 * variant[row]
    copy, original = 0, 1
    rows[copy] = rows[original]
    np.savez(tmp_path / "crafted.npz", keys=np.array([item.key for item in items]), embeddings=rows)
    clusters, stats = form_clusters(PrecomputedEmbedder(tmp_path / "crafted.npz").embed(items))
    assert stats.clusters == len(items)

    def canonical(j):  # the copy and v0 tie; whichever comes first is kept, the other removed
        return copy if j == original else j

    for cluster in clusters:
        group = [j for j in range(len(items)) if group_of(items[j].key) == group_of(items[cluster.anchor].key)]
        ranked = sorted((j for j in group if j != cluster.anchor), key=lambda j: variant[j])
        expected = list(dict.fromkeys(canonical(j) for j in [cluster.anchor] + ranked))[:5]
        assert [canonical(m) for m in cluster.members] == expected
    assert stats.duplicates_removed == 7  # one per anchor of group 0: the copy or v0


def test_model_embedder_on_tiny_model_is_normalised_and_batch_invariant(items):
    from instruct_core.pipeline import InstructImagen
    from instruct_core.tiny import build_tiny_base

    pipe = InstructImagen.from_base(build_tiny_base())
    subset = items[1:6]
    one = ModelEmbedder(pipe, batch_size=1).embed(subset)
    batched = ModelEmbedder(pipe, batch_size=4).embed(subset)
    deepest = pipe.base.unet.config.block_out_channels[-1]
    text_dim = pipe.base.text_encoders[0].config.hidden_size
    assert one.shape == (5, deepest + text_dim) and one.dtype == np.float32
    assert np.isfinite(one).all() and np.allclose(np.linalg.norm(one, axis=1), 1, atol=1e-5)
    # Each half is unit length on its own: image and caption count equally.
    assert np.allclose(np.linalg.norm(one[:, :deepest], axis=1), 2 ** -0.5, atol=1e-5)
    assert np.allclose(one, batched, atol=1e-4)
    assert np.abs(one[0] - one[1]).max() > 1e-3


# -- examples and dropout --------------------------------------------------------------------


def test_retrieval_examples_pick_three_other_members_deterministically(items, pixel_clusters):
    _, clusters, _ = pixel_clusters
    examples = RetrievalExamples(items, clusters, num_context=3, seed=5)
    assert len(examples) == len(clusters)
    by_caption = {item.caption: index for index, item in enumerate(items)}
    phrasings = set()
    for index in range(len(examples)):
        example = examples[index]
        instruction = example.instruction
        assert instruction.validate() == []  # every context referenced, markers well formed
        assert [c.id for c in instruction.contexts] == [1, 2, 3]
        assert {c.modality for c in instruction.contexts} == {"image"}
        context_members = [by_caption[c.text.removeprefix(f"[ref#{c.id}] ")] for c in instruction.contexts]
        [target_member] = [member for text, member in by_caption.items() if text in instruction.text]
        assert target_member not in context_members and len(set(context_members)) == 3
        assert set(context_members) | {target_member} <= set(clusters[index].members)
        assert np.array_equal(np.asarray(example.target), np.asarray(items[target_member].load()))
        for context, member in zip(instruction.contexts, context_members):
            assert np.array_equal(np.asarray(context.image), np.asarray(items[member].load()))
        phrasings.add(instruction.text.replace(items[target_member].caption, "{caption}"))
    assert len(phrasings) >= 3
    again = RetrievalExamples(items, clusters, num_context=3, seed=5)
    assert all(again[i].instruction == examples[i].instruction for i in (0, 7, -1))
    other = RetrievalExamples(items, clusters, num_context=3, seed=6)
    assert any(other[i].instruction.text != examples[i].instruction.text for i in range(len(examples)))
    with pytest.raises(IndexError):
        examples[len(examples)]


def test_strip_markers_leaves_a_plain_instruction_for_every_template():
    refs = "[ref#1], [ref#2] and [ref#3]"
    stripped = [strip_markers(t.format(refs=refs, caption="a red ball")) for t in TEMPLATES]
    assert stripped == ["Generate an image: a red ball", "Create an image: a red ball", "a red ball",
                        "Generate an image of a red ball", "Make a picture showing a red ball"]
    assert strip_markers("Render [ref#1] in the style of [ref#2].") == "Render."
    assert strip_markers("no markers here , kept as is") == "no markers here , kept as is"


def test_condition_dropout_frequencies_and_consistency(items, pixel_clusters):
    _, clusters, _ = pixel_clusters
    example = RetrievalExamples(items, clusters[:1], seed=0)[0]
    rng = np.random.default_rng(123)
    outcomes = {"all": 0, "contexts": 0, "none": 0}
    draws = [apply_condition_dropout(example, rng) for _ in range(2000)]
    for dropped in draws:
        text, contexts = dropped.instruction.text, dropped.instruction.contexts
        if dropped is example:
            outcomes["none"] += 1
        elif text == "":
            assert contexts == []
            outcomes["all"] += 1
        else:
            assert contexts == [] and text == strip_markers(example.instruction.text)
            assert "[ref#" not in text and dropped.target is example.target
            outcomes["contexts"] += 1
    assert abs(outcomes["all"] / 2000 - 0.1) < 0.025
    assert abs(outcomes["contexts"] / 2000 - 0.1) < 0.025
    assert abs(outcomes["none"] / 2000 - 0.8) < 0.03
    rng = np.random.default_rng(123)
    assert [apply_condition_dropout(example, rng).instruction.text for _ in range(50)] == \
        [d.instruction.text for d in draws[:50]]
    with pytest.raises(ValueError, match="sum"):
        apply_condition_dropout(example, rng, 0.6, 0.6)


def test_clusters_round_trip_and_remap_by_key(tmp_path, items, pixel_clusters):
    _, clusters, stats = pixel_clusters
    save_clusters(tmp_path / "c.json", clusters, items=items, stats=stats)
    assert load_clusters(tmp_path / "c.json") == clusters
    assert json.loads((tmp_path / "c.json").read_text())["stats"] == stats.to_dict()
    reordered = items[::-1][:-1]  # reversed, and the first item gone
    position = {item.key: i for i, item in enumerate(reordered)}
    remapped = load_clusters(tmp_path / "c.json", reordered)
    expected = [[position[items[m].key] for m in c.members] for c in clusters
                if all(items[m].key in position for m in c.members)]
    assert [c.members for c in remapped] == expected and 0 < len(remapped) < len(clusters)
    (tmp_path / "bad.json").write_text(json.dumps({"version": 1, "keys": ["a"], "clusters": [[0, 3]]}))
    with pytest.raises(DataError, match=r"clusters\[0\]"):
        load_clusters(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="distinct members"):
        RetrievalExamples(items, [Cluster(0, [0, 1, 2])])
