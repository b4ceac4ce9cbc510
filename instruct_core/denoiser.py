"""The denoiser D(x, sigma): a discrete-time diffusion model seen from the samplers.

Samplers work on x = x0 + sigma * noise and need D(x, sigma) ~ E[x0 | x]. A model trained on timesteps sees
c_in * x (the variance-preserving point, c_in = 1 / sqrt(sigma^2 + 1)) at the timestep t whose table sigma is
sigma, and its raw output F becomes D = c_skip * x + c_out * F:

    epsilon       c_skip = 1                    c_out = -sigma
    v_prediction  c_skip = 1 / (sigma^2 + 1)    c_out = -sigma / sqrt(sigma^2 + 1)   (k-diffusion, sigma_data = 1)
    sample        c_skip = 0                    c_out = 1
"""

from __future__ import annotations

from typing import Callable

import torch

from .schedules import DiscreteSchedule

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class DiscreteDenoiser:
    """Wraps `model_fn(x_in, t, **cond) -> raw output` (e.g. a UNet call) into D(x, sigma, **cond).

    The sampler state stays in x's dtype: casting x_in to the model's dtype is model_fn's job, and the result is
    cast back to x's dtype here. Sigma arithmetic (sigma^2 + 1 and the scalings) runs in float32 at least, so a
    float16 state at sigma 20,000 gets the same model input as a float32 one instead of an overflow.
    `quantize` (the default) feeds the model the integer timestep nearest in log-sigma, as ComfyUI does for
    discrete models; False feeds the interpolated fractional timestep (k-diffusion's DiscreteEpsDDPMDenoiser).
    """

    def __init__(self, model_fn: Callable[..., torch.Tensor], schedule: DiscreteSchedule,
                 prediction_type: str = "epsilon", quantize: bool = True):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type: {prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}")
        self.model_fn = model_fn
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.quantize = quantize

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(dtype).reshape(-1).expand(x.shape[0])
        t = self.schedule.sigma_to_t(sigma, quantize=self.quantize)
        s = sigma.reshape(-1, *[1] * (x.dim() - 1))
        state = x.to(dtype)
        raw = self.model_fn((state / (s**2 + 1).sqrt()).to(x.dtype), t, **cond).to(dtype)
        if self.prediction_type == "epsilon":
            denoised = state - s * raw
        elif self.prediction_type == "v_prediction":
            denoised = state / (s**2 + 1) - s / (s**2 + 1).sqrt() * raw
        else:
            denoised = raw
        return denoised.to(x.dtype)
