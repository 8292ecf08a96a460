"""GroupNorm whose statistics can span the whole clip while the clip is processed chunk by chunk.

Why: GroupNorm normalises over (channels/group, T, H, W). Chunked encoding (what diffusers does, 8 pixel frames
or 2 latent frames at a time) therefore normalises each chunk with its own statistics, which is not what a
whole-clip pass computes. Both behaviours are supported:

- `norm_stats="chunk"` (default, diffusers-compatible): plain GroupNorm on each chunk. Memory grows with the
  chunk only. Chunked output differs from whole-clip output by the statistics (see tests/test_vae_model.py).
- `norm_stats="clip"`: whole-clip statistics in bounded memory. Each norm layer's per-(sample, group) mean and
  variance are accumulated over all chunks, in execution order: pass k runs the chunks up to the first norm whose
  statistics are not known yet, accumulates them and stops there (`StatsCollected`), so pass k costs only the
  layers before that norm. After every norm is frozen a last pass produces the output. Cost ~ (#norms / 2 + 1)
  full passes; result equals the unchunked pass up to float rounding. Meant for inference: the statistics
  are collected without gradients, so a training pass in this mode treats them as constants.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class StatsCollected(Exception):
    """Raised by a collecting GroupNorm to stop a statistics pass early (nothing after it is needed)."""


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters, same state-dict names) plus optional frozen / collected statistics."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-6, affine: bool = True):
        super().__init__(num_groups, num_channels, eps=eps, affine=affine)
        self.frozen_stats: tuple[torch.Tensor, torch.Tensor] | None = None  # (mean, var) per [B, G], float64
        self.collecting = False
        self._sums: list[torch.Tensor] | None = None  # [sum, sum of squares, count]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.frozen_stats is not None:
            return self._apply_stats(x, *self.frozen_stats)
        if self.collecting:
            self._accumulate(x)
            raise StatsCollected
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)

    def _accumulate(self, x: torch.Tensor) -> None:
        g = x.detach().reshape(x.shape[0], self.num_groups, -1).double()
        sums = [g.sum(-1), (g * g).sum(-1), torch.tensor(float(g.shape[-1]), dtype=torch.float64)]
        self._sums = sums if self._sums is None else [a + b for a, b in zip(self._sums, sums)]

    def freeze_collected(self) -> bool:
        """Turn accumulated sums into frozen (mean, var); False if this norm saw nothing in the last pass."""
        self.collecting = False
        if self._sums is None:
            return False
        total, total_sq, count = self._sums
        mean = total / count
        self.frozen_stats = (mean, (total_sq / count - mean * mean).clamp_min(0.0))
        self._sums = None
        return True

    def reset_stats(self) -> None:
        self.frozen_stats, self.collecting, self._sums = None, False, None

    def _apply_stats(self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        g = x.reshape(shape[0], self.num_groups, -1)
        rstd = torch.rsqrt(var + self.eps).to(x.dtype)
        y = ((g - mean.to(x.dtype)[..., None]) * rstd[..., None]).reshape(shape)
        if self.affine:
            view = (1, -1) + (1,) * (x.dim() - 2)
            y = y * self.weight.view(view) + self.bias.view(view)
        return y
