"""Diffusion for CogVideoX-style training and sampling: schedule, timestep sampling, loss, samplers.

Nothing here imports diffusers; tests use it as an independent oracle.
"""

from .loss import bucket_loss_sums, bucket_losses, bucket_names, v_mse_loss
from .samplers import (
    ddim_sample,
    dpmpp_2m_sample,
    guidance_scale_at,
    guided_velocity,
    noise_from_seeds,
    sample,
    trailing_timesteps,
)
from .schedule import (
    NoiseSchedule,
    linear_betas,
    make_alphas_cumprod,
    rescale_zero_terminal_snr,
    scaled_linear_betas,
    shift_snr,
)
from .timesteps import explicit_uniform_interval, sampling_generator, sampling_seed

__all__ = [
    "NoiseSchedule",
    "bucket_loss_sums",
    "bucket_losses",
    "bucket_names",
    "ddim_sample",
    "dpmpp_2m_sample",
    "explicit_uniform_interval",
    "guidance_scale_at",
    "guided_velocity",
    "linear_betas",
    "make_alphas_cumprod",
    "noise_from_seeds",
    "rescale_zero_terminal_snr",
    "sample",
    "sampling_generator",
    "sampling_seed",
    "scaled_linear_betas",
    "shift_snr",
    "trailing_timesteps",
    "v_mse_loss",
]
