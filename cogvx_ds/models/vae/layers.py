"""Building blocks of the 3D causal VAE: causal conv with a frame cache, spatial norm, resnet, down/upsampling.

Parameter names follow diffusers' `AutoencoderKLCogVideoX` so its checkpoints load with `load_state_dict`.

Frame cache: every causal conv keeps the last `kernel_t - 1` frames of its (padded) input in `self.cache`.
When a clip is processed chunk by chunk, the next chunk is prefixed with that cache instead of the
first-frame replication, so convolutions give exactly what they give on the whole clip. The owner
(`CogVideoXVAE`) clears all caches before and after each pass (see `clear_frame_cache`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .norm import GroupNorm


class CausalConv3d(nn.Module):
    """Conv3d that pads time on the past side only (first frame repeated) and zero-pads height/width."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1):
        super().__init__()
        self.time_pad = kernel_size - 1
        space_pad = (kernel_size - 1) // 2
        # Named `conv` to match diffusers' `CogVideoXCausalConv3d.conv`.
        self.conv = nn.Conv3d(
            in_channels, out_channels, kernel_size, stride=(stride, 1, 1), padding=(0, space_pad, space_pad)
        )
        self.cache: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.time_pad > 0:
            past = self.cache if self.cache is not None else x[:, :, :1].expand(-1, -1, self.time_pad, -1, -1)
            x = torch.cat([past, x], dim=2)
            # Keep the tail for the next chunk. A copy, not a view: a view would keep this whole padded input
            # alive until the next chunk. Not detached: a chunked training pass backpropagates through it.
            self.cache = x[:, :, -self.time_pad :].clone()
        return self.conv(x)


def _nearest_like(z: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of z to (T, H, W) keeping the first frame apart when T is odd and > 1.

    The first latent frame stands for exactly one pixel frame (4k+1 -> k+1), so it must not be stretched in time.
    """
    t = size[0]
    if t > 1 and t % 2 == 1:
        first = F.interpolate(z[:, :, :1], size=(1, *size[1:]))
        rest = F.interpolate(z[:, :, 1:], size=(t - 1, *size[1:]))
        return torch.cat([first, rest], dim=2)
    return F.interpolate(z, size=size)


class SpatialNorm3D(nn.Module):
    """GroupNorm of the decoder features modulated by the latent z (scale conv_y(z), shift conv_b(z))."""

    def __init__(self, f_channels: int, zq_channels: int, groups: int):
        super().__init__()
        self.norm_layer = GroupNorm(groups, f_channels, eps=1e-6)
        self.conv_y = CausalConv3d(zq_channels, f_channels, kernel_size=1)
        self.conv_b = CausalConv3d(zq_channels, f_channels, kernel_size=1)

    def forward(self, f: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        zq = _nearest_like(zq, tuple(f.shape[-3:]))
        return self.norm_layer(f) * self.conv_y(zq) + self.conv_b(zq)


class ResnetBlock3D(nn.Module):
    """Two (norm, SiLU, causal conv) stages and a residual; the norm is spatial (z-conditioned) in the decoder."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        groups: int,
        eps: float = 1e-6,
        dropout: float = 0.0,
        spatial_norm_dim: int | None = None,
    ):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        if spatial_norm_dim is None:
            self.norm1 = GroupNorm(groups, in_channels, eps=eps)
            self.norm2 = GroupNorm(groups, out_channels, eps=eps)
        else:
            self.norm1 = SpatialNorm3D(in_channels, spatial_norm_dim, groups)
            self.norm2 = SpatialNorm3D(out_channels, spatial_norm_dim, groups)
        self.conv1 = CausalConv3d(in_channels, out_channels, kernel_size=3)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(out_channels, out_channels, kernel_size=3)
        if in_channels != out_channels:
            # A 1x1x1 conv needs no temporal padding, so diffusers stores it as a plain Conv3d.
            self.conv_shortcut = nn.Conv3d(in_channels, out_channels, kernel_size=1)

    def _norm(self, norm: nn.Module, x: torch.Tensor, zq: torch.Tensor | None) -> torch.Tensor:
        return norm(x) if zq is None else norm(x, zq)

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self._norm(self.norm1, x, zq)))
        h = self.conv2(self.dropout(F.silu(self._norm(self.norm2, h, zq))))
        if self.in_channels != self.out_channels:
            x = self.conv_shortcut(x)
        return x + h


def _frames_to_batch(x: torch.Tensor) -> torch.Tensor:
    b, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, c, h, w)


def _batch_to_frames(x: torch.Tensor, b: int) -> torch.Tensor:
    bt, c, h, w = x.shape
    return x.reshape(b, bt // b, c, h, w).transpose(1, 2)


class Downsample3D(nn.Module):
    """Halve H and W with a stride-2 2D conv per frame; optionally halve time by averaging frame pairs.

    With an odd frame count the first frame is kept alone, so 4k+1 frames become 2k+1, then k+1.
    Pairs never straddle chunks of even length, which is why chunked encoding needs no cache here.
    """

    def __init__(self, in_channels: int, out_channels: int, compress_time: bool):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=0)
        self.compress_time = compress_time

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compress_time and x.shape[2] > 1:
            keep = x.shape[2] % 2  # 1 when the first frame stands alone
            rest = x[:, :, keep:]
            b, c, t, h, w = rest.shape
            pooled = rest.reshape(b, c, t // 2, 2, h, w).mean(dim=3)
            x = torch.cat([x[:, :, :keep], pooled], dim=2)
        b = x.shape[0]
        # Asymmetric zero pad (right, bottom) then a valid stride-2 conv, as the reference does.
        y = self.conv(F.pad(_frames_to_batch(x), (0, 1, 0, 1)))
        return _batch_to_frames(y, b)


class Upsample3D(nn.Module):
    """Nearest 2x in H and W (and in time when compress_time, keeping the first frame single), then a 3x3 conv."""

    def __init__(self, in_channels: int, out_channels: int, compress_time: bool):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.compress_time = compress_time

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.repeat_interleave(2, dim=3).repeat_interleave(2, dim=4)
        t = x.shape[2]
        if self.compress_time and t > 1:
            keep = t % 2
            x = torch.cat([x[:, :, :keep], x[:, :, keep:].repeat_interleave(2, dim=2)], dim=2)
        b = x.shape[0]
        return _batch_to_frames(self.conv(_frames_to_batch(x)), b)
