"""Samplers: short stateless loops over a denoiser D(x, sigma) and a decreasing tensor of sigmas.

Every sampler has the signature

    sample_x(denoiser, x, sigmas, extra_args=None, callback=None, noise_sampler=None, generator=None) -> x

where x starts at noise * sigmas[0] (pure noise) or at a noised image (img2img), `extra_args` are passed to
every denoiser call, and `callback(dict(i=, x=, sigma=, denoised=, total=))` runs once per step, with x the state
before step i. To stop early, the callback raises `SamplingCancelled`; it propagates out of the sampler
unchanged, so the caller catches it. Deterministic samplers ignore `noise_sampler` and `generator`.
Notation: D = D(x, sigma), sigma' = the next sigma, r = sigma' / sigma.

Starting at noise * sqrt(sigma_0^2 + 1) instead is exactly the variance-preserving x_vp = noise that diffusers'
DDIM, DPM-Solver and UniPC schedulers start from; at Stable Diffusion's sigma_max the two differ by 0.2%. The
pipeline starts there from the top of the schedule, as ComfyUI's samplers do (`pipeline.start_noise_scale`), so
a seed gives the picture KSampler gives.

Random noise is drawn on the CPU in float32 (from `generator`, or torch's global CPU generator) and then moved,
so a seed gives the same image on every device and in every state dtype.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .schedules import SCHEDULES  # noqa: F401  (re-exported: the schedule names samplers are offered with)


class SamplingCancelled(Exception):
    """Raised by a sampler callback to stop sampling; the sampler lets it propagate to its caller."""


def prepare_noise(shape, seed: int | torch.Generator, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normal noise of `shape`, drawn on the CPU in float32 and then moved to `device` and `dtype`."""
    generator = seed if isinstance(seed, torch.Generator) else torch.Generator("cpu").manual_seed(int(seed))
    _check_cpu(generator)
    return torch.randn(shape, generator=generator, dtype=torch.float32, device="cpu").to(device, dtype)


def default_noise_sampler(x: torch.Tensor, generator: torch.Generator | None = None) -> Callable:
    """noise_sampler(sigma, sigma_next) -> fresh noise like x, drawn on the CPU (see `prepare_noise`)."""
    if generator is not None:
        _check_cpu(generator)

    def noise_sampler(sigma, sigma_next):
        return torch.randn(x.shape, generator=generator, dtype=torch.float32, device="cpu").to(x.device, x.dtype)

    return noise_sampler


def _check_cpu(generator: torch.Generator) -> None:
    if generator.device.type != "cpu":
        raise ValueError(f"generator: must be a CPU torch.Generator (same seed, same image on every device), "
                         f"got one on {generator.device}")


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """dx/dsigma of the probability-flow ODE: (x - D) / sigma."""
    return (x - denoised) / sigma


def get_ancestral_step(sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float = 1.0):
    """Split the step to sigma' into a deterministic step down to sigma_down and fresh noise of size sigma_up,
    with sigma_down^2 + sigma_up^2 = sigma'^2 (eta = 1 is DDPM's posterior variance)."""
    sigma_up = torch.minimum(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def exponential_step(x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
                     denoised: torch.Tensor) -> torch.Tensor:
    """Exact solution of the ODE over [sigma', sigma] for a constant D: r * x + (1 - r) * D (the DDIM step)."""
    r = sigma_next / sigma
    return r * x + (1 - r) * denoised


def _report(callback, i, x, sigma, denoised, total):
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "denoised": denoised, "total": total})


@torch.no_grad()
def sample_euler(denoiser, x, sigmas, extra_args=None, callback=None, noise_sampler=None, generator=None):
    """Euler on the probability-flow ODE: x' = x + (sigma' - sigma) * (x - D) / sigma."""
    extra_args, s_in, total = extra_args or {}, x.new_ones([x.shape[0]]), len(sigmas) - 1
    for i in range(total):
        denoised = denoiser(x, sigmas[i] * s_in, **extra_args)
        _report(callback, i, x, sigmas[i], denoised, total)
        x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_euler_ancestral(denoiser, x, sigmas, extra_args=None, callback=None, noise_sampler=None,
                           generator=None, eta: float = 1.0):
    """Euler down to sigma_down, then add fresh noise of size sigma_up (see `get_ancestral_step`)."""
    extra_args, s_in, total = extra_args or {}, x.new_ones([x.shape[0]]), len(sigmas) - 1
    noise_sampler = noise_sampler or default_noise_sampler(x, generator)
    for i in range(total):
        denoised = denoiser(x, sigmas[i] * s_in, **extra_args)
        _report(callback, i, x, sigmas[i], denoised, total)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigma_up
    return x


@torch.no_grad()
def sample_heun(denoiser, x, sigmas, extra_args=None, callback=None, noise_sampler=None, generator=None):
    """Heun (Karras et al. 2022, Alg. 1): an Euler step, then the average of the slopes at both ends.

    The step to sigma' = 0 stays Euler, since the slope there is undefined.
    """
    extra_args, s_in, total = extra_args or {}, x.new_ones([x.shape[0]]), len(sigmas) - 1
    for i in range(total):
        denoised = denoiser(x, sigmas[i] * s_in, **extra_args)
        _report(callback, i, x, sigmas[i], denoised, total)
        d = to_d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
            continue
        x_euler = x + d * dt
        d_next = to_d(x_euler, sigmas[i + 1], denoiser(x_euler, sigmas[i + 1] * s_in, **extra_args))
        x = x + (d + d_next) / 2 * dt
    return x


@torch.no_grad()
def sample_ddim(denoiser, x, sigmas, extra_args=None, callback=None, noise_sampler=None, generator=None):
    """Deterministic DDIM (eta = 0): x' = D + sigma' * eps with eps = (x - D) / sigma.

    With x = x_vp / sqrt(a) this is DDIM's x'_vp = sqrt(a') * x0 + sqrt(1 - a') * eps, step for step; in sigma
    space it coincides with an Euler step. Pair it with the "ddim_uniform" schedule to reproduce DDIMScheduler.
    """
    extra_args, s_in, total = extra_args or {}, x.new_ones([x.shape[0]]), len(sigmas) - 1
    for i in range(total):
        denoised = denoiser(x, sigmas[i] * s_in, **extra_args)
        _report(callback, i, x, sigmas[i], denoised, total)
        x = exponential_step(x, sigmas[i], sigmas[i + 1], denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoiser, x, sigmas, extra_args=None, callback=None, noise_sampler=None, generator=None):
    """DPM-Solver++(2M) (Lu et al. 2022): the exponential step with D extrapolated from the previous one,

        x' = r * x + (1 - r) * (D + (D - D_prev) / (2 * r_h)),   r_h = h_prev / h,   h = log(sigma / sigma'),

    first order on the first step and on the step to sigma' = 0.
    """
    extra_args, s_in, total = extra_args or {}, x.new_ones([x.shape[0]]), len(sigmas) - 1
    old_denoised = None
    for i in range(total):
        denoised = denoiser(x, sigmas[i] * s_in, **extra_args)
        _report(callback, i, x, sigmas[i], denoised, total)
        if old_denoised is None or sigmas[i + 1] == 0:
            x = exponential_step(x, sigmas[i], sigmas[i + 1], denoised)
        else:
            r_h = (sigmas[i - 1] / sigmas[i]).log() / (sigmas[i] / sigmas[i + 1]).log()
            x = exponential_step(x, sigmas[i], sigmas[i + 1], denoised + (denoised - old_denoised) / (2 * r_h))
        old_denoised = denoised
    return x


def _unic_weights(h: torch.Tensor, r1: torch.Tensor):
    """Order-2 UniC weights (rho_1, rho_t) for B(h) = e^-h - 1, solving [[1, 1], [r1, 1]] rho = b."""
    phi = torch.expm1(-h)
    b1 = (phi / -h - 1) / phi
    b2 = 2 * ((phi / -h - 1) / -h - 0.5) / phi
    rho_1 = (b1 - b2) / (1 - r1)
    return rho_1, b1 - rho_1


@torch.no_grad()
def sample_unipc(denoiser, x, sigmas, extra_args=None, callback=None, noise_sampler=None, generator=None):
    """UniPC (Zhao et al. 2023) as diffusers' UniPCMultistepScheduler defaults: order 2, x0 prediction, "bh2".

    Every update is an exponential step from the previous point with D replaced by a corrected estimate.
    Predictor UniP-2 (which is DPM-Solver++(2M)): D + (D_prev - D) / (2 * r1), r1 = log(sigma_prev/sigma) / h.
    Corrector UniC, once D at the new point is known, re-takes the step just made from its start x_prev:
    order 1: D_prev + (D - D_prev) / 2; order 2: D_prev + rho_1 * (D_prev2 - D_prev) / r1 + rho_t * (D - D_prev).
    The corrected x feeds the next predictor but D is not re-evaluated there; the last step is first order.
    """
    extra_args, s_in, total = extra_args or {}, x.new_ones([x.shape[0]]), len(sigmas) - 1
    history, x_prev = [], None  # D at the points visited so far, newest last
    for i in range(total):
        denoised = denoiser(x, sigmas[i] * s_in, **extra_args)
        _report(callback, i, x, sigmas[i], denoised, total)
        if i == 1:
            x = exponential_step(x_prev, sigmas[0], sigmas[1], history[-1] + (denoised - history[-1]) / 2)
        elif i > 1:
            h = (sigmas[i - 1] / sigmas[i]).log()
            r1 = (sigmas[i - 1] / sigmas[i - 2]).log() / h
            rho_1, rho_t = _unic_weights(h, r1)
            correction = rho_1 * (history[-2] - history[-1]) / r1 + rho_t * (denoised - history[-1])
            x = exponential_step(x_prev, sigmas[i - 1], sigmas[i], history[-1] + correction)
        history, x_prev = (history + [denoised])[-2:], x
        if i == 0 or i == total - 1:
            x = exponential_step(x, sigmas[i], sigmas[i + 1], denoised)
        else:
            r1 = (sigmas[i] / sigmas[i - 1]).log() / (sigmas[i] / sigmas[i + 1]).log()
            x = exponential_step(x, sigmas[i], sigmas[i + 1], denoised + (history[-2] - denoised) / (2 * r1))
    return x


# Heun's second slope is taken at sigma' with the Euler guess; its error grows with sigma / sigma'. On the bundled
# model (sigma_max 20,291) steps shrinking sigma 69 to 11,590 times (4-10 steps of normal, sgm_uniform, simple,
# karras) end with latents of 6 to 5,500 in size instead of about 1; steps of up to 46 times stay stable.
HEUN_MAX_SIGMA_RATIO = 50.0


def check_sampler_sigmas(sampler: str, sigmas: torch.Tensor) -> None:
    """A ValueError with the reason when `sampler` is unstable on these sigmas (today: Heun on too big a step)."""
    if sampler != "heun" or len(sigmas) < 3:
        return
    sigmas = sigmas.detach().double().cpu()
    ratios = sigmas[:-2] / sigmas[1:-1]  # the step to sigma' = 0 is an Euler step
    worst = int(ratios.argmax())
    if float(ratios[worst]) > HEUN_MAX_SIGMA_RATIO:
        raise ValueError(
            f"sampler: heun is unstable on this schedule: its step from sigma {float(sigmas[worst]):.4g} to "
            f"{float(sigmas[worst + 1]):.4g} shrinks sigma {float(ratios[worst]):.0f} times (over "
            f"{HEUN_MAX_SIGMA_RATIO:g}), and Heun's second slope multiplies the model's error by that; use more "
            f"steps, the karras_capped schedule, or another sampler")


SAMPLERS = {
    "ddim": sample_ddim,
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "unipc": sample_unipc,
}
