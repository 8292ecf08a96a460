"""CogVideoX 3D causal VAE: 8x8 spatial, 4x temporal compression (4k+1 frames -> k+1 latent frames).

Weight- and config-compatible with diffusers' `AutoencoderKLCogVideoX` (`from_diffusers` / `save_diffusers`),
without importing diffusers. Memory savers, all exact for convolutions thanks to the causal frame cache:
- temporal chunking (`sample_frames_per_chunk`, `latent_frames_per_chunk`): peak memory follows the chunk;
- spatial tiling with linearly blended overlaps (`enable_tiling`), for frames larger than a tile;
- per-sample slicing of the batch (`enable_slicing`).
GroupNorm statistics are per chunk by default, as in diffusers; `norm_stats="clip"` gives whole-clip statistics
in bounded memory at extra compute (see norm.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .encoder_decoder import Decoder3D, Encoder3D
from .layers import CausalConv3d
from .norm import GroupNorm, StatsCollected

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
DIFFUSERS_CLASS_NAME = "AutoencoderKLCogVideoX"


@dataclass
class CogVideoXVAEConfig:
    """Field names and defaults are diffusers' (the released CogVideoX VAE), so config.json round-trips."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] | None = None  # None: one CogVideoXDownBlock3D per block_out_channels
    up_block_types: tuple[str, ...] | None = None
    block_out_channels: tuple[int, ...] = (128, 256, 256, 512)
    latent_channels: int = 16
    layers_per_block: int = 3
    act_fn: str = "silu"
    norm_eps: float = 1e-6
    norm_num_groups: int = 32
    temporal_compression_ratio: float = 4
    sample_height: int = 480
    sample_width: int = 720
    scaling_factor: float = 1.15258426
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    invert_scale_latents: bool = False
    extra: dict = field(default_factory=dict, repr=False)  # unknown config.json keys, written back unchanged

    def __post_init__(self):
        n = len(self.block_out_channels)
        self.block_out_channels = tuple(self.block_out_channels)
        self.down_block_types = tuple(self.down_block_types or ("CogVideoXDownBlock3D",) * n)
        self.up_block_types = tuple(self.up_block_types or ("CogVideoXUpBlock3D",) * n)
        self.validate()

    def validate(self, source: str = "CogVideoXVAEConfig") -> None:
        def fail(msg: str):
            raise ValueError(f"{source}: {msg}")

        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            fail(f"down_block_types/up_block_types must have {n} entries (one per block_out_channels)")
        if set(self.down_block_types) != {"CogVideoXDownBlock3D"} or set(self.up_block_types) != {"CogVideoXUpBlock3D"}:
            fail("only CogVideoXDownBlock3D / CogVideoXUpBlock3D blocks are supported")
        if self.act_fn != "silu":
            fail(f"act_fn must be 'silu', got {self.act_fn!r}")
        if self.use_quant_conv or self.use_post_quant_conv:
            fail("use_quant_conv / use_post_quant_conv are not supported (CogVideoX does not use them)")
        for ch in self.block_out_channels:
            if ch % self.norm_num_groups:
                fail(f"block_out_channels entry {ch} is not divisible by norm_num_groups={self.norm_num_groups}")
        levels = math.log2(self.temporal_compression_ratio)
        if levels != int(levels) or int(levels) > n - 1:
            fail(f"temporal_compression_ratio must be a power of 2 <= 2**{n - 1}, got {self.temporal_compression_ratio}")

    @property
    def spatial_ratio(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def temporal_ratio(self) -> int:
        return int(self.temporal_compression_ratio)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> CogVideoXVAEConfig:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names and not k.startswith("_")}
        try:
            return cls(**known, extra=extra)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: invalid VAE config: {e}".replace(" CogVideoXVAEConfig:", "")) from e

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d.update(self.extra)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)) per latent element; logvar clamped to [-30, 20] like the reference."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        self.mean, self.logvar = mean, logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    @classmethod
    def from_moments(cls, h: torch.Tensor) -> DiagonalGaussian:
        return cls(*h.chunk(2, dim=1))

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype, device=self.mean.device)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL to N(0, 1), summed over all but the batch dimension."""
        kl = 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar)
        return kl.flatten(1).sum(1)


def chunk_bounds(num_frames: int, chunk: int | None) -> list[tuple[int, int]]:
    """Frame ranges of a chunked pass; the remainder joins the first chunk (so it keeps the odd first frame)."""
    if not chunk or num_frames <= chunk:
        return [(0, num_frames)]
    rem = num_frames % chunk
    ends = [chunk * (i + 1) + rem for i in range(num_frames // chunk)]
    return list(zip([0] + ends[:-1], ends))


def _blend(prev: torch.Tensor, cur: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """Cross-fade the first `extent` rows of cur with the last `extent` rows of prev along dim."""
    extent = min(prev.shape[dim], cur.shape[dim], extent)
    if extent <= 0:
        return cur
    w = torch.arange(extent, dtype=cur.dtype, device=cur.device) / extent
    w = w.view([-1 if d == dim else 1 for d in range(cur.dim())])
    head = prev.narrow(dim, prev.shape[dim] - extent, extent) * (1 - w) + cur.narrow(dim, 0, extent) * w
    return torch.cat([head, cur.narrow(dim, extent, cur.shape[dim] - extent)], dim=dim)


class CogVideoXVAE(nn.Module):
    def __init__(self, config: CogVideoXVAEConfig | None = None, **overrides):
        super().__init__()
        config = config or CogVideoXVAEConfig(**overrides)
        self.config = config
        common = dict(
            block_out_channels=config.block_out_channels, layers_per_block=config.layers_per_block,
            norm_num_groups=config.norm_num_groups, norm_eps=config.norm_eps,
            temporal_compression_ratio=config.temporal_ratio,
        )
        self.encoder = Encoder3D(config.in_channels, config.latent_channels, **common)
        self.decoder = Decoder3D(config.latent_channels, config.out_channels, **common)
        # Run-time options (not part of the weights). Defaults are diffusers' chunk sizes: the released weights
        # were validated that way, and matching them is what the parity tests check.
        self.sample_frames_per_chunk: int | None = 8
        self.latent_frames_per_chunk: int | None = 2
        self.norm_stats = "chunk"
        self.use_slicing = False
        self.use_tiling = False
        self.tile_sample_min_height = config.sample_height // 2
        self.tile_sample_min_width = config.sample_width // 2
        self.tile_overlap_factor_height = 1 / 6
        self.tile_overlap_factor_width = 1 / 5

    # ----------------------------------------------------------------------------------------------- options
    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    def enable_slicing(self, enabled: bool = True) -> None:
        self.use_slicing = enabled

    def enable_tiling(self, tile_sample_min_height: int | None = None, tile_sample_min_width: int | None = None,
                      tile_overlap_factor_height: float | None = None,
                      tile_overlap_factor_width: float | None = None) -> None:
        self.use_tiling = True
        self.tile_sample_min_height = tile_sample_min_height or self.tile_sample_min_height
        self.tile_sample_min_width = tile_sample_min_width or self.tile_sample_min_width
        self.tile_overlap_factor_height = tile_overlap_factor_height or self.tile_overlap_factor_height
        self.tile_overlap_factor_width = tile_overlap_factor_width or self.tile_overlap_factor_width

    def set_chunking(self, sample_frames: int | None = 8, latent_frames: int | None = 2,
                     norm_stats: str = "chunk") -> None:
        """Frames per chunk for encode (multiple of the temporal ratio) and decode; None = whole clip."""
        r = self.config.temporal_ratio
        if sample_frames and sample_frames % r:
            raise ValueError(f"sample_frames per chunk must be a multiple of temporal_compression_ratio={r}, "
                             f"got {sample_frames}")
        if latent_frames and latent_frames % 2:
            # A single-frame chunk would be upsampled as a "first frame" (1 -> 1 instead of 1 -> 4 frames).
            raise ValueError(f"latent_frames per chunk must be even, got {latent_frames}")
        if norm_stats not in ("chunk", "clip"):
            raise ValueError(f"norm_stats must be 'chunk' or 'clip', got {norm_stats!r}")
        self.sample_frames_per_chunk, self.latent_frames_per_chunk, self.norm_stats = (
            sample_frames, latent_frames, norm_stats)

    # ----------------------------------------------------------------------------------------------- encode
    def encode(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """video [B, 3, 4k+1, H, W] in [-1, 1] -> (mean, logvar), each [B, latent_channels, k+1, H/8, W/8]."""
        self._check_video(video)
        video = video.to(self.device, self.dtype)  # inputs may come from the CPU (a shard, a decoder)
        parts = video.split(1) if self.use_slicing else (video,)
        h = torch.cat([self._encode_one(x) for x in parts])
        posterior = DiagonalGaussian.from_moments(h)
        return posterior.mean, posterior.logvar

    def _encode_one(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if self.use_tiling and (h > self.tile_sample_min_height or w > self.tile_sample_min_width):
            return self._tiled(x, self.encoder, self.sample_frames_per_chunk, encode=True)
        return self._chunked(self.encoder, x, self.sample_frames_per_chunk)

    # ----------------------------------------------------------------------------------------------- decode
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents [B, C, k+1, h, w] -> video [B, 3, 4k+1, 8h, 8w].

        As in the reference, the first latent frame stands for one pixel frame only when the latent count is odd
        (the released model: 13 latents -> 49 frames); an even count T decodes to 4T frames.
        """
        if z.dim() != 5 or z.shape[1] != self.config.latent_channels:
            raise ValueError(f"decode expects z [B, {self.config.latent_channels}, T, H, W], got {tuple(z.shape)}")
        z = z.to(self.device, self.dtype)  # latents read from a shard are on the CPU
        parts = z.split(1) if self.use_slicing else (z,)
        return torch.cat([self._decode_one(x) for x in parts])

    def _decode_one(self, z: torch.Tensor) -> torch.Tensor:
        r = self.config.spatial_ratio
        tile = (self.tile_sample_min_height // r, self.tile_sample_min_width // r)
        if self.use_tiling and (z.shape[-2] > tile[0] or z.shape[-1] > tile[1]):
            return self._tiled(z, self.decoder, self.latent_frames_per_chunk, encode=False)
        return self._chunked(self.decoder, z, self.latent_frames_per_chunk)

    def forward(self, video: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruction and posterior (training entry point)."""
        posterior = DiagonalGaussian(*self.encode(video))
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    # ----------------------------------------------------------------------------------------------- chunking
    def _chunked(self, module: nn.Module, x: torch.Tensor, chunk: int | None) -> torch.Tensor:
        bounds = chunk_bounds(x.shape[2], chunk)
        try:
            if self.norm_stats == "clip" and len(bounds) > 1:
                self._collect_clip_stats(module, x, bounds)
            clear_frame_cache(module)
            return torch.cat([module(x[:, :, a:b]) for a, b in bounds], dim=2)
        finally:
            clear_frame_cache(module)
            for norm in _group_norms(module):
                norm.reset_stats()

    @torch.no_grad()
    def _collect_clip_stats(self, module: nn.Module, x: torch.Tensor, bounds: list[tuple[int, int]]) -> None:
        """Freeze whole-clip GroupNorm statistics, one norm per pass, in execution order (see norm.py)."""
        norms = _group_norms(module)
        for _ in range(len(norms)):
            for norm in norms:
                norm.collecting = norm.frozen_stats is None
            clear_frame_cache(module)
            for a, b in bounds:
                try:
                    module(x[:, :, a:b])
                except StatsCollected:
                    pass
            if not any([norm.freeze_collected() for norm in norms]):
                break

    # ----------------------------------------------------------------------------------------------- tiling
    def _tiled(self, x: torch.Tensor, module: nn.Module, chunk: int | None, encode: bool) -> torch.Tensor:
        """Run `module` (the encoder or the decoder) on overlapping spatial tiles (each chunked in time) and
        cross-fade the overlaps.

        The tiles and their steps are whole latents (tile_sample_min_* // spatial ratio; step = tile x (1 -
        overlap factor), rounded down, at least 1), so every tile's output lines up with the input and the result
        has the untiled size for any tile size and input size. diffusers' tiled_encode/tiled_decode step in pixels
        and crop in latents; where the two agree (the released 240x360 tiles, or any tile whose step is whole
        latents) this is their layout and linear blend, and results match theirs; elsewhere theirs has the wrong
        size (7 latents for 48 pixels with 16-pixel tiles) or fails.
        """
        r = self.config.spatial_ratio
        factors = (self.tile_overlap_factor_height, self.tile_overlap_factor_width)
        tiles = (self.tile_sample_min_height // r, self.tile_sample_min_width // r)  # in latents
        if min(tiles) < 1:
            raise ValueError(f"tiling: tiles of {self.tile_sample_min_height}x{self.tile_sample_min_width} pixels "
                             f"are smaller than one latent ({r}x{r} pixels)")
        steps = [max(1, int(t * (1 - f))) for t, f in zip(tiles, factors)]
        into, out = (r, 1) if encode else (1, r)  # input / output units per latent
        tile, stride = [t * into for t in tiles], [s * into for s in steps]
        limits, blends = [s * out for s in steps], [(t - s) * out for t, s in zip(tiles, steps)]
        grid = [[self._chunked(module, x[..., i:i + tile[0], j:j + tile[1]], chunk)
                 for j in range(0, x.shape[-1], stride[1])] for i in range(0, x.shape[-2], stride[0])]
        rows = []
        for i, row in enumerate(grid):
            for j, t in enumerate(row):
                if i > 0:
                    t = _blend(grid[i - 1][j], t, blends[0], dim=3)
                if j > 0:
                    t = _blend(row[j - 1], t, blends[1], dim=4)
                row[j] = t  # later neighbours blend with the blended tile, as the reference does
            rows.append(torch.cat([t[..., :limits[0], :limits[1]] for t in row], dim=4))
        result = torch.cat(rows, dim=3)
        expected = [n // r if encode else n * r for n in x.shape[-2:]]
        if list(result.shape[-2:]) != expected:  # cannot happen with whole-latent steps; never write a wrong size
            raise RuntimeError(f"tiling produced {tuple(result.shape[-2:])}, expected {tuple(expected)}")
        return result

    # ----------------------------------------------------------------------------------------------- helpers
    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _check_video(self, video: torch.Tensor) -> None:
        c, r, s = self.config.in_channels, self.config.temporal_ratio, self.config.spatial_ratio
        if video.dim() != 5 or video.shape[1] != c:
            raise ValueError(f"encode expects video [B, {c}, T, H, W], got {tuple(video.shape)}")
        t, h, w = video.shape[2:]
        if t != 1 and (t - 1) % r:
            raise ValueError(f"encode expects T = {r}k+1 frames (1, {r + 1}, {2 * r + 1}, ...), got T={t}")
        if h % s or w % s:
            raise ValueError(f"encode expects H and W divisible by {s}, got {h}x{w}")

    # ----------------------------------------------------------------------------------------------- diffusers io
    @classmethod
    def from_diffusers(cls, path: str | Path, subfolder: str | None = None,
                       dtype: torch.dtype | None = torch.float32) -> CogVideoXVAE:
        """Load a diffusers-format directory (config.json + one or sharded *.safetensors), in `dtype`: float32 by
        default, as diffusers' from_pretrained does (half-precision files would otherwise give a half-precision
        model: trained with an fp32 optimizer config, or run against the fp32 discriminator); None keeps the
        files' dtype."""
        path = Path(path) / subfolder if subfolder else Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{cfg_file}: no config.json (expected a diffusers AutoencoderKLCogVideoX dir)")
        raw = json.loads(cfg_file.read_text())
        if raw.get("_class_name", DIFFUSERS_CLASS_NAME) != DIFFUSERS_CLASS_NAME:
            raise ValueError(f"{cfg_file}: _class_name is {raw['_class_name']!r}, expected {DIFFUSERS_CLASS_NAME!r}")
        config = CogVideoXVAEConfig.from_dict(raw, source=str(cfg_file))
        with torch.device("meta"):  # no random init, no second copy of the weights
            model = cls(config)
        state = _load_safetensors_dir(path)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        if missing or unexpected:
            raise ValueError(f"{path}: weights do not match the config: missing {missing[:8]} "
                             f"({len(missing)}), unexpected {unexpected[:8]} ({len(unexpected)})")
        return model.to(dtype) if dtype is not None else model

    def save_diffusers(self, path: str | Path) -> None:
        """Write config.json + diffusion_pytorch_model.safetensors, loadable by AutoencoderKLCogVideoX."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        cfg = {"_class_name": DIFFUSERS_CLASS_NAME, "_diffusers_version": "0.30.0", **self.config.to_dict()}
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        tmp = path / (WEIGHTS_NAME + ".tmp")
        save_file(state, str(tmp), metadata={"format": "pt"})
        tmp.replace(path / WEIGHTS_NAME)
        (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def _load_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    index = path / WEIGHTS_INDEX_NAME
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / WEIGHTS_NAME).is_file():
        files = [WEIGHTS_NAME]
    else:
        raise FileNotFoundError(f"{path}: neither {WEIGHTS_NAME} nor {WEIGHTS_INDEX_NAME} found")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(path / f)))
    return state


def _group_norms(module: nn.Module) -> list[GroupNorm]:
    return [m for m in module.modules() if isinstance(m, GroupNorm)]


def clear_frame_cache(module: nn.Module) -> None:
    """Forget the carried frames of every causal conv (start of a new clip, or after a pass)."""
    for m in module.modules():
        if isinstance(m, CausalConv3d):
            m.cache = None

