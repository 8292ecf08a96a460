"""Embeddings of the expert transformer: timesteps, patches + text, 3D sin-cos positions, 3D RoPE."""

from __future__ import annotations

import math

import torch
from torch import nn

from cogvx_ds.models.dit.fused import Linear, PatchConv


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool = True, shift: float = 0,
                       max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps [B] -> [B, dim], float32."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - shift)
    args = t[:, None].float() * torch.exp(exponent)[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)], -1)
    return nn.functional.pad(emb, (0, dim % 2))


class TimestepMLP(nn.Module):
    def __init__(self, in_dim: int, time_embed_dim: int):
        super().__init__()
        self.linear_1 = Linear(in_dim, time_embed_dim)
        self.linear_2 = Linear(time_embed_dim, time_embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(nn.functional.silu(self.linear_1(x)))


class PatchEmbed(nn.Module):
    """2x2 Conv2d patches of each latent frame (CogVideoX 1.0) and a linear projection of the text embeddings."""

    def __init__(self, patch_size: int, in_channels: int, dim: int, text_embed_dim: int):
        super().__init__()
        self.proj = PatchConv(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.text_proj = Linear(text_embed_dim, dim)

    def forward(self, latents: torch.Tensor, text: torch.Tensor, compute: torch.dtype | None = None,
                token_range: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """latents [B, F, C, H, W], text [B, L, D_text] -> video tokens [B, F*h*w, D] in (f, h, w) order (only
        those in `token_range` if given), text. `compute`: run the projections in this dtype (half-precision CPU
        fallback) and return the input's."""
        dtype, compute = latents.dtype, compute or latents.dtype
        video = self.proj(latents.to(compute), *(token_range or (None, None)))
        return video.to(dtype), self.text_proj(text.to(compute)).to(dtype)


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    angles = pos.double().reshape(-1, 1) * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_3d(dim: int, frames: int, height: int, width: int, spatial_scale: float,
              temporal_scale: float) -> torch.Tensor:
    """Fixed 3D sin-cos positions for the 2B model: [frames*height*width, dim], float64, (f, h, w) order.

    A quarter of the channels encode time, the rest space (half width, half height). Positions are divided
    by the interpolation scales in float32 first, as the released 2B model was trained with.
    """
    d_t, d_s = dim // 4, dim - dim // 4
    w = _sincos_1d(d_s // 2, torch.arange(width, dtype=torch.float32) / spatial_scale)
    h = _sincos_1d(d_s // 2, torch.arange(height, dtype=torch.float32) / spatial_scale)
    spatial = torch.cat([w[None].expand(height, -1, -1), h[:, None].expand(-1, width, -1)], -1)
    spatial = spatial.reshape(1, height * width, d_s).expand(frames, -1, -1)
    temporal = _sincos_1d(d_t, torch.arange(frames, dtype=torch.float32) / temporal_scale)
    temporal = temporal[:, None].expand(-1, height * width, -1)
    return torch.cat([temporal, spatial], -1).reshape(frames * height * width, dim)


def rope_3d(head_dim: int, frames: int, height: int, width: int, theta: float = 10000.0):
    """3D RoPE tables (cos, sin), each [frames*height*width, head_dim] float32, (f, h, w) token order.

    Head channels split 2/8 time, 3/8 height, 3/8 width over integer grid positions; frequencies are computed
    in float64 and each rotation acts on interleaved channel pairs (2i, 2i+1).
    """
    d_t, d_h = head_dim // 4, head_dim // 8 * 3
    d_w = head_dim - d_t - d_h

    def axis(dim: int, n: int) -> torch.Tensor:
        inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        return (torch.arange(n, dtype=torch.float64)[:, None] * inv[None]).repeat_interleave(2, dim=1)

    t = axis(d_t, frames)[:, None, None].expand(-1, height, width, -1)
    h = axis(d_h, height)[None, :, None].expand(frames, -1, width, -1)
    w = axis(d_w, width)[None, None].expand(frames, height, -1, -1)
    angles = torch.cat([t, h, w], -1).reshape(frames * height * width, head_dim)
    return angles.cos().float(), angles.sin().float()
