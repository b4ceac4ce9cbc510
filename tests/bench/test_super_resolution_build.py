"""The bundled super-resolution stage's training data, training loop and results page (the harness side)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from instruct_core.tiny import tiny_super_resolution as tiny_stage
from instruct_core.train.checkpointing import list_checkpoints
from instruct_bench import scenes
from instruct_bench.super_resolution import (HIGH_SIZE, LOW_SIZE, RECIPE, new_stage, random_crops, results_page,
                                             train, training_pairs)
from instruct_bench.tasks import make_split


def test_training_pairs_are_one_scene_at_both_sizes():
    low, high, texts = training_pairs(2, seed=5, tasks=("edge_to_image", "styled_generation"), log=lambda line: None)
    assert low.shape == (4, 3, LOW_SIZE, LOW_SIZE) and high.shape == (4, 3, HIGH_SIZE, HIGH_SIZE)
    assert float(low.min()) >= -1 and float(high.max()) <= 1
    example = make_split("edge_to_image", "train", 2, seed=5)[0]
    assert texts[0] == example.instruction.text
    truth = np.asarray(scenes.render(example.scene, HIGH_SIZE), dtype=np.float32) / 127.5 - 1
    assert np.allclose(high[0].permute(1, 2, 0).numpy(), truth, atol=1e-6)
    # the large picture, averaged down, is the small one (up to the renderer's rounding and grain)
    pooled = F.avg_pool2d(high, HIGH_SIZE // LOW_SIZE)
    assert float((pooled - low).abs().mean()) < 0.05
    other = F.avg_pool2d(high.roll(1, 0), HIGH_SIZE // LOW_SIZE)
    assert float((other - low).abs().mean()) > 0.1


def test_crops_take_the_same_window_of_both_sizes():
    low = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    high = F.interpolate(low, scale_factor=4, mode="nearest")
    low_crop, high_crop = random_crops(low, high, 16, 4, torch.Generator().manual_seed(1))
    assert low_crop.shape == (6, 3, 4, 4) and high_crop.shape == (6, 3, 16, 16)
    assert torch.equal(F.interpolate(low_crop, scale_factor=4, mode="nearest"), high_crop)
    assert len({tuple(c.flatten()[:3].tolist()) for c in low_crop}) > 1  # windows differ between rows


def test_the_recipe_builds_a_residual_stage_without_self_attention():
    stage = new_stage(RECIPE, 48)
    assert stage.config.residual and stage.config.residual_scale == RECIPE["residual_scale"]
    attention = [module for name, module in stage.unet.named_modules() if name.endswith("attn1")]
    assert attention and all(module.to_k.in_features == 48 for module in attention)  # keys from the text only
    assert stage.unet.config.cross_attention_dim == 48


def test_training_lowers_the_loss_and_resumes_from_its_checkpoint(tmp_path):
    stage = tiny_stage()
    low = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    high = F.interpolate(low, scale_factor=4, mode="nearest")
    text = torch.randn(8, 5, 32, generator=torch.Generator().manual_seed(1))
    recipe = {"seed": 0, "steps": 250, "batch_size": 4, "crop": 16, "lr": 2e-3, "warmup_steps": 5,
              "text_dropout": 0.1}
    measured = train(stage, low, high, text, torch.zeros(5, 32), recipe, tmp_path, log=lambda line: None)
    assert measured["loss_last_50"] < 0.6 * measured["loss_first_50"]
    assert [path.name for path in list_checkpoints(tmp_path / "checkpoints")] == ["step_000000250"]
    again = tiny_stage(seed=9)  # another start: resuming must replace it with the trained weights
    lines = []
    train(again, low, high, text, torch.zeros(5, 32), recipe, tmp_path, log=lines.append)
    assert lines[0] == "super-resolution: resumed at step 250"
    for name, value in stage.unet.state_dict().items():
        assert torch.equal(again.unet.state_dict()[name], value), name


def test_results_page_shows_the_command_and_every_task():
    interval = (0.5, 0.4, 0.6)
    summary = {name: interval for name in ("edge_f1_stage", "edge_f1_bicubic", "edge_f1_gain", "mask_iou_stage",
                                           "mask_iou_bicubic", "mask_iou_gain", "evaluator_agreement",
                                           "edge_f1_true_input_stage", "edge_f1_true_input_bicubic")}
    summary["edge_f1_true_input_gain"] = (0.1, 0.05, 0.15)
    results = {"settings": {"examples": 48, "seed": 1234, "base_steps": 12,
                            "stage": {"steps": 8, "sampler": "dpmpp_2m", "schedule": "karras_capped",
                                      "noise_level": 100}},
               "tasks": {task: {**summary, "seconds_per_image": {"base": 0.1, "stage": 0.05},
                                "seconds_one_image": {"base": 0.3, "stage": 0.2}}
                         for task in ("edge_to_image", "mask_to_image")}}
    page = results_page(results, "python -m instruct_bench super-resolution", "`abc`", "the machine")
    assert "`python -m instruct_bench super-resolution`" in page and "the machine" in page
    rows = [line for line in page.splitlines() if line.startswith("| edge_to_image") or
            line.startswith("| mask_to_image")]
    assert len(rows) == 6 and "0.500 [0.400, 0.600]" in rows[0] and rows[2].endswith("| 0.300 | 0.200 |")
    assert rows[4] == "| edge_to_image | 0.500 [0.400, 0.600] | 0.500 [0.400, 0.600] | 0.100 [0.050, 0.150] |"
    assert page.index("true 32x32 scenes") < page.index(rows[4])


def test_word_separation_tells_an_encoder_that_reads_words_from_one_that_cannot():
    from instruct_bench.diagnostics import word_separation
    from instruct_core.models import load_pipeline

    pipe = load_pipeline("tiny", device="cpu")
    reading = word_separation(pipe, captions=64)
    assert set(reading) == {"colour", "shape"}
    for kind in reading.values():
        assert kind["probe_accuracy"] > 3 * kind["chance"] and kind["cosine"] < 1.0
    # an encoder that sees no token ids (every embedding the same) holds no word apart
    pipe.base.text_encoders[0].get_input_embeddings().weight.data.zero_()
    blind = word_separation(pipe, captions=64)
    for kind in blind.values():
        assert kind["cosine"] > 0.999 and kind["probe_accuracy"] <= 2 * kind["chance"]
