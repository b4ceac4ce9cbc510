"""End to end on tiny models: encode once, one batched UNet call per evaluation, seeds, img2img, cancel."""

import pytest
import torch
from PIL import Image

from instruct_core.guidance import GuidanceConfig, GuidedDenoiser
from instruct_core.instruction import Context, InstructionError, MultiModalInstruction
from instruct_core.pipeline import InstructImagen, start_noise_scale
from instruct_core.samplers import SAMPLERS, SamplingCancelled
from instruct_core.tiny import build_tiny_base


def _instruction(num_contexts=2, size=32):
    colours = [(200, 30, 30), (30, 30, 200), (30, 200, 30)]
    modalities = ["subject", "edge", "style"]
    contexts = [Context(id=i + 1, modality=modalities[i], text=f"[ref#{i + 1}] thing {i}",
                        image=Image.new("RGB", (size, size), colours[i])) for i in range(num_contexts)]
    refs = " and ".join(f"[ref#{i + 1}]" for i in range(num_contexts))
    return MultiModalInstruction(text=f"a picture of {refs}" if refs else "a picture", contexts=contexts)


@pytest.fixture(scope="module")
def pixel_pipe():
    return InstructImagen.from_base(build_tiny_base(seed=0, pixel_space=True, sample_size=32))


@pytest.fixture(scope="module")
def latent_pipe():
    return InstructImagen.from_base(build_tiny_base(seed=0, pixel_space=False, sample_size=8))


def _count_unet_calls(pipe):
    calls = []
    handle = pipe.base.unet.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    return calls, handle


@pytest.mark.parametrize("pipe_name", ["pixel_pipe", "latent_pipe"])
def test_generate_encodes_contexts_once_and_batches_branches(pipe_name, request):
    pipe = request.getfixturevalue(pipe_name)
    before = pipe.model.encoder_calls
    calls, handle = _count_unet_calls(pipe)
    try:
        result = pipe.generate(_instruction(2), seed=3, steps=6, sampler="dpmpp_2m", width=32, height=32,
                               batch_size=2, guidance=GuidanceConfig(5.0, 2.0))
    finally:
        handle.remove()
    assert pipe.model.encoder_calls == before + 1
    assert calls == [2 * 3] * 6  # one UNet call per step, three branches of two images each
    assert result.images.shape == (2, 3, 32, 32)
    assert 0.0 <= result.images.min() and result.images.max() <= 1.0
    assert not torch.equal(result.images[0], result.images[1])  # batch rows get their own noise


def test_same_seed_same_image_and_other_seed_differs(pixel_pipe):
    kwargs = dict(steps=4, sampler="euler_ancestral", schedule="karras", width=32, height=32)
    a = pixel_pipe.generate(_instruction(1), seed=7, **kwargs).images
    b = pixel_pipe.generate(_instruction(1), seed=7, **kwargs).images
    c = pixel_pipe.generate(_instruction(1), seed=8, **kwargs).images
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def _sample_with(pipe, cond, seed=0, steps=4):
    sigmas = pipe._sigmas(steps, "normal", 1.0)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * sigmas[0]
    guided = GuidedDenoiser(pipe.denoiser(), cond, GuidanceConfig(5.0, 2.0), sigmas)
    return SAMPLERS["euler"](guided, x, sigmas)


def test_untrained_adapter_gives_the_text_only_result_and_a_trained_one_does_not():
    pipe = InstructImagen.from_base(build_tiny_base(seed=0))
    cond = pipe.encode_instruction(_instruction(2), (32, 32))
    with_contexts = _sample_with(pipe, cond)
    state, cond.context_state = cond.context_state, None
    text_only = _sample_with(pipe, cond)
    assert torch.allclose(with_contexts, text_only, atol=1e-5)
    with torch.no_grad():
        for layer in pipe.model.adapter.layers.values():
            layer.to_out.weight.normal_(std=0.2)
    cond.context_state = type(state)(state.features, state.valid, state.weights, state.region_masks)
    trained = _sample_with(pipe, cond)
    assert (trained - text_only).abs().max() > 1e-3


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_runs_through_the_pipeline(pixel_pipe, sampler):
    steps = []
    result = pixel_pipe.generate(_instruction(1), seed=1, steps=3, sampler=sampler, schedule="karras",
                                 width=32, height=32, callback=lambda info: steps.append(info["i"]))
    assert steps == [0, 1, 2]
    assert torch.isfinite(result.images).all()


@pytest.mark.parametrize("mode", ["dual", "oscillating", "interleaved"])
def test_guidance_modes_run(pixel_pipe, mode):
    result = pixel_pipe.generate(_instruction(2), seed=1, steps=3, width=32, height=32,
                                 guidance=GuidanceConfig(4.0, 2.0, mode))
    assert torch.isfinite(result.images).all()


def test_cancel_stops_within_one_step(pixel_pipe):
    seen = []

    def cancel_at_two(info):
        seen.append(info["i"])
        if info["i"] == 1:
            raise SamplingCancelled

    with pytest.raises(SamplingCancelled):
        pixel_pipe.generate(_instruction(1), seed=1, steps=10, width=32, height=32, callback=cancel_at_two)
    assert seen == [0, 1]


def test_init_image_with_low_denoise_stays_close(pixel_pipe):
    latent_pipe = pixel_pipe
    init = torch.zeros(1, 3, 32, 32)
    init[:, 0] = 0.9  # red
    light = latent_pipe.generate(_instruction(0), seed=2, steps=10, width=32, height=32, init_image=init,
                                 denoise=0.1, guidance=GuidanceConfig(1.0, 1.0))
    full = latent_pipe.generate(_instruction(0), seed=2, steps=10, width=32, height=32,
                                guidance=GuidanceConfig(1.0, 1.0))
    reconstruction = latent_pipe.to_images(latent_pipe.to_model_space(init))
    light_error = (light.images - reconstruction).abs().mean()
    full_error = (full.images - reconstruction).abs().mean()
    assert light.info["steps"] == 10
    assert light_error < 0.5 * full_error


@pytest.mark.parametrize("pipe_name", ["pixel_pipe", "latent_pipe"])
def test_a_mask_regenerates_only_inside_it(pipe_name, request):
    pipe = request.getfixturevalue(pipe_name)
    init = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    args = dict(seed=4, steps=4, width=32, height=32, init_image=init, guidance=GuidanceConfig(2.0, 1.0))
    plain = pipe.generate(_instruction(1), **args)
    everywhere = pipe.generate(_instruction(1), mask=torch.ones(1, 1, 32, 32), **args)
    assert torch.equal(everywhere.latents, plain.latents)  # an all-ones mask is plain img2img
    nowhere = pipe.generate(_instruction(1), mask=torch.zeros(1, 1, 32, 32), **args)
    assert torch.allclose(nowhere.latents, pipe.to_model_space(init).float()
                          / (pipe.base.vae_scaling_factor if pipe.base.vae is not None else 1.0), atol=1e-6)
    right = torch.zeros(1, 1, 32, 32)
    right[..., 16:] = 1.0
    half = pipe.generate(_instruction(1), mask=right, **args).latents
    columns = half.shape[-1] // 2
    assert torch.allclose(half[..., :columns], nowhere.latents[..., :columns], atol=1e-6)  # kept exactly
    assert (half[..., columns:] - nowhere.latents[..., columns:]).abs().mean() > 1e-2    # regenerated


def test_mask_errors_name_the_mask(pixel_pipe):
    with pytest.raises(InstructionError, match="mask: needs an init image"):
        pixel_pipe.generate(_instruction(0), steps=1, width=32, height=32, mask=torch.ones(1, 1, 32, 32))
    init = torch.zeros(1, 3, 32, 32)
    with pytest.raises(InstructionError, match=r"mask: expected shape \(B, 1, 32, 32\)"):
        pixel_pipe.generate(_instruction(0), steps=1, width=32, height=32, init_image=init,
                            mask=torch.ones(1, 1, 16, 16))
    with pytest.raises(InstructionError, match="mask: holds NaN"):
        pixel_pipe.generate(_instruction(0), steps=1, width=32, height=32, init_image=init,
                            mask=torch.full((1, 1, 32, 32), float("nan")))


def test_latents_are_raw_vae_space(latent_pipe):
    result = latent_pipe.generate(_instruction(0), seed=2, steps=2, width=32, height=32)
    assert result.latents.shape == (1, 4, 16, 16)  # the tiny VAE downsamples twice
    decoded = latent_pipe.to_images(result.latents * latent_pipe.base.vae_scaling_factor)
    assert torch.allclose(decoded, result.images, atol=1e-5)


def test_v_prediction_base_generates():
    pipe = InstructImagen.from_base(build_tiny_base(seed=1, prediction_type="v_prediction"))
    result = pipe.generate(_instruction(1), seed=0, steps=3, width=32, height=32)
    assert pipe.base.prediction_type == "v_prediction"
    assert torch.isfinite(result.images).all()


@pytest.mark.parametrize("kwargs, field", [
    (dict(width=30), "width"), (dict(height=0), "height"), (dict(steps=0), "steps"),
    (dict(sampler="nope"), "sampler"), (dict(schedule="nope"), "schedule"),
    (dict(batch_size=100000), "batch"), (dict(init_image=torch.zeros(1, 3, 16, 16), denoise=0.5), "init_image"),
    (dict(denoise=1.5), "denoise"),
])
def test_bad_generation_arguments_name_the_field(pixel_pipe, kwargs, field):
    args = dict(seed=0, steps=2, width=32, height=32)
    args.update(kwargs)
    with pytest.raises(InstructionError, match=field):
        pixel_pipe.generate(_instruction(1), **args)


def test_unknown_modality_is_an_instruction_error(pixel_pipe):
    instruction = _instruction(1)
    instruction.contexts[0].modality = "hologram"
    with pytest.raises(InstructionError, match="hologram"):
        pixel_pipe.generate(instruction, seed=0, steps=2, width=32, height=32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_generation(dtype):
    base = build_tiny_base(seed=0)
    base.unet.to(dtype=dtype)
    for encoder in base.text_encoders:
        encoder.to(dtype=dtype)
    pipe = InstructImagen.from_base(base)
    assert pipe.dtype == dtype and pipe.model.adapter.modality_embedding.weight.dtype == dtype
    result = pipe.generate(_instruction(2), seed=0, steps=2, width=32, height=32)
    reference = InstructImagen.from_base(build_tiny_base(seed=0)).generate(_instruction(2), seed=0, steps=2,
                                                                           width=32, height=32)
    assert torch.isfinite(result.images).all()
    assert (result.images - reference.images).abs().mean() < 0.05  # same image up to half-precision error


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_same_seed_same_image_on_cpu_and_cuda():
    kwargs = dict(seed=11, steps=4, sampler="euler_ancestral", width=32, height=32)
    on_cpu = InstructImagen.from_base(build_tiny_base(seed=0)).generate(_instruction(2), **kwargs).images
    base = build_tiny_base(seed=0)
    base.unet.to("cuda")
    for encoder in base.text_encoders:
        encoder.to("cuda")
    on_cuda = InstructImagen.from_base(base).generate(_instruction(2), **kwargs).images
    assert (on_cpu - on_cuda).abs().max() < 1e-3


def test_several_instructions_sample_as_one_batch(pixel_pipe):
    """Different instructions (K = 2, 0, 1) in one sampling loop give what each gives alone."""
    from instruct_core.guidance import Conditioning

    instructions = [_instruction(2), _instruction(0), _instruction(1)]
    with torch.no_grad():
        for layer in pixel_pipe.model.adapter.layers.values():
            layer.to_out.weight.normal_(std=0.1)
    try:
        conds = [pixel_pipe.encode_instruction(i, (32, 32)) for i in instructions]
        kwargs = dict(seed=0, steps=3, sampler="euler", schedule="normal", width=32, height=32)
        together = pixel_pipe.sample(Conditioning.concat(conds), **kwargs)
        assert together.images.shape[0] == 3
        alone = pixel_pipe.sample(conds[0], **kwargs)  # row 0 draws the same noise alone and in the batch
        assert torch.allclose(alone.images[0], together.images[0], atol=1e-4)
        assert not torch.allclose(together.images[0], together.images[2], atol=1e-3)
    finally:
        with torch.no_grad():
            for layer in pixel_pipe.model.adapter.layers.values():
                layer.to_out.weight.zero_()


LONG_TAIL = " ".join(["a small red circle at the top left"] * 5)


def test_a_text_longer_than_the_encoder_window_is_read_in_windows_not_cut(pixel_pipe):
    window = pixel_pipe.base.tokenizers[0].model_max_length
    ends = [f"{LONG_TAIL} on a blue background", f"{LONG_TAIL} on a green background"]
    chunked, _ = pixel_pipe.encode_text(ends)
    assert chunked.shape[1] == 2 * window
    assert not torch.allclose(chunked[0], chunked[1])  # the last words still count
    pixel_pipe.long_text = "truncate"
    try:
        cut, _ = pixel_pipe.encode_text(ends)
    finally:
        pixel_pipe.long_text = "chunk"
    assert cut.shape[1] == window and torch.equal(cut[0], cut[1])  # cut, the tails are lost
    assert torch.equal(cut[0], chunked[0, :window])  # the first window is the truncated text


def test_token_positions_name_where_the_encoded_text_holds_a_word_in_any_window(pixel_pipe):
    # a causal encoder: changing one word changes the encoded sequence first where that word's tokens are
    text = f"{LONG_TAIL} and a large blue square at the bottom"
    start = text.rindex("blue")
    other = text[:start] + "pink" + text[start + 4:]
    encoded, _ = pixel_pipe.encode_text([text, other])
    changed = (encoded[0] - encoded[1]).abs().amax(-1) > 0
    positions = pixel_pipe.token_positions(text, start, start + 4)
    window = pixel_pipe.base.tokenizers[0].model_max_length
    assert positions and positions[0] >= window  # the word is in the second window
    assert int(changed.nonzero()[0]) == positions[0]
    assert pixel_pipe.token_positions(text, 0, 1) == [1]  # after the start token
    pixel_pipe.long_text = "truncate"
    try:
        assert pixel_pipe.token_positions(text, start, start + 4) == []
    finally:
        pixel_pipe.long_text = "chunk"
    with pytest.raises(InstructionError, match="span: expected 0 <= start < end"):
        pixel_pipe.token_positions(text, 5, 5)


def test_a_short_text_encodes_and_samples_the_same_beside_a_long_one(pixel_pipe):
    from instruct_core.guidance import Conditioning

    alone, _ = pixel_pipe.encode_text(["a picture"])
    together, _ = pixel_pipe.encode_text(["a picture", LONG_TAIL])
    assert together.shape[1] == 2 * alone.shape[1]
    assert torch.equal(together[0], alone[0].repeat(2, 1))  # repeated, which attention cannot tell apart
    short, long = _instruction(1), MultiModalInstruction(text=f"[ref#1] {LONG_TAIL}", contexts=_instruction(1).contexts)
    conds = [pixel_pipe.encode_instruction(i, (32, 32)) for i in (short, long)]
    kwargs = dict(seed=0, steps=3, sampler="euler", schedule="normal", width=32, height=32)
    batched = pixel_pipe.sample(Conditioning.concat(conds), **kwargs)
    assert torch.allclose(pixel_pipe.sample(conds[0], **kwargs).images[0], batched.images[0], atol=1e-4)


def test_a_text_beyond_the_window_limit_and_an_unknown_setting_are_refused(pixel_pipe):
    from instruct_core.pipeline import MAX_TEXT_WINDOWS

    with pytest.raises(InstructionError, match=r"text: \d+ tokens is longer than this model reads"):
        pixel_pipe.encode_text([LONG_TAIL * (MAX_TEXT_WINDOWS + 1)])
    with pytest.raises(ValueError, match="long_text: expected one of chunk, truncate, got 'wrap'"):
        InstructImagen(pixel_pipe.base, pixel_pipe.model, long_text="wrap")


@pytest.mark.parametrize("mode", ["dual", "oscillating", "interleaved"])
def test_every_row_of_a_mixed_batch_is_guided_as_it_is_alone(mode):
    """Rows with and without contexts in one batch: each row ends exactly where it ends sampled by itself."""
    from instruct_core.guidance import Conditioning

    pipe = InstructImagen.from_base(build_tiny_base(seed=0, pixel_space=True, sample_size=32))
    with torch.no_grad():
        for layer in pipe.model.adapter.layers.values():
            layer.to_out.weight.normal_(std=0.1, generator=torch.Generator().manual_seed(3))
    conds = [pipe.encode_instruction(i, (32, 32)) for i in (_instruction(2), _instruction(0), _instruction(1))]
    sigmas = pipe._sigmas(4, "normal", 1.0)
    config = GuidanceConfig(5.0, 2.0, mode=mode, oscillate_fraction=1.0)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    together = SAMPLERS["euler"](GuidedDenoiser(pipe.denoiser(), Conditioning.concat(conds), config, sigmas), x,
                                 sigmas)
    for row, cond in enumerate(conds):
        alone = SAMPLERS["euler"](GuidedDenoiser(pipe.denoiser(), cond, config, sigmas), x[row:row + 1], sigmas)
        # values reach 70 (pixel space at sigma 14.6, guidance 5): 5e-4 is float32 batching noise, 7e-6 relative
        assert torch.allclose(together[row], alone[0], atol=5e-4), (mode, row)
    assert (together[0] - together[1]).abs().max() > 1e-2  # contexts steer row 0


def test_sigma_arithmetic_is_float32_whatever_the_state_dtype():
    """At sigma 20,000, sigma^2 + 1 overflows float16; a float16 state must still give the model its input."""
    from instruct_core.denoiser import DiscreteDenoiser
    from instruct_core.schedules import DiscreteSchedule

    schedule = DiscreteSchedule.from_scheduler_config({"beta_schedule": "squaredcos_cap_v2"})
    seen = []
    denoiser = DiscreteDenoiser(lambda x_in, t: seen.append(x_in) or torch.zeros_like(x_in), schedule,
                                "v_prediction")
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor(schedule.sigma_max)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        denoised = denoiser((noise * 300).to(dtype), sigma)
        assert denoised.dtype == dtype and torch.isfinite(denoised).all()
    full, half, brain = seen
    assert half.abs().max() > 0.001 and torch.allclose(half.float(), full, rtol=1e-2, atol=1e-4)
    assert torch.allclose(brain.float(), full, rtol=2e-2, atol=1e-4)



def test_sampling_starts_from_noise_scaled_as_comfyui_scales_it():
    """From the top of the schedule sqrt(1 + sigma^2) (KSampler at full denoise); lower down, sigma (img2img)."""
    sigma_max = 14.6146
    assert start_noise_scale(sigma_max, sigma_max) == pytest.approx((1 + sigma_max**2) ** 0.5, rel=1e-12)
    assert start_noise_scale(sigma_max * (1 + 1e-6), sigma_max) == pytest.approx((1 + sigma_max**2) ** 0.5, rel=1e-5)
    assert start_noise_scale(3.0, sigma_max) == 3.0
