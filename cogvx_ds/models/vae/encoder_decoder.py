"""Encoder and decoder stacks of the CogVideoX 3D causal VAE (module names match diffusers' state dict)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import CausalConv3d, Downsample3D, ResnetBlock3D, SpatialNorm3D, Upsample3D
from .norm import GroupNorm


class DownBlock3D(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, num_layers: int, groups: int, eps: float, dropout: float,
                 add_downsample: bool, compress_time: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock3D(in_ch if i == 0 else out_ch, out_ch, groups, eps, dropout) for i in range(num_layers)
        )
        self.downsamplers = nn.ModuleList([Downsample3D(out_ch, out_ch, compress_time)]) if add_downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for down in self.downsamplers or ():
            x = down(x)
        return x


class MidBlock3D(nn.Module):
    def __init__(self, channels: int, groups: int, eps: float, dropout: float, spatial_norm_dim: int | None = None):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock3D(channels, channels, groups, eps, dropout, spatial_norm_dim) for _ in range(2)
        )

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, zq)
        return x


class UpBlock3D(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, num_layers: int, groups: int, eps: float, dropout: float,
                 spatial_norm_dim: int, add_upsample: bool, compress_time: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock3D(in_ch if i == 0 else out_ch, out_ch, groups, eps, dropout, spatial_norm_dim)
            for i in range(num_layers)
        )
        self.upsamplers = nn.ModuleList([Upsample3D(out_ch, out_ch, compress_time)]) if add_upsample else None

    def forward(self, x: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, zq)
        for up in self.upsamplers or ():
            x = up(x)
        return x


class Encoder3D(nn.Module):
    """Video [B, 3, T, H, W] -> posterior parameters [B, 2 * latent_channels, T', H', W'] (mean, logvar)."""

    def __init__(self, in_channels: int, latent_channels: int, block_out_channels: tuple[int, ...],
                 layers_per_block: int, norm_num_groups: int, norm_eps: float, temporal_compression_ratio: int,
                 dropout: float = 0.0):
        super().__init__()
        time_levels = int(math.log2(temporal_compression_ratio))
        self.conv_in = CausalConv3d(in_channels, block_out_channels[0])
        self.down_blocks = nn.ModuleList()
        prev = block_out_channels[0]
        for i, ch in enumerate(block_out_channels):
            last = i == len(block_out_channels) - 1
            self.down_blocks.append(DownBlock3D(prev, ch, layers_per_block, norm_num_groups, norm_eps, dropout,
                                                add_downsample=not last, compress_time=i < time_levels))
            prev = ch
        self.mid_block = MidBlock3D(prev, norm_num_groups, norm_eps, dropout)
        # The reference hard-codes eps=1e-6 for the output norms regardless of norm_eps.
        self.norm_out = GroupNorm(norm_num_groups, prev, eps=1e-6)
        self.conv_out = CausalConv3d(prev, 2 * latent_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder3D(nn.Module):
    """Latent z [B, C, T', H', W'] -> video [B, 3, T, H, W]; every norm is conditioned on z (spatial norm)."""

    def __init__(self, latent_channels: int, out_channels: int, block_out_channels: tuple[int, ...],
                 layers_per_block: int, norm_num_groups: int, norm_eps: float, temporal_compression_ratio: int,
                 dropout: float = 0.0):
        super().__init__()
        time_levels = int(math.log2(temporal_compression_ratio))
        channels = list(reversed(block_out_channels))
        self.conv_in = CausalConv3d(latent_channels, channels[0])
        self.mid_block = MidBlock3D(channels[0], norm_num_groups, norm_eps, dropout, spatial_norm_dim=latent_channels)
        self.up_blocks = nn.ModuleList()
        prev = channels[0]
        for i, ch in enumerate(channels):
            last = i == len(channels) - 1
            self.up_blocks.append(UpBlock3D(prev, ch, layers_per_block + 1, norm_num_groups, norm_eps, dropout,
                                            latent_channels, add_upsample=not last, compress_time=i < time_levels))
            prev = ch
        self.norm_out = SpatialNorm3D(prev, latent_channels, norm_num_groups)
        self.conv_out = CausalConv3d(prev, out_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z), z)
        for block in self.up_blocks:
            x = block(x, z)
        return self.conv_out(F.silu(self.norm_out(x, z)))
