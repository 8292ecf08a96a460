"""LPIPS perceptual distance (VGG16 variant), implemented here so nothing needs torchvision or a download.

Weights come from a local path, in the layouts the `lpips` package uses:
- a directory with the package's linear heads `vgg.pth` (keys `lin{0..4}.model.1.weight`) and a torchvision VGG16
  checkpoint (`vgg16-397923af.pth` or any `vgg16*.pth`, keys `features.{i}.weight/bias`), or
- one file holding a full `lpips.LPIPS` state dict (keys `net.slice{k}.{i}.weight`, `lin{j}.model.1.weight`).
Everything is loaded with `torch.load(weights_only=True)`; the network is frozen.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# VGG16 "D" feature stack; "M" = 2x2 max-pool. Index positions match torchvision's `features` Sequential.
VGG16_LAYOUT = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
TAP_CHANNELS = (64, 128, 256, 512, 512)


def vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    in_ch = 3
    for v in VGG16_LAYOUT:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(in_ch, v, 3, padding=1), nn.ReLU(inplace=False)]
            in_ch = v
    return nn.Sequential(*layers)


class LinearHead(nn.Module):
    """1x1 conv to one channel; `model.1` naming matches the lpips package's NetLinLayer."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class LPIPS(nn.Module):
    def __init__(self):
        super().__init__()
        # Input scaling the lpips package applies to [-1, 1] images before VGG.
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.features = vgg16_features()
        for i, ch in enumerate(TAP_CHANNELS):
            self.add_module(f"lin{i}", LinearHead(ch))
        self.eval().requires_grad_(False)

    def train(self, mode: bool = True):  # frozen: dropout in the heads stays off
        return super().train(False)

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, layer in enumerate(self.features[: TAPS[-1] + 1]):
            x = layer(x)
            if i in TAPS:
                out.append(x)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Images [N, 3, H, W] in [-1, 1] -> distance per image [N]."""
        fx = self._taps((x - self.shift) / self.scale)
        fy = self._taps((y - self.shift) / self.scale)
        total = 0.0
        for i, (a, b) in enumerate(zip(fx, fy)):
            a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + getattr(self, f"lin{i}")((a - b).pow(2)).mean(dim=(1, 2, 3))
        return total

    @classmethod
    def from_path(cls, path: str | Path) -> LPIPS:
        path = Path(path)
        if path.is_dir():
            state = _load(path / "vgg.pth", "lpips linear heads")
            backbones = sorted(path.glob("vgg16*.pth"))
            if not backbones:
                raise FileNotFoundError(f"{path}: no torchvision VGG16 checkpoint (vgg16*.pth) next to vgg.pth")
            state.update(_load(backbones[0], "VGG16 backbone"))
        else:
            state = _load(path, "LPIPS state dict")
        model = cls()
        wanted = model.state_dict().keys()
        state = {_rename(k): v for k, v in state.items()}
        missing = [k for k in wanted if k not in state]
        if missing:
            raise ValueError(f"{path}: LPIPS weights incomplete, missing {missing[:6]} ({len(missing)} keys); "
                             "expected lpips vgg.pth heads + torchvision vgg16 features")
        model.load_state_dict({k: state[k] for k in wanted})
        return model


def _load(file: Path, what: str) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise FileNotFoundError(f"{file}: {what} not found")
    return dict(torch.load(file, map_location="cpu", weights_only=True))


def _rename(key: str) -> str:
    """`net.slice2.5.weight` (lpips.LPIPS) -> `features.5.weight`; slices keep torchvision's indices."""
    return re.sub(r"^net\.slice\d\.", "features.", key)


def lpips_on_frames(lpips: LPIPS, x: torch.Tensor, y: torch.Tensor, frames: int | None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean LPIPS over `frames` random frames per video [B, 3, T, H, W] (all frames if None); VGG is costly."""
    b, c, t = x.shape[:3]
    idx = torch.arange(t) if not frames or frames >= t else torch.randperm(t, generator=generator)[:frames]
    pick = lambda v: v[:, :, idx].transpose(1, 2).reshape(-1, c, *v.shape[-2:])  # noqa: E731
    # VGG needs some spatial extent for its 4 max-pools; upsample tiny frames.
    xs, ys = pick(x), pick(y)
    if xs.shape[-1] < 32 or xs.shape[-2] < 32:
        xs, ys = (F.interpolate(v, size=(max(32, v.shape[-2]), max(32, v.shape[-1])), mode="bilinear") for v in (xs, ys))
    return lpips(xs, ys).mean()
