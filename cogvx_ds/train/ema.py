"""Exponential moving average of the trained weights, kept in fp32 next to each rank's own shard.

Under ZeRO-3 a rank holds only its partition of every parameter (`p.ds_tensor`), so the EMA is of those
partitions and costs 4 bytes per locally held parameter; without partitioning it is of the full tensors. To
export, the EMA is swapped into the model and the usual gathering `save_diffusers` runs.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _local(p: torch.nn.Parameter) -> torch.Tensor:
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.named = list(model.named_parameters())
        self.shadow = {n: _local(p).detach().float().clone() for n, p in self.named}

    @torch.no_grad()
    def reset(self) -> None:
        """Start again from the model's current weights (a resumed run that turns the EMA on)."""
        for n, p in self.named:
            self.shadow[n].copy_(_local(p))

    @torch.no_grad()
    def update(self) -> None:
        for n, p in self.named:
            self.shadow[n].lerp_(_local(p).float(), 1.0 - self.decay)

    @contextmanager
    @torch.no_grad()
    def swapped_in(self):
        """Temporarily load the EMA weights into the model (e.g. to export them)."""
        backup = {n: _local(p).clone() for n, p in self.named}
        for n, p in self.named:
            _local(p).copy_(self.shadow[n])
        try:
            yield
        finally:
            for n, p in self.named:
                _local(p).copy_(backup[n])

    def save(self, path: Path) -> None:
        save_file({n: t.contiguous() for n, t in self.shadow.items()}, str(path))

    def load(self, path: Path) -> None:
        loaded = load_file(str(path))
        if loaded.keys() != self.shadow.keys():
            raise ValueError(f"{path}: EMA parameters do not match the model")
        for n, t in loaded.items():  # onto the device the shadow lives on (the parameters' GPU), not the host
            if t.shape != self.shadow[n].shape:
                raise ValueError(f"{path}: EMA tensor {n} has shape {tuple(t.shape)}, the model's shard "
                                 f"{tuple(self.shadow[n].shape)} (another parallel layout?)")
            self.shadow[n] = t.to(device=self.shadow[n].device, dtype=torch.float32)
