"""3D spatio-temporal PatchGAN discriminator: one real/fake logit per (frames x pixels) patch."""

from __future__ import annotations

import torch
import torch.nn as nn


class PatchDiscriminator3D(nn.Module):
    """Strided Conv3d stack (LeakyReLU, GroupNorm), ending in a 1-channel logit map.

    Every layer halves H and W; the first `time_downsample` layers after the input layer also halve time
    (kernel 3 / stride 2 / pad 1 keeps 4k+1 frames at 2k+1), so patches span several frames and motion is judged.
    GroupNorm rather than BatchNorm: no running buffers, identical in train and eval, batch-size independent.
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3, time_downsample: int = 2):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv3d(in_channels, base_channels, (3, 4, 4), stride=(1, 2, 2), padding=1),
            nn.LeakyReLU(0.2),
        ]
        ch = base_channels
        for i in range(1, num_layers):
            out = base_channels * min(2**i, 8)
            t_stride = 2 if i <= time_downsample else 1
            layers += [
                nn.Conv3d(ch, out, (3, 4, 4), stride=(t_stride, 2, 2), padding=1, bias=False),
                nn.GroupNorm(min(32, out // 4), out),
                nn.LeakyReLU(0.2),
            ]
            ch = out
        layers.append(nn.Conv3d(ch, 1, 3, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        self.apply(_init)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.net(video)


def _init(m: nn.Module) -> None:
    # DCGAN-style init, as PatchGAN discriminators usually use.
    if isinstance(m, nn.Conv3d):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.GroupNorm):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)
