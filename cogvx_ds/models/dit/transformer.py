"""CogVideoX expert transformer (DiT) built from Megatron-core tensor-parallel layers, with Ulysses SP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from cogvx_ds.config import ModelConfig, validate_model
from cogvx_ds.models.dit.embeddings import PatchEmbed, TimestepMLP, rope_3d, sincos_3d, timestep_embedding
from cogvx_ds.models.dit.fused import Linear, compute_dtype, rope_tables
from cogvx_ds.models.dit.layers import ExpertBlock, ModulatedLayerNorm, megatron_config
from cogvx_ds.parallel import state
from cogvx_ds.parallel.comm import copy_to_group, gather_along_dim


class FinalAdaLN(nn.Module):
    """LayerNorm * (1 + scale) + shift with one (scale, shift) for all tokens."""

    def __init__(self, time_embed_dim: int, dim: int, eps: float, affine: bool):
        super().__init__()
        self.linear = Linear(time_embed_dim, 2 * dim)
        self.norm = ModulatedLayerNorm(dim, eps=eps, elementwise_affine=affine)

    def forward(self, x, n_text, temb):
        shift, scale = self.linear(F.silu(temb)).chunk(2, dim=-1)
        return self.norm(x, n_text, scale, shift, scale, shift)


def sp_chunk(n: int, sp: int, rank: int) -> tuple[int, int]:
    """The [start, end) of n tokens that SP rank `rank` of `sp` holds: contiguous and as even as possible, the first
    n % sp ranks take one more. Text and video tokens are split this way separately."""
    start = rank * (n // sp) + min(rank, n % sp)
    return start, start + n // sp + (rank < n % sp)


def _span(r: tuple[int, int]) -> int:
    return r[1] - r[0]


class CogVideoXTransformer(nn.Module):
    """`forward(latents [B,F,C,H,W], text [B,L,D_text], timestep [B]) -> v prediction [B,F,C,H,W]`.

    Parallelism comes from `cogvx_ds.parallel.state` at construction: TP shards the attention heads and the MLP
    (Megatron Column/RowParallelLinear), SP shards the video and the text tokens (Ulysses all-to-alls in
    `cogvx_ds.parallel.ulysses`). Without torch.distributed it is a plain single-process model. Weights are filled by `init_weights()` or the loaders; build with `from_config`.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        validate_model(cfg, state.tp_size(), state.sp_size())
        self.config = cfg
        dim = cfg.inner_dim
        mp = megatron_config(state.tp_size())
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_channels, dim, cfg.text_embed_dim)
        self.time_embedding = TimestepMLP(dim, cfg.time_embed_dim)
        self.blocks = nn.ModuleList([ExpertBlock(cfg, mp) for _ in range(cfg.num_layers)])
        self.norm_final = nn.LayerNorm(dim, eps=cfg.norm_eps, elementwise_affine=cfg.norm_elementwise_affine)
        self.norm_out = FinalAdaLN(cfg.time_embed_dim, dim, cfg.norm_eps, cfg.norm_elementwise_affine)
        self.proj_out = Linear(dim, cfg.patch_size**2 * cfg.out_channels)
        for module in self.modules():  # the linear layers' CPU matmul kernel (cogvx_ds.models.dit.linear)
            if hasattr(module, "cpu_kernel"):
                module.cpu_kernel = cfg.cpu_linear
        if cfg.compile_blocks:
            for block in self.blocks:
                block.compile()  # in place: parameter names (checkpoints, ZeRO) stay those of the eager module
        self._pos_cache: dict = {}

    # ---- construction / weights (implemented in cogvx_ds.checkpoint) ----
    @classmethod
    def from_config(cls, cfg: ModelConfig, init: bool = True) -> CogVideoXTransformer:
        model = cls(cfg)
        if init:
            model.init_weights()
        return model

    def init_weights(self, seed: int | None = None) -> None:
        from cogvx_ds.checkpoint.layout import init_weights
        init_weights(self, self.config.seed if seed is None else seed)

    @classmethod
    def from_diffusers(cls, path, dtype: torch.dtype | None = None, **config_overrides) -> CogVideoXTransformer:
        from cogvx_ds.checkpoint.diffusers_io import load_transformer
        return load_transformer(cls, path, dtype=dtype, **config_overrides)

    def save_diffusers(self, path, max_shard_size: int = 5 * 1024**3, dtype: torch.dtype | None = None) -> None:
        from cogvx_ds.checkpoint.diffusers_io import save_transformer
        save_transformer(self, path, max_shard_size=max_shard_size, dtype=dtype)

    @classmethod
    def from_sat(cls, path, config: ModelConfig | None = None, allow_unsafe_pickle: bool = False,
                 dtype: torch.dtype | None = None) -> CogVideoXTransformer:
        from cogvx_ds.checkpoint.sat import load_sat_transformer
        return load_sat_transformer(cls, path, config=config, allow_unsafe_pickle=allow_unsafe_pickle, dtype=dtype)

    # ---- positions ----
    def _positions(self, frames: int, h: int, w: int, device):
        key = (frames, h, w, str(device))
        if key not in self._pos_cache:
            cfg = self.config
            if cfg.use_rotary_positional_embeddings:
                cos, sin = rope_3d(cfg.attention_head_dim, frames, h, w, cfg.rope_theta)
                self._pos_cache[key] = ("rope", cos.to(device), sin.to(device))
            else:
                pos = sincos_3d(cfg.inner_dim, frames, h, w, cfg.spatial_interpolation_scale,
                                cfg.temporal_interpolation_scale)
                self._pos_cache[key] = ("sincos", pos.to(device))
        return self._pos_cache[key]

    def _stream_rope(self, frames: int, h: int, w: int, n_text: int, start: int, end: int, device):
        """RoPE tables for this rank's [text; video[start:end]] stream (text rows: identity)."""
        key = ("stream", frames, h, w, n_text, start, end, str(device))
        if key not in self._pos_cache:
            _, cos, sin = self._positions(frames, h, w, device)
            self._pos_cache[key] = rope_tables(cos[start:end], sin[start:end], n_text)
        return self._pos_cache[key]

    @staticmethod
    def local_text_range(num_text: int) -> tuple[int, int]:
        """The slice of text tokens this SP rank holds (see `sp_chunk`)."""
        return sp_chunk(num_text, state.sp_size(), state.sp_rank())

    @staticmethod
    def local_token_range(num_tokens: int) -> tuple[int, int]:
        """The slice of video tokens (in (f, h, w) order) this SP rank holds (see `sp_chunk`): 49x480x720 has
        17,550 of them, which SP = 4 or 8 does not divide."""
        return sp_chunk(num_tokens, state.sp_size(), state.sp_rank())

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B,F,C,H,W] -> [B, F*h*w, C*p*p] in the token order and channel layout of the output projection."""
        p = self.config.patch_size
        b, f, c, hh, ww = x.shape
        x = x.reshape(b, f, c, hh // p, p, ww // p, p).permute(0, 1, 3, 5, 2, 4, 6)
        return x.reshape(b, f * (hh // p) * (ww // p), c * p * p)

    def unpatchify(self, tokens: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
        p, c = self.config.patch_size, self.config.out_channels
        b = tokens.shape[0]
        x = tokens.reshape(b, frames, height // p, width // p, c, p, p).permute(0, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, frames, c, height, width)

    # ---- forward ----
    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, timestep: torch.Tensor,
                gather_output: bool = True) -> torch.Tensor:
        """With gather_output=False under SP, returns this rank's patchified output tokens [B, N/SP, C*p*p]
        (see `local_token_range` and `patchify`), which is what the trainer's loss uses."""
        cfg = self.config
        b, frames, _, height, width = hidden_states.shape
        p = cfg.patch_size
        if height % p or width % p:
            raise ValueError(f"latent height/width ({height}x{width}) must be divisible by patch_size {p}")
        sp_group, sp = state.sp_group(), state.sp_size()
        # Inputs are replicated over SP but each rank uses its own tokens: sum their gradients over SP.
        hidden_states = copy_to_group(hidden_states, sp_group)
        encoder_hidden_states = copy_to_group(encoder_hidden_states, sp_group)
        dtype = self.proj_out.weight.dtype
        temb = self.time_embedding(timestep_embedding(timestep, cfg.inner_dim, cfg.flip_sin_to_cos,
                                                      cfg.freq_shift).to(dtype))
        compute = compute_dtype(cfg.cpu_half_compute, dtype, hidden_states.device)
        # Under SP each rank embeds and runs only its own slice of the video tokens and of the text tokens.
        n_video, n_text_all = frames * (height // p) * (width // p), encoder_hidden_states.shape[1]
        start, end = self.local_token_range(n_video)
        t_start, t_end = self.local_text_range(n_text_all)
        video, text = self.patch_embed(hidden_states.to(dtype), encoder_hidden_states[:, t_start:t_end].to(dtype),
                                       compute, (start, end))
        n_text = t_end - t_start
        pos = self._positions(frames, height // p, width // p, video.device)
        rope = None
        if pos[0] == "sincos":
            video = video + pos[1][start:end].to(dtype)[None]
        else:
            rope = self._stream_rope(frames, height // p, width // p, n_text, start, end, video.device)
        sp_sizes = video_sizes = None
        if sp > 1:  # every rank's stream length, for the Ulysses all-to-alls
            video_sizes = [_span(sp_chunk(n_video, sp, r)) for r in range(sp)]
            sp_sizes = [_span(sp_chunk(n_text_all, sp, r)) + video_sizes[r] for r in range(sp)]
        x = torch.cat([text, video], 1)  # one [text; video] stream through all blocks
        for i, block in enumerate(self.blocks):
            # the last block returns the video tokens only: nothing reads the text tokens' outputs
            args = (x, temb, n_text, rope, compute, sp_sizes, i < len(self.blocks) - 1)
            if cfg.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, *args, use_reentrant=False)
            else:
                x = block(*args)
        n_text = n_text if not self.blocks else 0  # text rows left in x
        out = self.norm_out(self.norm_final(x), n_text, temb)
        out = self.proj_out(out if compute is None else out.to(compute)).to(dtype)[:, n_text:]
        if not gather_output:
            return out
        out = gather_along_dim(out, dim=1, group=sp_group, grad_mode="split", sizes=video_sizes)
        return self.unpatchify(out, frames, height, width)
