"""DDIM and DPM-Solver++(2M) samplers for a v-prediction model on a discrete schedule, with classifier-free guidance.

The model is any callable ``model_fn(x, t) -> v`` with x [B, ...] and t an int64 tensor [B]; conditioning lives
inside the callable (a closure over text embeddings). Guidance takes a second callable ``uncond_fn`` with the same
signature, for the empty caption.

Timesteps are "trailing" (Lin et al. 2023, table 2): n steps start at the last training timestep T-1, where the
zero-terminal-SNR schedule is pure noise, and the final step lands on the clean sample (abar = 1, like diffusers'
``set_alpha_to_one``). Each step goes exactly from one listed timestep to the next; diffusers' CogVideoX schedulers
instead step back by T // n, which coincides with the list only when n divides T.

Both samplers compute their coefficients in float64 from the schedule and keep x in the caller's dtype: pass
float32 latents (and cast inside model_fn for a bf16 model) so 50 updates do not accumulate bf16 rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from fractions import Fraction

import torch

from .schedule import NoiseSchedule

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Generators = torch.Generator | Sequence[torch.Generator] | None


def trailing_timesteps(num_inference_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """Descending timesteps round(k * T / n) - 1 for k = n .. 1 (round half to even, as numpy does).

    Exact rational arithmetic, so n that does not divide T gives exactly n distinct steps, the first being T - 1.
    """
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps must be in [1, num_train_timesteps={num_train_timesteps}], got {num_inference_steps}"
        )
    n, total = num_inference_steps, num_train_timesteps
    return [round(Fraction(k * total, n)) - 1 for k in range(n, 0, -1)]


def guidance_scale_at(step: int, num_steps: int, guidance_scale: float, dynamic: bool, exponent: float = 5.0) -> float:
    """The guidance scale used at sampling step ``step`` (0 = the noisiest).

    Dynamic guidance follows CogVideoX (SAT's DynamicCFG): 1 + scale * (1 - cos(pi * ((n - step) / n) ** exponent)) / 2,
    i.e. 1 + scale at the first step, falling along a cosine ramp to about 1 at the last, so that strong guidance
    shapes the layout early and stops over-saturating details late. (diffusers' pipeline plugs the training
    timestep into this formula instead of the step index; we keep SAT's meaning.)
    """
    if not dynamic:
        return float(guidance_scale)
    progress = (num_steps - step) / num_steps
    return 1.0 + guidance_scale * (1.0 - math.cos(math.pi * progress**exponent)) / 2.0


def guided_velocity(
    model_fn: ModelFn, uncond_fn: ModelFn | None, x: torch.Tensor, t: torch.Tensor, scale: float
) -> torch.Tensor:
    """v_uncond + scale * (v_cond - v_uncond); at scale 1 only the conditional model runs (exactly v_cond)."""
    v_cond = model_fn(x, t)
    if scale == 1.0:
        return v_cond
    if uncond_fn is None:
        raise ValueError(f"guidance scale {scale} != 1 needs an uncond_fn (the empty-caption model)")
    v_uncond = uncond_fn(x, t)
    return v_uncond + scale * (v_cond - v_uncond)


def noise_from_seeds(
    sample_shape: Sequence[int],
    seeds: Sequence[int],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Initial noise [len(seeds), *sample_shape], sample i drawn from its own CPU generator seeded seeds[i].

    A prompt's video then depends on its seed only, not on which other prompts share its batch.
    """
    draws = [
        torch.randn(tuple(sample_shape), generator=torch.Generator().manual_seed(int(s)), dtype=torch.float32)
        for s in seeds
    ]
    return torch.stack(draws).to(device=device, dtype=dtype)


def _randn_like(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Noise like x from one CPU generator (whole batch) or one generator per sample."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
    if len(generator) != x.shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
    parts = [torch.randn(x.shape[1:], generator=g, dtype=x.dtype, device="cpu") for g in generator]
    return torch.stack(parts).to(x.device)


class _Steps:
    """The (alpha, sigma) pairs along a trailing schedule, as Python floats from the float64 schedule.

    Index n (one past the last timestep) is the clean sample: alpha = 1, sigma = 0.
    """

    def __init__(self, schedule: NoiseSchedule, num_inference_steps: int):
        self.timesteps = trailing_timesteps(num_inference_steps, schedule.num_train_timesteps)
        abar = [schedule.alphas_cumprod[t].item() for t in self.timesteps] + [1.0]
        self.alpha = [math.sqrt(a) for a in abar]
        self.sigma = [math.sqrt(1.0 - a) for a in abar]

    def log_snr(self, i: int) -> float:
        """lambda = log(alpha / sigma); -inf at pure noise, +inf at the clean end."""
        if self.alpha[i] == 0.0:
            return -math.inf
        if self.sigma[i] == 0.0:
            return math.inf
        return math.log(self.alpha[i]) - math.log(self.sigma[i])


def _run(
    step_fn: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor],
    steps: _Steps,
    model_fn: ModelFn,
    x: torch.Tensor,
    uncond_fn: ModelFn | None,
    guidance_scale: float,
    dynamic_guidance: bool,
    callback: Callable[[int, int, torch.Tensor], None] | None,
) -> torch.Tensor:
    """The loop both samplers share: guided v at each listed timestep, then the solver's update."""
    n = len(steps.timesteps)
    for i, t in enumerate(steps.timesteps):
        t_batch = torch.full((x.shape[0],), t, dtype=torch.int64, device=x.device)
        scale = guidance_scale_at(i, n, guidance_scale, dynamic_guidance)
        v = guided_velocity(model_fn, uncond_fn, x, t_batch, scale)
        x0 = steps.alpha[i] * x - steps.sigma[i] * v
        x = step_fn(i, x, x0.to(x.dtype))
        if callback is not None:
            callback(i, t, x)
    return x


def ddim_sample(
    model_fn: ModelFn,
    x_T: torch.Tensor,
    schedule: NoiseSchedule,
    num_inference_steps: int = 50,
    *,
    uncond_fn: ModelFn | None = None,
    guidance_scale: float = 1.0,
    dynamic_guidance: bool = False,
    callback: Callable[[int, int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from noise x_T to a clean sample.

    Each step keeps the implied noise eps = (x - alpha_t x0) / sigma_t and re-noises the predicted x0 to the next
    level: x' = alpha' x0 + sigma' eps, written as (sigma'/sigma) x + (alpha' - alpha sigma'/sigma) x0.
    """
    steps = _Steps(schedule, num_inference_steps)

    def step(i: int, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        ratio = steps.sigma[i + 1] / steps.sigma[i]
        return ratio * x + (steps.alpha[i + 1] - steps.alpha[i] * ratio) * x0

    return _run(step, steps, model_fn, x_T, uncond_fn, guidance_scale, dynamic_guidance, callback)


def dpmpp_2m_sample(
    model_fn: ModelFn,
    x_T: torch.Tensor,
    schedule: NoiseSchedule,
    num_inference_steps: int = 50,
    *,
    stochastic: bool = True,
    generator: Generators = None,
    uncond_fn: ModelFn | None = None,
    guidance_scale: float = 1.0,
    dynamic_guidance: bool = False,
    callback: Callable[[int, int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) in data (x0) prediction, multistep second order (Lu et al. 2022).

    With h = lambda' - lambda (log-SNR step) and D the second-order x0 estimate
    D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev, r = h_prev / h:
      stochastic=True (CogVideoX's default "VPSDEDPMPP2M", what diffusers' CogVideoXDPMScheduler does):
        x' = (sigma'/sigma) e^{-h} x + alpha' (1 - e^{-2h}) D + sigma' sqrt(1 - e^{-2h}) z,  z ~ N(0, I)
      stochastic=False (the ODE solver): x' = (sigma'/sigma) x + alpha' (1 - e^{-h}) D
    The first step (from pure noise, lambda = -inf), the step after it (h_prev infinite) and the last step (to
    the clean sample, lambda' = +inf) are first order (D = x0), where r is undefined. The stochastic variant draws
    one noise tensor per step from ``generator`` (CPU; a list gives one generator per sample), except the last.
    """
    steps = _Steps(schedule, num_inference_steps)
    previous_x0: list[torch.Tensor] = []

    def step(i: int, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        lam, lam_next = steps.log_snr(i), steps.log_snr(i + 1)
        h = lam_next - lam
        d = x0
        if previous_x0 and math.isfinite(h):
            h_prev = lam - steps.log_snr(i - 1)
            if math.isfinite(h_prev):
                half_inv_r = h / (2.0 * h_prev)
                d = (1.0 + half_inv_r) * x0 - half_inv_r * previous_x0[0]
        previous_x0[:] = [x0]
        ratio = steps.sigma[i + 1] / steps.sigma[i]
        decay = math.exp(-h)  # 0 when either end is infinite
        if not stochastic:
            return ratio * x + steps.alpha[i + 1] * (-math.expm1(-h)) * d
        out = ratio * decay * x + steps.alpha[i + 1] * (-math.expm1(-2.0 * h)) * d
        if steps.sigma[i + 1] > 0.0:
            out = out + steps.sigma[i + 1] * math.sqrt(-math.expm1(-2.0 * h)) * _randn_like(x, generator)
        return out

    return _run(step, steps, model_fn, x_T, uncond_fn, guidance_scale, dynamic_guidance, callback)


def sample(
    model_fn: ModelFn,
    x_T: torch.Tensor,
    schedule: NoiseSchedule,
    num_inference_steps: int = 50,
    *,
    method: str = "ddim",
    **kwargs,
) -> torch.Tensor:
    """Dispatch by name: method "ddim" or "dpm++" (stochastic, CogVideoX's) or "dpm++ode"."""
    if method == "ddim":
        return ddim_sample(model_fn, x_T, schedule, num_inference_steps, **kwargs)
    if method in ("dpm++", "dpm++ode"):
        return dpmpp_2m_sample(model_fn, x_T, schedule, num_inference_steps, stochastic=method == "dpm++", **kwargs)
    raise ValueError(f"sampler method must be 'ddim', 'dpm++' or 'dpm++ode', got {method!r}")
