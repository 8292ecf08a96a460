"""The expert-AdaLN transformer block with Megatron-core tensor-parallel attention and MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import nn

from cogvx_ds.config import ModelConfig
from cogvx_ds.models.dit.embeddings import apply_rope
from cogvx_ds.parallel import state
from cogvx_ds.parallel.comm import copy_to_group
from cogvx_ds.parallel.ulysses import UlyssesJointAttention, joint_attention


def megatron_config(tp: int) -> ModelParallelConfig:
    # Weights are allocated on the CPU and filled by cogvx_ds.checkpoint (init, diffusers or SAT weights),
    # the same way for every TP size, so Megatron's own initialisation is switched off.
    return ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                               perform_initialization=False, sequence_parallel=False,
                               gradient_accumulation_fusion=False)


def _no_init(_weight):
    return None


class ColumnLinear(ColumnParallelLinear):
    """Megatron's ColumnParallelLinear; a plain linear when there is no process group at all (no TP group to
    talk to, which Megatron's mappings assert on)."""

    def forward(self, x):
        if self.tp_group is None:
            return F.linear(x, self.weight, self.bias), None
        return super().forward(x)


class RowLinear(RowParallelLinear):
    def forward(self, x):
        if self.tp_group is None:
            return F.linear(x, self.weight, self.bias), None
        return super().forward(x)


class ExpertAdaLN(nn.Module):
    """One LayerNorm, two modulations: (shift, scale, gate) for vision tokens and another set for text tokens."""

    def __init__(self, time_embed_dim: int, dim: int, eps: float, affine: bool):
        super().__init__()
        self.linear = nn.Linear(time_embed_dim, 6 * dim)
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=affine)

    def forward(self, video, text, temb):
        shift, scale, gate, t_shift, t_scale, t_gate = self.linear(F.silu(temb))[:, None].chunk(6, dim=-1)
        video = self.norm(video) * (1 + scale) + shift
        text = self.norm(text) * (1 + t_scale) + t_shift
        return video, text, gate, t_gate


class HeadLayerNorm(nn.LayerNorm):
    """Per-head LayerNorm whose weights are shared by all heads. Under TP each rank normalises its own heads,
    so the weight gradient is summed over the TP group to stay identical (and complete) on every rank."""

    def forward(self, x):
        group = state.tp_group()
        w, b = copy_to_group(self.weight, group), copy_to_group(self.bias, group)
        return F.layer_norm(x, self.normalized_shape, w, b, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig):
        super().__init__()
        tp = state.tp_size()
        dim, self.head_dim = cfg.inner_dim, cfg.attention_head_dim
        self.local_heads = cfg.num_attention_heads // tp
        # Fused QKV: this rank's shard is [q; k; v] of its own heads (see cogvx_ds.checkpoint.layout).
        self.qkv = ColumnLinear(dim, 3 * dim, config=mp, init_method=_no_init, bias=cfg.attention_bias,
                                        gather_output=False, tp_group=state.tp_group())
        self.norm_q = HeadLayerNorm(self.head_dim, eps=1e-6)
        self.norm_k = HeadLayerNorm(self.head_dim, eps=1e-6)
        self.proj = RowLinear(dim, dim, config=mp, init_method=_no_init, bias=True,
                                      input_is_parallel=True, skip_bias_add=False, tp_group=state.tp_group())
        self.ulysses = UlyssesJointAttention(state.sp_group()) if state.sp_size() > 1 else None

    def forward(self, text, video, rope=None):
        b, n_text = text.shape[:2]
        qkv, _ = self.qkv(torch.cat([text, video], 1))
        q, k, v = qkv.unflatten(-1, (3, self.local_heads, self.head_dim)).unbind(2)
        q, k = self.norm_q(q), self.norm_k(k)
        qt, kt, vt, qv, kv, vv = q[:, :n_text], k[:, :n_text], v[:, :n_text], q[:, n_text:], k[:, n_text:], v[:, n_text:]
        if rope is not None:  # video tokens only
            qv, kv = apply_rope(qv, *rope), apply_rope(kv, *rope)
        attend = self.ulysses if self.ulysses is not None else joint_attention
        out_t, out_v = attend(qt, kt, vt, qv, kv, vv)
        out, _ = self.proj(torch.cat([out_t, out_v], 1).flatten(2))
        return out[:, :n_text], out[:, n_text:]


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig):
        super().__init__()
        dim = cfg.inner_dim
        self.fc1 = ColumnLinear(dim, 4 * dim, config=mp, init_method=_no_init, bias=True,
                                        gather_output=False, tp_group=state.tp_group())
        self.fc2 = RowLinear(4 * dim, dim, config=mp, init_method=_no_init, bias=True,
                                     input_is_parallel=True, skip_bias_add=False, tp_group=state.tp_group())

    def forward(self, x):
        h, _ = self.fc1(x)
        out, _ = self.fc2(F.gelu(h, approximate="tanh"))
        return out


class ExpertBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig):
        super().__init__()
        dim = cfg.inner_dim
        self.norm1 = ExpertAdaLN(cfg.time_embed_dim, dim, cfg.norm_eps, cfg.norm_elementwise_affine)
        self.attn = Attention(cfg, mp)
        self.norm2 = ExpertAdaLN(cfg.time_embed_dim, dim, cfg.norm_eps, cfg.norm_elementwise_affine)
        self.mlp = MLP(cfg, mp)

    def forward(self, video, text, temb, rope=None):
        n_text = text.shape[1]
        nv, nt, gate, t_gate = self.norm1(video, text, temb)
        at, av = self.attn(nt, nv, rope)
        video, text = video + gate * av, text + t_gate * at
        nv, nt, gate, t_gate = self.norm2(video, text, temb)
        ff = self.mlp(torch.cat([nt, nv], 1))
        return video + gate * ff[:, n_text:], text + t_gate * ff[:, :n_text]
