"""The CogVideoX noise schedule and v-prediction algebra.

Forward process (variance preserving): x_t = alpha_t * x0 + sigma_t * eps, with alpha_t = sqrt(abar_t) and
sigma_t = sqrt(1 - abar_t), where abar_t is ``alphas_cumprod[t]``. The model predicts the "velocity"
v = alpha_t * eps - sigma_t * x0 (Salimans & Ho 2022), from which x0 and eps follow linearly:

    x0  = alpha_t * x_t - sigma_t * v
    eps = sigma_t * x_t + alpha_t * v

CogVideoX builds abar_t in three steps, all in float64 here because the last entries of the zero-SNR schedule are
tiny differences of numbers close to each other:
  1. scaled-linear betas: sqrt(beta) linear from sqrt(0.00085) to sqrt(0.012) over 1000 steps;
  2. SNR shift: abar / (s + (1 - s) * abar), which divides the signal-to-noise ratio abar / (1 - abar) by s
     (s = 3.0 in CogVideoX; larger videos need more noise for the same perceived corruption);
  3. zero terminal SNR (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed"): shift and
     rescale sqrt(abar) so that the last step is pure noise (abar_{T-1} = 0) while abar_0 is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def scaled_linear_betas(
    num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> torch.Tensor:
    """Betas whose square roots are evenly spaced (the Stable Diffusion / CogVideoX "scaled_linear" schedule)."""
    if num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
    if not 0.0 < beta_start < beta_end < 1.0:
        raise ValueError(f"need 0 < beta_start < beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}")
    root = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64)
    return root**2


def linear_betas(num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """Betas evenly spaced from beta_start to beta_end (the original DDPM "linear" schedule), float64."""
    scaled_linear_betas(num_train_timesteps, beta_start, beta_end)  # same argument checks
    return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)


_BETA_SCHEDULES = {"scaled_linear": scaled_linear_betas, "linear": linear_betas}


def shift_snr(alphas_cumprod: torch.Tensor, snr_shift_scale: float) -> torch.Tensor:
    """Divide the SNR abar / (1 - abar) of every step by ``snr_shift_scale`` (1.0 leaves the schedule unchanged).

    Solving abar' / (1 - abar') = abar / (s * (1 - abar)) for abar' gives abar / (s + (1 - s) * abar).
    """
    if snr_shift_scale <= 0:
        raise ValueError(f"snr_shift_scale must be > 0, got {snr_shift_scale}")
    return alphas_cumprod / (snr_shift_scale + (1.0 - snr_shift_scale) * alphas_cumprod)


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Affinely map sqrt(abar) so that its first value is kept and its last becomes exactly 0 (Lin et al. 2023)."""
    root = alphas_cumprod.sqrt()
    first, last = root[0].item(), root[-1].item()
    if first <= last:
        raise ValueError("alphas_cumprod must decrease over time to be rescaled to zero terminal SNR")
    return ((root - last) * (first / (first - last))) ** 2


def make_alphas_cumprod(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    snr_shift_scale: float = 3.0,
    zero_terminal_snr: bool = True,
    beta_schedule: str = "scaled_linear",
) -> torch.Tensor:
    """abar_t of the CogVideoX schedule as a float64 tensor [num_train_timesteps] (shift first, then rescale)."""
    if beta_schedule not in _BETA_SCHEDULES:
        raise ValueError(f"beta_schedule must be one of {list(_BETA_SCHEDULES)}, got {beta_schedule!r}")
    betas = _BETA_SCHEDULES[beta_schedule](num_train_timesteps, beta_start, beta_end)
    abar = torch.cumprod(1.0 - betas, dim=0)
    abar = shift_snr(abar, snr_shift_scale)
    if zero_terminal_snr:
        abar = rescale_zero_terminal_snr(abar)
    return abar


def _per_sample(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Gather ``values[t]`` and shape it [B, 1, 1, ...] to broadcast against ``like`` (batch first)."""
    t = torch.as_tensor(t, device=values.device).long().reshape(-1)
    out = values[t].to(device=like.device, dtype=like.dtype)
    if out.numel() not in (1, like.shape[0]):
        raise ValueError(f"timesteps has {out.numel()} entries but the batch has {like.shape[0]} samples")
    return out.reshape(-1, *([1] * (like.dim() - 1)))


@dataclass(frozen=True)
class NoiseSchedule:
    """A discrete VP schedule for v-prediction. ``alphas_cumprod`` is float64 [T]; index it with integer t."""

    alphas_cumprod: torch.Tensor

    def __post_init__(self):
        abar = self.alphas_cumprod
        if abar.dim() != 1 or abar.dtype != torch.float64:
            raise ValueError(f"alphas_cumprod must be a 1-D float64 tensor, got shape {tuple(abar.shape)} {abar.dtype}")
        if not bool(((abar >= 0) & (abar <= 1)).all()):
            raise ValueError("alphas_cumprod must lie in [0, 1]")

    @classmethod
    def cogvideox(
        cls,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        snr_shift_scale: float = 3.0,
        zero_terminal_snr: bool = True,
        beta_schedule: str = "scaled_linear",
    ) -> NoiseSchedule:
        """The schedule CogVideoX trains and samples with (defaults), or a variant of it."""
        return cls(
            make_alphas_cumprod(
                num_train_timesteps, beta_start, beta_end, snr_shift_scale, zero_terminal_snr, beta_schedule
            )
        )

    @classmethod
    def from_config(cls, cfg) -> NoiseSchedule:
        """From a ``cogvx_ds.config.DiffusionConfig`` (any object with its field names).

        Only v-prediction is implemented: with zero terminal SNR an epsilon model cannot give x0 at the first
        sampling step (alpha = 0), which is why CogVideoX predicts v.
        """
        prediction = getattr(cfg, "prediction_type", "v_prediction")
        if prediction != "v_prediction":
            raise ValueError(
                f"diffusion.prediction_type must be 'v_prediction' (the only one implemented), got {prediction!r}"
            )
        return cls.cogvideox(
            num_train_timesteps=cfg.num_train_timesteps,
            beta_start=cfg.beta_start,
            beta_end=cfg.beta_end,
            snr_shift_scale=cfg.snr_shift_scale,
            zero_terminal_snr=cfg.rescale_zero_terminal_snr,
            beta_schedule=getattr(cfg, "beta_schedule", "scaled_linear"),
        )

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    @property
    def alphas(self) -> torch.Tensor:
        """alpha_t = sqrt(abar_t), float64 [T]."""
        return self.alphas_cumprod.sqrt()

    @property
    def sigmas(self) -> torch.Tensor:
        """sigma_t = sqrt(1 - abar_t), float64 [T]."""
        return (1.0 - self.alphas_cumprod).sqrt()

    def snr(self) -> torch.Tensor:
        """abar / (1 - abar), float64 [T]; 0 at the last step of a zero-terminal-SNR schedule."""
        return self.alphas_cumprod / (1.0 - self.alphas_cumprod)

    def coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) for integer timesteps t [B], shaped to broadcast against ``like`` [B, ...]."""
        return _per_sample(self.alphas, t, like), _per_sample(self.sigmas, t, like)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = alpha_t * x0 + sigma_t * noise."""
        alpha, sigma = self.coefficients(t, x0)
        return alpha * x0 + sigma * noise

    def v_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The velocity the model must predict: v = alpha_t * noise - sigma_t * x0."""
        alpha, sigma = self.coefficients(t, x0)
        return alpha * noise - sigma * x0

    def x0_from_v(self, x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0 = alpha_t * x_t - sigma_t * v (exact inverse of add_noise / v_target)."""
        alpha, sigma = self.coefficients(t, x_t)
        return alpha * x_t - sigma * v

    def eps_from_v(self, x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps = sigma_t * x_t + alpha_t * v."""
        alpha, sigma = self.coefficients(t, x_t)
        return sigma * x_t + alpha * v
