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

    The sampler state stays in x's dtype: casting x_in to the model's dtype is model_fn's job, and the raw output
    is cast back to x's dtype here. `quantize` feeds the model integer timesteps, as diffusers' multistep
    schedulers do with Karras sigmas.
    """

    def __init__(self, model_fn: Callable[..., torch.Tensor], schedule: DiscreteSchedule,
                 prediction_type: str = "epsilon", quantize: bool = False):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type: {prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}")
        self.model_fn = model_fn
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.quantize = quantize

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(x.shape[0])
        t = self.schedule.sigma_to_t(sigma, quantize=self.quantize)
        s = sigma.to(x.dtype).reshape(-1, *[1] * (x.dim() - 1))
        raw = self.model_fn(x / (s**2 + 1).sqrt(), t, **cond).to(x.dtype)
        if self.prediction_type == "epsilon":
            return x - s * raw
        if self.prediction_type == "v_prediction":
            return x / (s**2 + 1) - s / (s**2 + 1).sqrt() * raw
        return raw
