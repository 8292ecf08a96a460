"""The v-prediction training loss and its per-timestep-bucket aggregation for logging.

Equivalence with the original CogVideoX loss: SAT trains with an x0 ("denoised") MSE weighted by
w_t = 1 / (1 - abar_t) = 1 / sigma_t^2, where x0_pred = alpha_t * x_t - sigma_t * v_pred. Since the true x0 is
alpha_t * x_t - sigma_t * v, we get x0_pred - x0 = -sigma_t * (v_pred - v), hence
w_t * |x0_pred - x0|^2 = |v_pred - v|^2: the plain v-MSE below is the same objective, without dividing by a
sigma that is tiny at t = 0 (tests/test_diffusion_loss.py checks this numerically).
"""

from __future__ import annotations

import torch


def v_mse_loss(v_pred: torch.Tensor, v_target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error per sample, float32 [B], averaged over all non-batch elements.

    ``mask`` (optional, broadcastable to v_pred, 1 = counts) restricts the mean to the selected elements of each
    sample, e.g. the valid tokens of padded sequences. A sample with no selected element has loss 0.
    """
    if v_pred.shape != v_target.shape:
        raise ValueError(f"v_pred shape {tuple(v_pred.shape)} != v_target shape {tuple(v_target.shape)}")
    # Squares are accumulated in float32 even for bf16 inputs: a bf16 sum over thousands of tokens loses digits.
    err = (v_pred.float() - v_target.float()).square()
    if mask is None:
        return err.flatten(1).mean(dim=1)
    weight = torch.broadcast_to(mask.to(err.dtype), err.shape)
    total = (err * weight).flatten(1).sum(dim=1)
    count = weight.flatten(1).sum(dim=1)
    return total / count.clamp_min(1.0)


def bucket_loss_sums(
    per_sample_loss: torch.Tensor, timesteps: torch.Tensor, num_train_timesteps: int = 1000, num_buckets: int = 10
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums, counts), float64 [num_buckets] each: per-sample losses summed by equal-width timestep bucket.

    Sums and counts rather than means, so that ranks can all-reduce them before dividing.
    """
    if num_buckets < 1 or num_buckets > num_train_timesteps:
        raise ValueError(f"num_buckets must be in [1, {num_train_timesteps}], got {num_buckets}")
    loss = per_sample_loss.detach().reshape(-1).to(torch.float64)
    t = timesteps.detach().reshape(-1).to(device=loss.device, dtype=torch.int64)
    if t.numel() != loss.numel():
        raise ValueError(f"{t.numel()} timesteps for {loss.numel()} per-sample losses")
    bucket = (t * num_buckets // num_train_timesteps).clamp(0, num_buckets - 1)
    sums = torch.zeros(num_buckets, dtype=torch.float64, device=loss.device).index_add_(0, bucket, loss)
    counts = torch.zeros(num_buckets, dtype=torch.float64, device=loss.device).index_add_(
        0, bucket, torch.ones_like(loss)
    )
    return sums, counts


def bucket_names(num_train_timesteps: int = 1000, num_buckets: int = 10) -> list[str]:
    """Metric names "loss_t<lo>_<hi>" (inclusive bounds) matching bucket_loss_sums' buckets."""
    names = []
    width = len(str(num_train_timesteps - 1))
    for b in range(num_buckets):
        lo = -(-b * num_train_timesteps // num_buckets)  # ceil: first t with t * nb // T == b
        hi = -(-(b + 1) * num_train_timesteps // num_buckets) - 1
        names.append(f"loss_t{lo:0{width}d}_{hi:0{width}d}")
    return names


def bucket_losses(sums: torch.Tensor, counts: torch.Tensor, num_train_timesteps: int = 1000) -> dict[str, float]:
    """Mean loss per bucket as {name: value}, skipping buckets that saw no sample."""
    names = bucket_names(num_train_timesteps, sums.numel())
    return {name: (s / c).item() for name, s, c in zip(names, sums, counts) if c > 0}
