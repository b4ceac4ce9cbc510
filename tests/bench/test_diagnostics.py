"""The diagnoses of what limits the bundled model: where its images put the named colours, and which object they
draw in front, read from the images themselves."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from instruct_bench import scenes, tasks
from instruct_bench.cli import main
from instruct_bench.diagnostics import colour_reading, drawing_report, drawn_depth_order
from instruct_bench.evaluation import EVALUATOR_FILE, EvalSettings, load_evaluator
from instruct_bench.metrics import EvaluatorOutput

needs_evaluator = pytest.mark.skipif(not EVALUATOR_FILE.is_file(), reason="no evaluator bundled")


def _reading(colours_at_cells: dict[int, str]) -> EvaluatorOutput:
    """An evaluator's reading of one image: the given colour at each given cell, nothing elsewhere."""
    colour = np.full((1, 9, len(scenes.COLOURS)), 0.01, dtype=np.float32)
    for cell, name in colours_at_cells.items():
        colour[0, cell, list(scenes.COLOURS).index(name)] = 0.9
    empty = np.zeros((1, 9, 2), dtype=np.float32)
    return EvaluatorOutput(shape=empty, colour=colour, size=empty, subject=empty, style=np.zeros((1, 2)),
                           clean=np.ones(1))


def _two_object_example(first: str, second: str):
    rng = np.random.default_rng(3)
    scene = scenes.sample_scene(rng, num_objects=2)
    objects = (replace(scene.objects[0], colour=first, subject=None),
               replace(scene.objects[1], colour=second, subject=None))
    scene = replace(scene, objects=objects, style=None)
    return tasks.BenchExample("text_to_image", None, None, scene, {})


def test_colour_reading_tells_colours_at_their_place_from_swapped_and_missing_ones():
    example = _two_object_example("red", "blue")
    first, second = (obj.cell for obj in example.scene.objects)
    right = colour_reading([example], _reading({first: "red", second: "blue"}))
    assert (right["at_place"], right["elsewhere"], right["absent"], right["objects"]) == (1.0, 0.0, 0.0, 2)
    assert right["at_place_2"] == 1.0
    swapped = colour_reading([example], _reading({first: "blue", second: "red"}))
    assert (swapped["at_place"], swapped["elsewhere"], swapped["absent"]) == (0.0, 1.0, 0.0)
    missing = colour_reading([example], _reading({first: "red", second: "green"}))
    assert (missing["at_place"], missing["elsewhere"], missing["absent"]) == (0.5, 0.0, 0.5)


def test_a_colour_two_objects_share_is_not_counted_as_drawn_on_the_other():
    example = _two_object_example("red", "red")
    first, second = (obj.cell for obj in example.scene.objects)
    reading = colour_reading([example], _reading({first: "green", second: "red"}))
    assert (reading["at_place"], reading["elsewhere"], reading["absent"]) == (0.5, 0.0, 0.5)


@pytest.fixture(scope="module")
def depth_examples():
    settings = EvalSettings()
    examples = tasks.make_split("depth_to_image", settings.split, 16, seed=settings.seed)
    return [e for e in examples if drawn_depth_order(e.target, e.scene) is not None]


def test_drawn_depth_order_reads_the_true_image_and_its_swap(depth_examples):
    assert len(depth_examples) >= 8
    for example in depth_examples:
        swapped = tasks.swap_depths(example)
        assert drawn_depth_order(example.target, example.scene) > 0.9
        # the other object drawn in front, judged against the scene that puts the first one in front
        assert drawn_depth_order(swapped.target, example.scene) < 0.1


def test_drawn_depth_order_needs_no_named_colour_but_two_drawn_ones(depth_examples):
    example = depth_examples[0]
    pixels = np.asarray(example.target).astype(np.int16)
    recoloured = Image.fromarray(np.clip(255 - pixels, 0, 255).astype(np.uint8))  # every colour changed
    assert drawn_depth_order(recoloured, example.scene) > 0.9
    flat = Image.new("RGB", example.target.size, (128, 128, 128))
    assert drawn_depth_order(flat, example.scene) is None


def test_drawn_depth_order_is_none_without_overlapping_objects():
    example = _two_object_example("red", "blue")
    apart = not np.triu(scenes.overlaps(example.scene), 1).any()
    assert apart and drawn_depth_order(scenes.render(example.scene, 32), example.scene) is None


@needs_evaluator
def test_the_drawing_report_on_the_true_images_reads_every_colour_and_order():
    report = drawing_report(None, load_evaluator(), EvalSettings(examples_per_task=6))
    assert set(report) == {"text_to_image", "edge_to_image", "sketch_to_image", "mask_to_image", "depth_to_image"}
    for task, reading in report.items():
        assert reading["at_place"] >= 0.9 and reading["elsewhere"] == 0.0, task
    depth = report["depth_to_image"]
    assert depth["depth_order"] > 0.95 and depth["drawn_depth_order"] > 0.95 and depth["drawn_swap"] == 1.0
    assert depth["drawn_readable"] >= 3 and depth["depth_order_readable"] == 6


def test_diagnose_refuses_the_true_images_without_examples(capsys):
    assert main(["diagnose", "--variants", "truth", "--examples", "0"]) == 2
    assert "truth" in capsys.readouterr().err
    assert main(["diagnose", "--examples", "-1"]) == 2


def _fresh_default_pipe():
    from instruct_bench.build_default import build_default_base, with_fresh_adapter

    return with_fresh_adapter(build_default_base(seed=0))


def _route_by_colour(pipe, examples, swap: bool = False) -> None:
    """Forward hooks that make every text cross-attention attend, at each object's pixels, to the tokens of that
    object's colour word wherever the encoder reads them (with `swap`, the other object's): queries become
    one-hot object indicators, keys one-hot indicators of the colour each token names. Found from the encoder's
    own input ids and pooled with torch, apart from how `text_routing` finds them."""
    import torch.nn.functional as F
    from diffusers.models.attention_processor import Attention

    tokenizer = pipe.base.tokenizers[0]
    by_text = {e.instruction.text: e for e in examples}
    current = {}

    def remember_ids(module, args, kwargs):
        if current.pop("instruction_text", False):  # not a context's marker text
            current["ids"] = args[0] if args else kwargs["input_ids"]

    def remember_example(texts):
        example = by_text.get(texts[0])
        if example is not None:
            plain = [o for o in example.scene.objects if o.subject is None]
            current["colours"] = [tokenizer.convert_tokens_to_ids(o.colour + "</w>") for o in plain]
            masks = torch.from_numpy(scenes.layout(example.scene, pipe.native_size).object_masks.copy())
            current["masks"] = [masks[i].float() for i, o in enumerate(example.scene.objects) if o.subject is None]
            current["instruction_text"] = True
        return encode(texts)

    def query(module, args, out):
        side = int(round(out.shape[1] ** 0.5))
        one_hot = torch.zeros_like(out)
        for index, mask in enumerate(current["masks"]):
            cells = F.adaptive_avg_pool2d(mask[None, None], side)[0, 0] > 0.5
            target = (index + 1) % len(current["masks"]) if swap else index
            one_hot[0, cells.reshape(-1), target] = 200.0
        return one_hot

    def key(module, args, out):
        ids = current["ids"][: out.shape[1] // current["ids"].shape[1]].reshape(-1)  # the text's own windows
        one_hot = torch.zeros_like(out)
        for index, colour in enumerate(current["colours"]):
            one_hot[:, ids == colour, index] = 1.0
        return one_hot

    encode = pipe.encode_text
    pipe.encode_text = remember_example
    pipe.base.text_encoders[0].register_forward_pre_hook(remember_ids, with_kwargs=True)
    for name, module in pipe.base.unet.named_modules():
        if isinstance(module, Attention) and name.endswith("attn2"):
            module.heads = 1  # one head of every channel, so an indicator is one head's whole query
            module.to_q.register_forward_hook(query)
            module.to_k.register_forward_hook(key)


@pytest.mark.parametrize("task,swap", [("text_to_image", False), ("text_to_image", True), ("mask_to_image", False)])
def test_text_routing_reads_which_object_a_word_is_attended_at(task, swap):
    from instruct_bench.diagnostics import text_routing

    pipe = _fresh_default_pipe()
    examples = tasks.make_split(task, "test", 8, seed=1234)
    # the swap sends each object's pixels to the next object's colour: with two objects, the other one's
    assert all(sum(o.subject is None for o in e.scene.objects) <= 2 for e in examples)
    if task == "mask_to_image":  # texts longer than the encoder's window: read in windows
        tokenizer = pipe.base.tokenizers[0]
        assert any(len(tokenizer(e.instruction.text, verbose=False).input_ids) > tokenizer.model_max_length
                   for e in examples)
    _route_by_colour(pipe, examples, swap=swap)
    routed = text_routing(pipe, task, examples=8)
    colour = routed["colour"]
    assert colour["pairs"] >= 3 and len(colour["by_layer"]) == 7
    if swap:  # every object's pixels read the other object's colour word
        assert max(colour["share"], colour["mass_share"], colour["best_head"]) < 0.02
    else:
        assert min(colour["share"], colour["mass_share"], colour["best_head"]) > 0.98
    # the objects' place words get no attention of their own: they are not routed
    assert abs(routed["place"]["share"] - 0.5) < 0.02


def test_text_routing_of_a_text_read_alike_everywhere_is_one_half():
    from diffusers.models.attention_processor import Attention

    from instruct_bench.diagnostics import text_routing

    pipe = _fresh_default_pipe()
    for module in pipe.base.unet.modules():
        if isinstance(module, Attention) and module.is_cross_attention:
            module.to_k.weight.data.zero_()  # every key alike: each pixel attends to every token the same
    routed = text_routing(pipe, "mask_to_image", examples=12)
    for kind in ("colour", "shape", "place"):
        assert routed[kind]["pairs"] >= 1
        for figure in ("share", "mass_share", "best_head"):
            assert abs(routed[kind][figure] - 0.5) < 1e-4


def test_encoder_binding_tells_an_object_s_own_colour_from_the_other_s():
    from instruct_bench.diagnostics import encoder_binding
    from instruct_core.models import load_pipeline

    pipe = load_pipeline("tiny", device="cpu")
    bound = encoder_binding(pipe, captions=200)
    chance = 1 / len(scenes.COLOURS)
    # a causal encoder's first object comes before the other colour is named: it carries its own colour only
    assert bound["first"]["own"] > 3 * chance and bound["first"]["other"] <= 2 * chance
    assert bound["first"]["shuffled"] <= 2 * chance
    pipe.base.text_encoders[0].get_input_embeddings().weight.data.zero_()
    blind = encoder_binding(pipe, captions=200)
    for index in ("first", "second"):
        assert blind[index]["own"] <= 2 * chance and blind[index]["other"] <= 2 * chance


def test_diagnose_reports_the_encoder_s_binding_with_the_given_captions_and_seed(capsys):
    import json

    from instruct_bench.diagnostics import encoder_binding
    from instruct_bench.evaluation import variant_pipe

    assert main(["diagnose", "--variants", "full", "--examples", "0", "--captions", "40", "--seed", "3"]) == 0
    report = json.loads(capsys.readouterr().out)["full"]
    assert set(report) == {"words", "binding"}  # no images asked for: no drawing, no routing
    assert report["binding"] == encoder_binding(variant_pipe("full"), captions=40, seed=3)
