"""Samplers and schedules against diffusers' own schedulers, on the same model and the same timesteps.

The model is analytic: the exact noise prediction for data x0 ~ N(mu, std^2) per channel, plus a small smooth
nonlinear term, written as a function of (x_in, t) like a UNet. The diffusers loop runs in the scheduler's own
space; our loop starts from the same noise in sigma space. Schedulers that are variance-preserving
(init_noise_sigma = 1: DDIM, DPM-Solver, UniPC) start at x_vp = noise, which is x = noise * sqrt(sigma_0^2 + 1)
in sigma space; Euler-type schedulers start at noise * sigma_0 like we do.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from diffusers import (DDIMScheduler, UNet2DModel, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, HeunDiscreteScheduler, UniPCMultistepScheduler)

from instruct_core.denoiser import DiscreteDenoiser
from instruct_core.samplers import (SAMPLERS, SamplingCancelled, default_noise_sampler, prepare_noise,
                                    sample_ddim, sample_dpmpp_2m, sample_euler, sample_euler_ancestral, sample_heun,
                                    sample_unipc)
from instruct_core.schedules import (KARRAS_SIGMA_MAX, DiscreteSchedule, get_sigmas, get_sigmas_ddim,
                                     get_sigmas_karras, get_sigmas_normal, sigmas_for_denoise)

SD_CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
SHAPE = (2, 3, 4, 4)
ATOL = 1e-4


@pytest.fixture(scope="module")
def schedule():
    return DiscreteSchedule.from_scheduler_config(SD_CONFIG)


class GaussianModel:
    """Raw output of an ideal model for Gaussian data at timestep t (any float t, via the log-sigma table)."""

    def __init__(self, schedule, prediction_type="epsilon"):
        generator = torch.Generator().manual_seed(1)
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.mu = torch.randn(1, SHAPE[1], 1, 1, generator=generator, dtype=torch.float64) * 0.5
        self.std = torch.rand(1, SHAPE[1], 1, 1, generator=generator, dtype=torch.float64) + 0.5
        self.calls = 0

    def __call__(self, x_in, t):
        self.calls += 1
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1, 1, 1)
        a = 1 / (1 + self.schedule.t_to_sigma(t) ** 2)
        x = x_in.double()
        eps = (1 - a).sqrt() * (x - a.sqrt() * self.mu) / (a * self.std**2 + 1 - a)
        eps = eps + 0.1 * torch.tanh(x) * (t / 1000)  # keeps the model nonlinear in x and t
        if self.prediction_type == "epsilon":
            out = eps
        else:  # v = sqrt(a) eps - sqrt(1 - a) x0, with x0 implied by eps
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            out = a.sqrt() * eps - (1 - a).sqrt() * x0
        return out.to(x_in.dtype)


def initial_noise(dtype=torch.float64):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float32).to(dtype)


def run_diffusers(scheduler, model, steps, dtype=torch.float64, generator=None):
    scheduler.set_timesteps(steps)
    x = initial_noise(dtype) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        kwargs = {"generator": generator} if generator is not None else {}
        x = scheduler.step(model(x_in, t), t, x, **kwargs).prev_sample
    return x


def run_ours(sampler, model, schedule, sigmas, prediction_type="epsilon", vp_start=False, quantize=False, **kwargs):
    sigmas = sigmas.double()
    noise = initial_noise()
    x = noise * (sigmas[0] ** 2 + 1).sqrt() if vp_start else noise * sigmas[0]
    denoiser = DiscreteDenoiser(model, schedule, prediction_type, quantize=quantize)
    return sampler(denoiser, x, sigmas, **kwargs)


def assert_close(ours, theirs):
    assert ours.shape == theirs.shape
    err = (ours.double() - theirs.double()).abs().max().item()
    assert err < ATOL, f"max abs difference {err:.3g}"


# --- schedules ---------------------------------------------------------------------------------------------------

def test_table_matches_diffusers(schedule):
    reference = EulerDiscreteScheduler(**SD_CONFIG)
    assert torch.allclose(schedule.alphas_cumprod, reference.alphas_cumprod.double(), rtol=0, atol=0)
    for beta_schedule in ("linear", "squaredcos_cap_v2"):
        config = {**SD_CONFIG, "beta_schedule": beta_schedule}
        ours = DiscreteSchedule.from_scheduler_config(config).alphas_cumprod
        assert torch.equal(ours, EulerDiscreteScheduler(**config).alphas_cumprod.double())


def test_zero_terminal_snr_table_matches_diffusers():
    config = {**SD_CONFIG, "rescale_betas_zero_snr": True}
    ours = DiscreteSchedule.from_scheduler_config(config)
    assert torch.equal(ours.alphas_cumprod, EulerDiscreteScheduler(**config).alphas_cumprod.double())
    assert ours.sigma_max == pytest.approx(4096, rel=1e-4)


def test_sigma_t_round_trip(schedule):
    t = torch.tensor([0.0, 0.25, 1.0, 17.5, 500.0, 998.9, 999.0], dtype=torch.float64)
    assert torch.allclose(schedule.sigma_to_t(schedule.t_to_sigma(t)), t, atol=1e-9)
    table_t = schedule.sigma_to_t(schedule.sigmas)
    assert torch.allclose(table_t, torch.arange(1000, dtype=torch.float64), atol=1e-9)
    assert schedule.sigma_to_t(torch.tensor(schedule.sigma_max * 2)) == 999
    t_between = schedule.sigma_to_t(torch.tensor(2.5, dtype=torch.float64))
    assert t_between % 1 != 0
    assert schedule.sigma_to_t(torch.tensor(2.5, dtype=torch.float64), quantize=True) == t_between.round()


@pytest.mark.parametrize("steps", [10, 25])
def test_normal_and_karras_sigmas_match_euler(schedule, steps):
    normal = EulerDiscreteScheduler(**SD_CONFIG)
    normal.set_timesteps(steps)
    # "normal" is ComfyUI's: sigma at fractional timesteps interpolated in log-sigma, where diffusers interpolates
    # sigma itself; on SD's table the two are 2.1e-5 apart at 25 steps, exact at the integer timesteps of 10
    assert torch.allclose(get_sigmas_normal(schedule, steps), normal.sigmas, rtol=1e-7 if steps == 10 else 3e-5)
    karras = EulerDiscreteScheduler(**SD_CONFIG, use_karras_sigmas=True)
    karras.set_timesteps(steps)
    assert torch.allclose(get_sigmas(schedule, steps, "karras"), karras.sigmas, rtol=1e-5)
    assert torch.allclose(get_sigmas_karras(steps, schedule.sigma_min, schedule.sigma_max), karras.sigmas, rtol=1e-5)


@pytest.mark.parametrize("config", [{"beta_schedule": "squaredcos_cap_v2"},
                                    {**SD_CONFIG, "rescale_betas_zero_snr": True}], ids=["cosine", "zero_snr"])
def test_karras_capped_starts_at_edm_sigma_max_where_the_table_reaches_higher(config):
    table = DiscreteSchedule.from_scheduler_config(config)
    assert table.sigma_max > 1000
    assert get_sigmas(table, 12, "karras")[0] == pytest.approx(table.sigma_max)  # ComfyUI's: uncapped
    sigmas = get_sigmas(table, 12, "karras_capped")
    assert sigmas[0] == pytest.approx(KARRAS_SIGMA_MAX)
    assert sigmas[-2] == pytest.approx(table.sigma_min) and sigmas[-1] == 0
    assert torch.allclose(sigmas, get_sigmas_karras(12, table.sigma_min, KARRAS_SIGMA_MAX))
    # the table's own top would leave most steps in pure noise; capped, all but the first lie below sigma 60
    assert (get_sigmas_karras(12, table.sigma_min, table.sigma_max)[:-1] > 60).sum() >= 6
    assert (sigmas[:-1] > 60).sum() == 1


def test_sgm_uniform_and_ddim_sigmas_match_their_schedulers(schedule):
    dpm = DPMSolverMultistepScheduler(**SD_CONFIG)
    dpm.set_timesteps(20)
    assert torch.allclose(get_sigmas(schedule, 20, "sgm_uniform_rounded"), dpm.sigmas, rtol=1e-6)
    ddim = DDIMScheduler(**SD_CONFIG, set_alpha_to_one=False, steps_offset=1)
    ddim.set_timesteps(20)
    sigmas = get_sigmas(schedule, 20, "ddim_leading")
    assert torch.equal(schedule.sigma_to_t(sigmas[:-1].double()).round().long(), ddim.timesteps)
    assert sigmas[-1] == pytest.approx(schedule.sigma_min)
    assert get_sigmas_ddim(schedule, 20, set_alpha_to_one=True)[-1] == 0


def test_unknown_schedule_is_rejected(schedule):
    with pytest.raises(ValueError, match="schedule"):
        get_sigmas(schedule, 10, "cosine")
    with pytest.raises(ValueError, match="beta_schedule"):
        DiscreteSchedule.from_betas(0.1, 0.2, beta_schedule="quadratic")


def test_denoise_keeps_the_tail_of_a_longer_schedule(schedule):
    def full(n):
        return get_sigmas(schedule, n, "karras")

    partial = sigmas_for_denoise(full, 10, 0.4)
    assert len(partial) == 11 and partial[-1] == 0
    assert torch.equal(partial, full(25)[-11:])
    assert partial[0] < schedule.sigma_max / 4
    assert torch.equal(sigmas_for_denoise(full, 10, 1.0), full(10))
    with pytest.raises(ValueError, match="denoise"):
        sigmas_for_denoise(full, 10, 0.0)


# --- denoiser ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_denoiser_recovers_x0_from_an_exact_model(schedule, prediction_type):
    generator = torch.Generator().manual_seed(3)
    x0 = torch.randn(SHAPE, generator=generator, dtype=torch.float64)
    eps = torch.randn(SHAPE, generator=generator, dtype=torch.float64)
    sigma = torch.tensor([0.3, 7.0], dtype=torch.float64)
    s = sigma.view(-1, 1, 1, 1)
    a = 1 / (1 + s**2)

    def oracle(x_in, t):
        assert torch.allclose(x_in, a.sqrt() * x0 + (1 - a).sqrt() * eps)  # the VP point
        assert torch.allclose(schedule.t_to_sigma(t), sigma)
        return {"epsilon": eps, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0, "sample": x0}[prediction_type]

    denoised = DiscreteDenoiser(oracle, schedule, prediction_type, quantize=False)(x0 + s * eps, sigma)
    assert torch.allclose(denoised, x0)


def test_denoiser_returns_the_state_dtype(schedule):
    def half_model(x_in, t):
        return x_in.half()

    x = torch.ones(SHAPE)
    out = DiscreteDenoiser(half_model, schedule)(x, torch.tensor(2.0))
    assert out.dtype == torch.float32
    assert torch.allclose(out, x - 2.0 * x / 5**0.5, atol=1e-3)
    with pytest.raises(ValueError, match="prediction_type"):
        DiscreteDenoiser(half_model, schedule, "x0")


# --- samplers against diffusers ----------------------------------------------------------------------------------

@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_euler_matches_diffusers(schedule, karras, prediction_type):
    model = GaussianModel(schedule, prediction_type)
    steps = 25  # fractional "linspace" timesteps
    scheduler = EulerDiscreteScheduler(**SD_CONFIG, use_karras_sigmas=karras, prediction_type=prediction_type)
    sigmas = get_sigmas(schedule, steps, "karras" if karras else "normal")
    ours = run_ours(sample_euler, model, schedule, sigmas, prediction_type)
    assert_close(ours, run_diffusers(scheduler, model, steps))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_matches_diffusers(schedule, prediction_type):
    model = GaussianModel(schedule, prediction_type)
    scheduler = DDIMScheduler(**SD_CONFIG, set_alpha_to_one=False, steps_offset=1, clip_sample=False,
                              prediction_type=prediction_type)
    sigmas = get_sigmas(schedule, 20, "ddim_leading")
    ours = run_ours(sample_ddim, model, schedule, sigmas, prediction_type, vp_start=True)
    # DDIM ends at alphas_cumprod[0]: its variance-preserving sample is ours / sqrt(sigma_min^2 + 1).
    assert_close(ours / (schedule.sigma_min**2 + 1) ** 0.5, run_diffusers(scheduler, model, 20))


def test_euler_ancestral_matches_diffusers_with_the_same_generator(schedule):
    # Both draw one float32 CPU randn of x's shape per step from the same seeded generator; diffusers also draws
    # one after the last step, which we skip (sigma_up is 0 there), so the sequences agree on every used draw.
    model = GaussianModel(schedule)
    scheduler = EulerAncestralDiscreteScheduler(**SD_CONFIG)
    theirs = run_diffusers(scheduler, model, 15, torch.float32, generator=torch.Generator().manual_seed(42))
    sigmas = get_sigmas(schedule, 15, "normal")
    x = initial_noise(torch.float32) * sigmas[0]
    ours = sample_euler_ancestral(DiscreteDenoiser(model, schedule, quantize=False), x, sigmas,
                                  generator=torch.Generator().manual_seed(42))
    assert_close(ours, theirs)
    other_seed = sample_euler_ancestral(DiscreteDenoiser(model, schedule, quantize=False), x, sigmas,
                                        generator=torch.Generator().manual_seed(43))
    assert (other_seed - theirs).abs().max() > 0.01  # the noise really enters


def test_heun_matches_diffusers(schedule):
    model = GaussianModel(schedule)
    sigmas = get_sigmas(schedule, 12, "normal")
    assert_close(run_ours(sample_heun, model, schedule, sigmas),
                 run_diffusers(HeunDiscreteScheduler(**SD_CONFIG), model, 12))
    assert model.calls == 2 * (2 * 12 - 1)  # both loops: two evaluations a step except the last


@pytest.mark.parametrize("steps", [8, 20])
@pytest.mark.parametrize("karras", [False, True])
def test_dpmpp_2m_matches_diffusers(schedule, karras, steps):
    model = GaussianModel(schedule)
    scheduler = DPMSolverMultistepScheduler(**SD_CONFIG, use_karras_sigmas=karras)
    assert scheduler.config.algorithm_type == "dpmsolver++" and scheduler.config.solver_order == 2
    assert scheduler.config.final_sigmas_type == "zero" and scheduler.config.lower_order_final
    sigmas = get_sigmas(schedule, steps, "karras" if karras else "sgm_uniform_rounded")
    # With Karras sigmas diffusers feeds the model rounded timesteps: quantize does the same.
    ours = run_ours(sample_dpmpp_2m, model, schedule, sigmas, vp_start=True, quantize=karras)
    assert_close(ours, run_diffusers(scheduler, model, steps))


@pytest.mark.parametrize("steps", [5, 20])
@pytest.mark.parametrize("karras", [False, True])
def test_unipc_matches_diffusers(schedule, karras, steps):
    model = GaussianModel(schedule)
    scheduler = UniPCMultistepScheduler(**SD_CONFIG, use_karras_sigmas=karras)
    assert scheduler.config.solver_type == "bh2" and scheduler.config.predict_x0
    sigmas = get_sigmas(schedule, steps, "karras" if karras else "sgm_uniform_rounded")
    ours = run_ours(sample_unipc, model, schedule, sigmas, vp_start=True, quantize=karras)
    theirs = run_diffusers(scheduler, model, steps)
    assert_close(ours, theirs)
    dpm = run_ours(sample_dpmpp_2m, model, schedule, sigmas, vp_start=True, quantize=karras)
    assert (dpm - theirs).abs().max() > 10 * ATOL  # the corrector is not a no-op


def test_a_real_unet_gets_the_same_inputs_as_under_diffusers(schedule):
    """A tiny seeded UNet2DModel: float (B,) timesteps from the denoiser act like diffusers' scalar ones."""
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=4, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).double().eval()

    def model(x_in, t):
        return unet(x_in, t).sample

    with torch.no_grad():
        theirs = run_diffusers(EulerDiscreteScheduler(**SD_CONFIG), model, 13)  # fractional timesteps
        ours = run_ours(sample_euler, model, schedule, get_sigmas(schedule, 13, "normal"))
        assert (ours - theirs).abs().max() < 1e-5 * theirs.abs().max()
        theirs = run_diffusers(DPMSolverMultistepScheduler(**SD_CONFIG, use_karras_sigmas=True), model, 8)
        ours = run_ours(sample_dpmpp_2m, model, schedule, get_sigmas(schedule, 8, "karras"), vp_start=True,
                        quantize=True)
        assert (ours - theirs).abs().max() < 1e-5 * theirs.abs().max()


# --- loop mechanics ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_callback_once_per_step_and_cancel(schedule, name):
    model = GaussianModel(schedule)
    denoiser = DiscreteDenoiser(model, schedule)
    sigmas = get_sigmas(schedule, 6, "karras").double()
    x = initial_noise() * sigmas[0]
    seen = []
    SAMPLERS[name](denoiser, x, sigmas, callback=seen.append, generator=torch.Generator().manual_seed(0))
    assert [info["i"] for info in seen] == list(range(6))
    assert all(info["total"] == 6 and info["sigma"] == sigmas[info["i"]] for info in seen)
    assert all(info["denoised"].shape == x.shape for info in seen)

    def cancel_at_step_2(info):
        if info["i"] == 2:
            calls_at_cancel.append(model.calls)
            raise SamplingCancelled()

    calls_at_cancel = []
    with pytest.raises(SamplingCancelled):
        SAMPLERS[name](denoiser, x, sigmas, callback=cancel_at_step_2, generator=torch.Generator().manual_seed(0))
    assert calls_at_cancel == [model.calls]  # nothing evaluated after the cancel


def test_extra_args_reach_the_model(schedule):
    received = []

    def model(x_in, t, cond):
        received.append(cond)
        return torch.zeros_like(x_in)

    sigmas = get_sigmas(schedule, 3, "normal")
    sample_euler(DiscreteDenoiser(model, schedule), torch.ones(SHAPE), sigmas, extra_args={"cond": "text"})
    assert received == ["text"] * 3


# --- noise ---------------------------------------------------------------------------------------------------------

def test_prepare_noise_is_a_cpu_float32_draw():
    expected = torch.randn(SHAPE, generator=torch.Generator("cpu").manual_seed(7))
    assert torch.equal(prepare_noise(SHAPE, 7), expected)
    assert torch.equal(prepare_noise(SHAPE, 7, dtype=torch.float64), expected.double())  # dtype changes no value
    assert torch.equal(prepare_noise(SHAPE, 7, dtype=torch.float16), expected.half())
    generator = torch.Generator().manual_seed(7)
    assert torch.equal(prepare_noise(SHAPE, generator), expected)
    assert not torch.equal(prepare_noise(SHAPE, generator), expected)  # a passed generator advances


def test_default_noise_sampler_draws_from_the_cpu_generator():
    x = torch.zeros(SHAPE, dtype=torch.float64)
    sampler = default_noise_sampler(x, torch.Generator().manual_seed(5))
    reference = torch.Generator().manual_seed(5)
    for _ in range(2):
        noise = sampler(1.0, 0.5)
        assert noise.dtype == torch.float64 and noise.device == x.device
        assert torch.equal(noise, torch.randn(SHAPE, generator=reference).double())
