"""The routing-ceiling diagnosis: the base's text cross-attention given which object's words each pixel reads."""

import json

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from instruct_bench import scenes, tasks
from instruct_bench.cli import main
from instruct_bench.evaluation import EVALUATOR_FILE, EvalSettings
from instruct_bench.given_routing import GivenRouting, GivenRoutingProcessor, given, phrase_tokens, routed_generate
from instruct_core.train.trainer import example_to_tensors

needs_evaluator = pytest.mark.skipif(not EVALUATOR_FILE.is_file(), reason="no evaluator bundled")


def _fresh_default_pipe():
    from instruct_bench.build_default import build_default_base, with_fresh_adapter

    return with_fresh_adapter(build_default_base(seed=0))


@pytest.fixture(scope="module")
def pipe():
    return _fresh_default_pipe()


@pytest.fixture(scope="module")
def two_objects():
    """A text-to-image test example of two plain objects apart."""
    for example in tasks.make_split("text_to_image", "test", 16, seed=1234):
        plain = [o for o in example.scene.objects if o.subject is None]
        if len(plain) == 2 and not np.triu(scenes.overlaps(example.scene), 1).any():
            return example
    raise AssertionError("no two-object example in the first 16")


def _first_text_attention(pipe) -> Attention:
    return next(m for name, m in pipe.base.unet.named_modules() if isinstance(m, Attention) and name.endswith("attn2"))


def _object_cover(scene, side: int) -> np.ndarray:
    """(objects, side*side): the share of each cell of a side x side grid that each object covers."""
    masks = scenes.layout(scene, 32).object_masks.astype(np.float32)
    block = 32 // side
    return masks.reshape(len(masks), side, block, side, block).mean((2, 4)).reshape(len(masks), -1)


def test_phrase_tokens_hold_each_object_s_words(pipe, two_objects):
    text = two_objects.instruction.text
    phrases = phrase_tokens(pipe, text, two_objects.scene.objects)
    ids = pipe.base.tokenizers[0](text, verbose=False).input_ids
    for obj, phrase in zip(two_objects.scene.objects, phrases):
        words = pipe.base.tokenizers[0].decode([ids[i] for i in phrase])
        assert words == scenes.placed_phrase(obj)
    assert phrase_tokens(pipe, text.replace(two_objects.scene.objects[1].where, "nowhere"),
                         two_objects.scene.objects) is None


@pytest.mark.parametrize("strict", [False, True])
def test_an_object_s_pixels_attend_as_if_the_other_phrase_were_not_there(pipe, two_objects, strict):
    text, scene = two_objects.instruction.text, two_objects.scene
    routing = GivenRouting(strict=strict)
    assert routing.set_examples(pipe, [text], [scene], 32) == 1
    attn = _first_text_attention(pipe)
    side = 16
    torch.manual_seed(0)
    hidden = torch.randn(1, side * side, attn.to_q.in_features)
    context = pipe.encode_text([text])[0]
    stock = AttnProcessor2_0()
    with torch.no_grad():
        routed = GivenRoutingProcessor(routing, stock)(attn, hidden, context)
        free = stock(attn, hidden, context)
    assert routing.matched == 1
    phrases = phrase_tokens(pipe, text, scene.objects)
    cover = _object_cover(scene, side)
    tokens = range(context.shape[1])
    for own, other in ((0, 1), (1, 0)):
        pixel = int(np.flatnonzero((cover[own] > 0.5) & (cover[other] == 0))[0])  # one object's alone
        open_tokens = ([t for t in tokens if t == 0 or t in phrases[own]] if strict else
                       [t for t in tokens if t not in phrases[other]])
        with torch.no_grad():  # diffusers' own attention over the open tokens only
            expected = stock(attn, hidden[:, pixel:pixel + 1], context[:, open_tokens])
        torch.testing.assert_close(routed[:, pixel], expected[:, 0], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(routed[:, pixel], free[:, pixel], atol=1e-4)
    background = int(np.flatnonzero(cover.max(0) == 0)[0])  # reads neither phrase, in both modes
    with torch.no_grad():
        expected = stock(attn, hidden[:, background:background + 1],
                         context[:, [t for t in tokens if t not in phrases[0] + phrases[1]]])
    torch.testing.assert_close(routed[:, background], expected[:, 0], rtol=1e-4, atol=1e-5)


def test_a_text_two_examples_give_different_masks_is_not_routed(pipe, two_objects):
    from dataclasses import replace

    text, scene = two_objects.instruction.text, two_objects.scene
    moved = replace(scene, objects=tuple(replace(o, position=(abs(o.position[0] - 0.1), o.position[1]))
                                         for o in scene.objects))
    assert not np.array_equal(scenes.layout(moved, 32).object_masks, scenes.layout(scene, 32).object_masks)
    routing = GivenRouting()
    assert routing.set_examples(pipe, [text, text], [scene, scene], 32) == 1
    assert routing.set_examples(pipe, [text, text], [scene, None], 32) == 0  # one of the two is not routed
    assert routing.set_examples(pipe, [text, text], [scene, moved], 32) == 0


def test_shown_masks_give_the_overlap_to_the_nearer_object_s_phrase(pipe):
    example = tasks.make_split("depth_to_image", "test", 1, seed=1234)[0]
    scene, text = example.scene, example.instruction.text
    near = 0 if scene.objects[0].depth < scene.objects[1].depth else 1
    plan = scenes.layout(scene, 32)
    overlap = (plan.object_masks[0] & plan.object_masks[1] & plan.shown_masks()[near]).reshape(-1)
    apart = (plan.object_masks[1 - near] & plan.shown_masks()[1 - near] & ~plan.object_masks[near]).reshape(-1)
    assert overlap.any() and apart.any()
    blocked = {}
    for masks in ("whole", "shown"):
        routing = GivenRouting(masks=masks)
        assert routing.set_examples(pipe, [text], [scene], 32) == 1
        row = routing.rows[0]
        blocked[masks] = routing.blocked(row, 32)
        far_phrase, near_phrase = row.phrases[1 - near], row.phrases[near]
    assert not blocked["whole"][overlap][:, far_phrase + near_phrase].any()  # both phrases open
    assert blocked["shown"][overlap][:, far_phrase].all() and not blocked["shown"][overlap][:, near_phrase].any()
    for masks in ("whole", "shown"):  # where only the farther object is, its phrase stays open either way
        assert not blocked[masks][apart][:, far_phrase].any() and blocked[masks][apart][:, near_phrase].all()
    with pytest.raises(ValueError, match="masks"):
        GivenRouting(masks="visible")


def test_rows_it_does_not_know_pass_through_unchanged(pipe, two_objects):
    routing = GivenRouting()
    routing.set_examples(pipe, [two_objects.instruction.text], [two_objects.scene], 32)
    attn = _first_text_attention(pipe)
    hidden = torch.randn(2, 256, attn.to_q.in_features)
    other = pipe.encode_text(["a small red circle in the middle", ""])[0]
    stock = AttnProcessor2_0()
    with torch.no_grad():
        assert torch.equal(GivenRoutingProcessor(routing, stock)(attn, hidden, other), stock(attn, hidden, other))
    assert routing.matched == 0


def test_sampling_with_the_routing_reaches_the_model_and_restores_it(pipe):
    examples = tasks.make_split("text_to_image", "test", 2, seed=1234)
    before = [m.processor for m in pipe.base.unet.modules() if isinstance(m, Attention)]
    wrapped = [getattr(p, "base_processor", None) for p in before]
    routing = GivenRouting()
    images = routed_generate(routing)(pipe, examples, EvalSettings(steps=2))
    assert len(images) == 2 and routing.matched > 0
    after = [m.processor for m in pipe.base.unet.modules() if isinstance(m, Attention)]
    assert after == before and [getattr(p, "base_processor", None) for p in after] == wrapped
    with given(pipe, routing):
        assert any(isinstance(getattr(m.processor, "base_processor", None), GivenRoutingProcessor)
                   for m in pipe.base.unet.modules() if isinstance(m, Attention))


def test_benchmark_training_examples_carry_their_scene_to_the_trainer():
    dataset = tasks.BenchmarkTaskDataset({"text_to_image": 1.0}, length=4, seed=0)
    tensors = example_to_tensors(dataset[1], 32)
    assert tensors.annotations["scene"] == dataset.example(1).scene


@pytest.mark.parametrize("routed,share", [(True, 1.0), (True, 0.0), (False, 1.0)])
def test_training_with_the_routing_routes_its_batches_and_trains_the_text_encoder(tmp_path, routed, share):
    from instruct_bench.given_routing import train

    pipe = _fresh_default_pipe()
    encoder = pipe.base.text_encoders[0]
    start = {name: value.clone() for name, value in encoder.state_dict().items()}
    processors = [getattr(m.processor, "base_processor", None) for m in pipe.base.unet.modules()
                  if isinstance(m, Attention)]
    routing = GivenRouting()
    result = train(pipe, routing if routed else None, 2, tmp_path / "run", train_text_encoder=True,
                   routed_share=share)
    assert result.step == 2 and all(np.isfinite(result.losses))
    assert (routing.matched > 0) == (routed and share > 0)
    assert processors == [getattr(m.processor, "base_processor", None) for m in pipe.base.unet.modules()
                          if isinstance(m, Attention)]
    assert any(not torch.equal(value, start[name]) for name, value in encoder.state_dict().items())
    assert not any(p.requires_grad for p in encoder.parameters())


def test_given_routing_refuses_bad_arguments_before_loading(capsys):
    assert main(["given-routing", "--steps", "-1"]) == 2
    assert "--steps" in capsys.readouterr().err
    assert main(["given-routing", "--tasks", "text_to_image,colouring"]) == 2
    assert "colouring" in capsys.readouterr().err
    assert main(["given-routing", "--examples", "0"]) == 2
    assert main(["given-routing", "--routed-share", "1.5"]) == 2
    assert "--routed-share" in capsys.readouterr().err
    assert main(["given-routing", "--routed-share", "0.5", "--train-unrouted"]) == 2
    assert "--train-unrouted" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["given-routing", "--masks", "visible"])
    assert exit_.value.code == 2 and "--masks" in capsys.readouterr().err


@needs_evaluator
def test_given_routing_reports_the_bundled_model_routed(capsys):
    assert main(["given-routing", "--steps", "0", "--examples", "2", "--tasks", "text_to_image"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["routed_rows"] > 0
    colour = report["routed"]["text_to_image"]["colour"]
    assert len(colour) == 3 and 0.0 <= colour[1] <= colour[0] <= colour[2] <= 1.0
