"""The super-resolution stage: sampling, its file, its checks, and the pipeline running it after the base."""

from __future__ import annotations

import pytest
import torch

from instruct_core.errors import InstructImagenError, MissingFileError
from instruct_core.instruction import MultiModalInstruction
from instruct_core.models import load_pipeline
from instruct_core.super_resolution import SUPER_RESOLUTION_WEIGHTS, SuperResolution, SuperResolutionError
from instruct_core.tiny import tiny_super_resolution

TEXT_WIDTH = 32  # the tiny base's text encoder


def tiny_stage(seed: int = 0, steps: int = 3, residual: bool = False) -> SuperResolution:
    stage = tiny_super_resolution(seed=seed, steps=steps, text_width=TEXT_WIDTH)
    stage.config.residual = residual
    return stage


def images(rows: int = 2, side: int = 8) -> torch.Tensor:
    return torch.rand(rows, 3, side, side, generator=torch.Generator().manual_seed(1))


def text(rows: int = 1) -> torch.Tensor:
    return torch.randn(rows, 5, TEXT_WIDTH, generator=torch.Generator().manual_seed(2))


def test_upscale_gives_factor_times_the_size_and_a_seed_gives_one_picture():
    stage = tiny_stage()
    first = stage.upscale(images(), text(), seed=3)
    assert first.shape == (2, 3, 32, 32)
    assert 0.0 <= float(first.min()) and float(first.max()) <= 1.0
    assert torch.equal(first, stage.upscale(images(), text(), seed=3))
    assert not torch.equal(first, stage.upscale(images(), text(), seed=4))


def test_the_low_resolution_input_and_its_noise_level_reach_the_model():
    stage = tiny_stage()
    base = stage.upscale(images(), text(), seed=0, noise_level=0)
    assert not torch.allclose(base, stage.upscale(images() * 0.5, text(), seed=0, noise_level=0))
    assert not torch.allclose(base, stage.upscale(images(), text(), seed=0, noise_level=300))


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_a_residual_stage_adds_its_sample_to_the_bicubic_upsample(scale):
    # with the output layer zeroed both stages sample the same trajectory, so what differs is only where it is
    # added: to nothing (mid-grey) or, divided by the scale, to the bicubic-upsampled input (compared where
    # neither is clamped)
    low = 0.25 + 0.5 * images()
    samples = {}
    for residual in (False, True):
        stage = tiny_stage(residual=residual)
        stage.config.residual_scale = scale
        torch.nn.init.zeros_(stage.unet.conv_out.weight)
        torch.nn.init.zeros_(stage.unet.conv_out.bias)
        samples[residual] = stage.upscale(low, text(), seed=5, denoise=1.0)
    bicubic = (stage.anchor(low * 2 - 1) + 1) / 2
    unclamped = ((samples[True] > 0) & (samples[True] < 1) & (samples[False] > 0) & (samples[False] < 1))
    assert float(unclamped.float().mean()) > 0.5
    expected = bicubic + (samples[False] - 0.5) / scale
    assert torch.allclose(samples[True][unclamped], expected[unclamped], atol=1e-5)


def test_a_residual_stage_learns_the_difference_from_bicubic():
    stage = tiny_stage(residual=True)
    low = images(4, 8) * 2 - 1
    high = stage.anchor(low)
    torch.nn.init.zeros_(stage.unet.conv_out.weight)
    torch.nn.init.zeros_(stage.unet.conv_out.bias)
    generator = lambda: torch.Generator().manual_seed(7)
    # nothing to add to bicubic: the zero prediction misses only the noise's part of v ...
    exact = stage.training_loss(low, high, text(4), generator=generator())
    # ... and an image stage, asked for the same pictures, misses their pixels as well
    image_stage = tiny_stage(residual=False)
    image_stage.unet.load_state_dict(stage.unet.state_dict())
    assert float(exact) < 0.8 * float(image_stage.training_loss(low, high, text(4), generator=generator()))


def test_a_residual_scale_that_is_not_above_zero_is_refused(tmp_path):
    tiny_stage().save(tmp_path)
    config = tmp_path / "super_resolution.json"
    config.write_text(config.read_text().replace('"residual_scale": 1.0', '"residual_scale": 0'))
    with pytest.raises(SuperResolutionError, match="residual_scale"):
        SuperResolution.load(tmp_path)


def test_a_stage_file_without_the_residual_field_is_an_image_stage(tmp_path):
    tiny_stage().save(tmp_path)
    config = tmp_path / "super_resolution.json"
    data = __import__("json").loads(config.read_text())
    del data["residual"]
    config.write_text(__import__("json").dumps(data))
    assert SuperResolution.load(tmp_path).config.residual is False


@pytest.mark.parametrize("residual", [False, True])
def test_saved_stage_loads_with_the_same_weights(tmp_path, residual):
    stage = tiny_stage(steps=2, residual=residual)
    stage.save(tmp_path)
    loaded = SuperResolution.load(tmp_path)
    assert loaded.config == stage.config
    for name, value in stage.unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[name], value.half().float()), name
    stage.unet.load_state_dict({k: v.half().float() for k, v in stage.unet.state_dict().items()})
    assert torch.equal(stage.upscale(images(), text(), seed=1), loaded.upscale(images(), text(), seed=1))


def test_a_missing_or_mismatched_file_is_an_error_naming_it(tmp_path):
    with pytest.raises(MissingFileError, match="super_resolution.json"):
        SuperResolution.load(tmp_path)
    tiny_stage().save(tmp_path)
    (tmp_path / SUPER_RESOLUTION_WEIGHTS).unlink()
    with pytest.raises(MissingFileError, match=SUPER_RESOLUTION_WEIGHTS):
        SuperResolution.load(tmp_path)
    other = tmp_path / "other"
    tiny_stage().save(other)
    wider = tiny_stage()
    wider.config.unet = {**wider.config.unet, "block_out_channels": [16, 48]}
    (other / "super_resolution.json").write_text(__import__("json").dumps(wider.config.to_dict()))
    with pytest.raises(SuperResolutionError, match="does not match its config"):
        SuperResolution.load(other)


@pytest.mark.parametrize("call, named", [
    (lambda s: s.upscale(images(), torch.randn(1, 5, 64)), "width 64"),
    (lambda s: s.upscale(images(), text(3)), "super-resolution text"),
    (lambda s: s.upscale(images()[:, :1], text()), "super-resolution images"),
    (lambda s: s.upscale(images(), text(), noise_level=351), "noise level"),
    (lambda s: s.upscale(images(), text(), steps=0), "steps"),
    (lambda s: s.upscale(images(), text(), sampler="nope"), "sampler"),
    (lambda s: s.upscale(images(), text(), schedule="nope"), "schedule"),
    (lambda s: s.upscale(torch.rand(1, 3, 8, 4000), text()), "upscale"),
])
def test_bad_requests_are_refused_naming_what_is_wrong(call, named):
    with pytest.raises(InstructImagenError, match=named):
        call(tiny_stage())


@pytest.mark.parametrize("residual", [False, True])
def test_training_lowers_the_loss_on_a_fixed_batch(residual):
    stage = tiny_stage(residual=residual)
    low, high = images(4, 8) * 2 - 1, torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
    optimizer = torch.optim.Adam(stage.unet.parameters(), lr=2e-3)
    losses = []
    stage.unet.train()
    for step in range(40):
        loss = stage.training_loss(low, high, text(4), generator=torch.Generator().manual_seed(step % 4))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-4:]) < 0.7 * sum(losses[:4])


@pytest.fixture(scope="module")
def cascade():
    pipe = load_pipeline("tiny", device="cpu")
    pipe.super_resolution = tiny_stage()
    return pipe


def test_the_pipeline_runs_the_stage_after_the_base_and_can_skip_it(cascade):
    instruction = MultiModalInstruction(text="a red circle", contexts=[])
    upscaled = cascade.generate(instruction, seed=5, steps=2, width=16, height=16)
    assert upscaled.images.shape == (1, 3, 64, 64)
    assert upscaled.base_images.shape == (1, 3, 16, 16)
    assert upscaled.latents.shape == (1, 3, 16, 16)
    assert upscaled.info["super_resolution"]["factor"] == 4
    plain = cascade.generate(instruction, seed=5, steps=2, width=16, height=16, upscale=False)
    assert plain.images.shape == (1, 3, 16, 16) and "super_resolution" not in plain.info
    assert torch.equal(plain.images, upscaled.base_images)  # the base is the same with or without the stage
    assert "super_resolution" in cascade.weight_modules()  # hosts move the stage with the rest


def test_an_upscaled_size_over_the_limits_is_refused_before_the_base_samples(cascade):
    steps = []
    with pytest.raises(SuperResolutionError, match="upscale off"):
        cascade.generate(MultiModalInstruction(text="a", contexts=[]), steps=2, width=2560, height=256,
                         callback=lambda info: steps.append(info))
    assert steps == []
    with pytest.raises(InstructImagenError, match="upscale: expected True or False"):
        cascade.generate(MultiModalInstruction(text="a", contexts=[]), steps=2, width=16, height=16, upscale="no")


def test_the_stage_memory_over_the_limit_is_refused_before_the_base_samples(cascade):
    from instruct_core import limits

    stage = cascade.super_resolution
    base_needs = limits.estimate_generation_bytes(cascade.model_facts(), 16, 16, 4, 2, 0, 0)
    stage_needs = limits.estimate_generation_bytes(stage.model_facts(), 64, 64, 4, 1, 0, 0)
    assert stage_needs > base_needs  # the stage works at 16 times the pixels
    steps = []
    previous = limits.configure(max_memory_bytes=(base_needs + stage_needs) // 2)
    try:
        instruction = MultiModalInstruction(text="a", contexts=[])
        with pytest.raises(SuperResolutionError, match=r"super-resolution of 4 images to 64x64 needs about") as refusal:
            cascade.generate(instruction, steps=2, width=16, height=16, batch_size=4,
                             callback=lambda info: steps.append(info))
        assert str(refusal.value).count("upscale:") == 1  # the field is named once, first
        assert steps == []
        plain = cascade.generate(instruction, steps=2, width=16, height=16, batch_size=4, upscale=False)
        assert plain.images.shape == (4, 3, 16, 16)
    finally:
        limits.configure(max_memory_bytes=previous.max_memory_bytes)
