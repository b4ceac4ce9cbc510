"""Noise schedules: the training-time sigma table of a discrete-time model, and the sigmas a sampler visits.

Everything is in the variance-exploding parameterisation of k-diffusion: a noisy sample is x = x0 + sigma * noise.
A discrete (DDPM-trained) model with cumulative alphas a_t sees x_vp = sqrt(a_t) * x0 + sqrt(1 - a_t) * noise,
which is the same point scaled by sqrt(a_t) = 1 / sqrt(sigma_t^2 + 1), with sigma_t = sqrt((1 - a_t) / a_t).

A sampling schedule is a decreasing 1-D tensor of n + 1 sigmas, the last one 0 (or the smallest trained sigma,
see `get_sigmas_ddim`); a sampler takes one step between each neighbouring pair.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

# The names ComfyUI's KSampler offers mean what they mean there (comfy/samplers.py); the variants after them are
# this library's own: "karras_capped" (the bundled model's default), diffusers' rounded sgm_uniform and its
# "leading" DDIM spacing.
COMFYUI_SCHEDULES = ("normal", "karras", "sgm_uniform", "simple", "ddim_uniform")
SCHEDULES = (*COMFYUI_SCHEDULES, "karras_capped", "sgm_uniform_rounded", "ddim_leading")
DEFAULT_SCHEDULE = "karras_capped"

# The top of the "karras_capped" schedule when a model's table reaches higher: EDM's sampling range (Karras et al.
# 2022). The cosine schedule's capped last step sits at sigma 20,291 (zero terminal SNR's at 4,096); a 12-step
# Karras ramp up there spends 8 steps above sigma 60, where the input holds under 1/60 of signal, and leaves the
# picture grainy. Starting at 80 loses nothing (the model sees noise either way). Tables below 80 (Stable
# Diffusion's 14.6) are untouched, so there "karras_capped" is "karras" and diffusers' use_karras_sigmas=True.
KARRAS_SIGMA_MAX = 80.0
# The longest schedule built: img2img with `denoise` builds steps / denoise steps and keeps the last `steps`.
MAX_SCHEDULE_STEPS = 10_000


class DiscreteSchedule:
    """The sigma table of a model trained on timesteps 0..T-1, and the maps between sigma and timestep."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if not bool(((self.alphas_cumprod > 0) & (self.alphas_cumprod < 1)).all()):
            raise ValueError("alphas_cumprod: every entry must lie strictly between 0 and 1")
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()
        self.log_sigmas = self.sigmas.log()

    @classmethod
    def from_betas(cls, beta_start: float, beta_end: float, num_train_timesteps: int = 1000,
                   beta_schedule: str = "scaled_linear", rescale_betas_zero_snr: bool = False) -> "DiscreteSchedule":
        """The table diffusers' schedulers build for the same arguments (float32 betas and cumprod, as there)."""
        return cls._from_beta_tensor(_betas(beta_schedule, beta_start, beta_end, num_train_timesteps),
                                     rescale_betas_zero_snr)

    @classmethod
    def from_scheduler_config(cls, config: dict) -> "DiscreteSchedule":
        """From a diffusers scheduler config dict (`scheduler_config.json`); missing keys take diffusers' defaults."""
        rescale = config.get("rescale_betas_zero_snr", False)
        if config.get("trained_betas") is not None:
            return cls._from_beta_tensor(torch.tensor(config["trained_betas"], dtype=torch.float32), rescale)
        return cls.from_betas(config.get("beta_start", 0.0001), config.get("beta_end", 0.02),
                              config.get("num_train_timesteps", 1000), config.get("beta_schedule", "linear"), rescale)

    @classmethod
    def _from_beta_tensor(cls, betas: torch.Tensor, rescale_betas_zero_snr: bool) -> "DiscreteSchedule":
        if rescale_betas_zero_snr:
            betas = _rescale_zero_terminal_snr(betas)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        if rescale_betas_zero_snr:
            alphas_cumprod[-1] = 2**-24  # diffusers' stand-in for 0, which would make sigma_max infinite
        return cls(alphas_cumprod)

    @property
    def num_timesteps(self) -> int:
        return self.sigmas.shape[0]

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor, quantize: bool = False) -> torch.Tensor:
        """Float timestep(s) of `sigma`, interpolating linearly in log-sigma between table entries (k-diffusion).

        Computed in sigma's dtype (at least float32), on sigma's device. `quantize` gives instead the timestep
        whose table sigma is nearest in log-sigma: what ComfyUI feeds a discrete model
        (ModelSamplingDiscrete.timestep), and diffusers' multistep schedulers with Karras sigmas.
        """
        sigma = torch.as_tensor(sigma)
        dtype = torch.promote_types(sigma.dtype, torch.float32)
        log_sigmas = self.log_sigmas.to(sigma.device, dtype)
        log_sigma = sigma.to(dtype).log()
        if quantize:
            nearest = (log_sigma.reshape(1, -1) - log_sigmas[:, None]).abs().argmin(dim=0)
            return nearest.reshape(sigma.shape).to(dtype)
        low = (torch.searchsorted(log_sigmas, log_sigma.reshape(-1)) - 1).clamp(0, self.num_timesteps - 2)
        low_value, high_value = log_sigmas[low], log_sigmas[low + 1]
        w = ((low_value - log_sigma.reshape(-1)) / (low_value - high_value)).clamp(0, 1)
        return (low + w).reshape(sigma.shape)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Sigma at float timestep(s) `t`, interpolating linearly in log-sigma (the inverse of `sigma_to_t`)."""
        t = torch.as_tensor(t)
        dtype = torch.promote_types(t.dtype, torch.float32)
        log_sigmas = self.log_sigmas.to(t.device, dtype)
        t = t.to(dtype).clamp(0, self.num_timesteps - 1)
        low = t.floor().long().clamp(max=self.num_timesteps - 2)
        w = t - low
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[low + 1]).exp()


def _betas(beta_schedule: str, beta_start: float, beta_end: float, num_train_timesteps: int) -> torch.Tensor:
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if beta_schedule == "scaled_linear":  # Stable Diffusion's: linear in sqrt(beta)
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal's cosine schedule, betas capped at 0.999
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        steps = range(num_train_timesteps)
        betas = [min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), 0.999)
                 for i in steps]
        return torch.tensor(betas, dtype=torch.float32)
    raise ValueError(f"beta_schedule: {beta_schedule!r} is not one of 'linear', 'scaled_linear', 'squaredcos_cap_v2'")


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alphas_cumprod) so the last timestep is pure noise (Lin et al. 2023, Algorithm 1)."""
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    alphas_cumprod = root**2
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1 - alphas


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022): sigma_i = (max^(1/rho) + i/(n-1) * (min^(1/rho) - max^(1/rho)))^rho, then 0.

    With sigma_min/sigma_max the ends of the model's table this is ComfyUI's "karras" and diffusers'
    `use_karras_sigmas=True`; `get_sigmas(..., "karras_capped")` caps sigma_max at KARRAS_SIGMA_MAX.
    """
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho).float()


def get_sigmas_normal(schedule: DiscreteSchedule, n: int) -> torch.Tensor:
    """n timesteps evenly spaced from T-1 down to 0 inclusive, then sigma 0: ComfyUI's "normal".

    Sigma at a fractional timestep is interpolated linearly in log-sigma (ModelSamplingDiscrete.sigma); diffusers'
    EulerDiscreteScheduler interpolates sigma itself, which differs by under 1e-6 relative on SD's table.
    """
    t = torch.linspace(schedule.num_timesteps - 1, 0, n, dtype=torch.float64)
    return _append_zero(schedule.t_to_sigma(t)).float()


def get_sigmas_sgm_uniform(schedule: DiscreteSchedule, n: int) -> torch.Tensor:
    """n + 1 timesteps evenly spaced over [T-1, 0], the last (t = 0) dropped, then sigma 0: ComfyUI's sgm_uniform.

    The timesteps stay fractional, their sigmas interpolated in log-sigma, as ComfyUI does.
    """
    t = torch.linspace(schedule.num_timesteps - 1, 0, n + 1, dtype=torch.float64)[:-1]
    return _append_zero(schedule.t_to_sigma(t)).float()


def get_sigmas_sgm_uniform_rounded(schedule: DiscreteSchedule, n: int) -> torch.Tensor:
    """`get_sigmas_sgm_uniform` with the timesteps rounded to integers: the "linspace" spacing of diffusers'
    multistep schedulers (DPMSolverMultistep, UniPCMultistep)."""
    t = torch.linspace(0, schedule.num_timesteps - 1, n + 1, dtype=torch.float64).round().long().flip(0)[:-1]
    return _append_zero(schedule.sigmas[t]).float()


def get_sigmas_simple(schedule: DiscreteSchedule, n: int) -> torch.Tensor:
    """Every (T / n)-th table sigma from the top, then 0: ComfyUI's "simple"."""
    stride = schedule.num_timesteps / n
    t = torch.tensor([schedule.num_timesteps - 1 - int(k * stride) for k in range(n)])
    return _append_zero(schedule.sigmas[t]).float()


def get_sigmas_ddim_uniform(schedule: DiscreteSchedule, n: int) -> torch.Tensor:
    """ComfyUI's "ddim_uniform": table sigmas at t = 1, 1 + T // n, ... below T, top first, then 0.

    The stride rounds down, so it may give more than n steps (31 for n = 30 on a 1000-step table).
    """
    stride = max(schedule.num_timesteps // n, 1)
    t = torch.arange(1, schedule.num_timesteps, stride).flip(0)
    return _append_zero(schedule.sigmas[t]).float()


def get_sigmas_ddim(schedule: DiscreteSchedule, n: int, steps_offset: int = 1,
                    set_alpha_to_one: bool = False) -> torch.Tensor:
    """DDIMScheduler's "leading" timesteps ("ddim_leading"): t_k = k * (T // n) + steps_offset for k = n-1..0.

    The step after t_0 lands where DDIM puts its "final alpha": alphas_cumprod[0] (sigma_min) with Stable
    Diffusion's set_alpha_to_one=False, or alpha = 1 (sigma 0) with set_alpha_to_one=True. In the former case the
    result keeps sigma_min of noise, exactly as diffusers' does; dividing by sqrt(sigma_min^2 + 1) gives diffusers'
    variance-preserving sample.
    """
    step_ratio = schedule.num_timesteps // n
    t = (torch.arange(n) * step_ratio + steps_offset).flip(0)
    final = schedule.sigmas.new_zeros(1) if set_alpha_to_one else schedule.sigmas[:1]
    return torch.cat([schedule.sigmas[t], final]).float()


_SCHEDULE_FUNCTIONS = {
    "normal": get_sigmas_normal,
    "karras": lambda schedule, n: get_sigmas_karras(n, schedule.sigma_min, schedule.sigma_max),
    "sgm_uniform": get_sigmas_sgm_uniform,
    "simple": get_sigmas_simple,
    "ddim_uniform": get_sigmas_ddim_uniform,
    "karras_capped": lambda schedule, n: get_sigmas_karras(n, schedule.sigma_min,
                                                           min(schedule.sigma_max, KARRAS_SIGMA_MAX)),
    "sgm_uniform_rounded": get_sigmas_sgm_uniform_rounded,
    "ddim_leading": get_sigmas_ddim,
}


def get_sigmas(schedule: DiscreteSchedule, n: int, name: str = DEFAULT_SCHEDULE) -> torch.Tensor:
    """The sigmas of the named schedule (one of SCHEDULES) for n steps of a model with this table."""
    if n < 1:
        raise ValueError(f"steps: must be at least 1, got {n}")
    if name not in _SCHEDULE_FUNCTIONS:
        raise ValueError(f"schedule: {name!r} is not one of {', '.join(SCHEDULES)}")
    return _SCHEDULE_FUNCTIONS[name](schedule, n)


def sigmas_for_denoise(sigmas_fn: Callable[[int], torch.Tensor], steps: int, denoise: float) -> torch.Tensor:
    """The last `steps` steps of a longer schedule, for img2img with strength `denoise` in (0, 1].

    ComfyUI's KSampler convention: build the schedule for int(steps / denoise) steps and keep its last
    steps + 1 sigmas, so `steps` model steps are always run and the first one starts at roughly the noise level
    a fraction `denoise` of the way down from pure noise. `sigmas_fn(n)` returns the n + 1 sigmas of n steps.
    """
    if not 0.0 < denoise <= 1.0:
        raise ValueError(f"denoise: must be in (0, 1], got {denoise}")
    if denoise > 0.9999:
        return sigmas_fn(steps)
    return sigmas_fn(denoise_schedule_length(steps, denoise))[-(steps + 1):]


def denoise_schedule_length(steps: int, denoise: float) -> int:
    """int(steps / denoise), the length of the schedule `sigmas_for_denoise` cuts from; a ValueError when that is
    over MAX_SCHEDULE_STEPS (a tiny denoise would otherwise build a schedule of billions of steps)."""
    length = steps / denoise
    if not length <= MAX_SCHEDULE_STEPS:
        least = steps / MAX_SCHEDULE_STEPS
        raise ValueError(f"denoise: {denoise:g} with {steps} steps needs a schedule of {length:.3g} steps, over the "
                         f"limit of {MAX_SCHEDULE_STEPS}; use a denoise of at least {least:g}")
    return int(length)
