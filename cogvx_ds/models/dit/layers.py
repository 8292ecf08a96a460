"""The expert-AdaLN transformer block with Megatron-core tensor-parallel attention and MLP.

A block works on one stream [text tokens; video tokens] ([B, S, D], text first): the linear layers see all
tokens in one matmul (the last block's attention projection and MLP see the video tokens only), and the
per-modality parts (expert AdaLN, gates, RoPE) are applied segment-wise by the fused Functions in `fused.py`
without splitting and re-joining the stream.
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial

import torch
import torch.nn.functional as F
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import nn

from cogvx_ds.config import ModelConfig
from cogvx_ds.models.dit.attention import attention
from cogvx_ds.models.dit.fused import (
    Linear,
    ada_layer_norm,
    gated_residual,
    gelu_tanh,
    head_norm_rope,
    recompute_in_backward,
)
from cogvx_ds.models.dit.linear import linear, onednn_linear, use_onednn
from cogvx_ds.parallel import state
from cogvx_ds.parallel.comm import copy_to_group
from cogvx_ds.parallel.ulysses import ulysses_attention


def megatron_config(tp: int) -> ModelParallelConfig:
    # Weights are allocated on the CPU and filled by cogvx_ds.checkpoint (init, diffusers or SAT weights),
    # the same way for every TP size, so Megatron's own initialisation is switched off.
    return ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                               perform_initialization=False, sequence_parallel=False,
                               gradient_accumulation_fusion=False)


def _no_init(_weight):
    return None


def _linear_impl(module, forward_impl, input, weight, **kwargs):
    """Megatron's local matmul (`_forward_impl`), in the input's dtype and on this CPU's faster kernel.

    A float32 input with half weights is the CPU fallback of `model.cpu_half_compute` (see fused.compute_dtype):
    the matmul runs in float32 from the half storage and gradients flow back to the half weights. Where
    `linear.use_onednn` applies (float32 on an x86 CPU), Megatron's matmul is replaced by the oneDNN one; its
    communication is kept: the column-parallel input gradient is summed over the TP group (`allreduce_dgrad`)
    and the row-parallel output reduction stays in Megatron's forward. Megatron's sequence parallelism and
    gradient-accumulation fusion (both off here, GPU features) keep Megatron's own path."""
    bias = kwargs.get("bias")
    if weight.dtype != input.dtype:
        weight = weight.to(input.dtype)
        if bias is not None:
            kwargs["bias"] = bias = bias.to(input.dtype)
    if (not kwargs.get("sequence_parallel") and not kwargs.get("gradient_accumulation_fusion")
            and use_onednn(input, weight, bias, module.cpu_kernel)):
        if kwargs.get("allreduce_dgrad"):
            input = copy_to_group(input, kwargs.get("tp_group") or module.tp_group)
        return onednn_linear(input, weight, bias)
    return forward_impl(input=input, weight=weight, **kwargs)


class _LocalLinear:
    """Shared by the column- and row-parallel layers: a plain linear when there is no process group at all (no
    TP group to talk to, which Megatron's mappings assert on); the matmul runs in the input's dtype, on the
    kernel `cpu_kernel` picks on CPUs (see cogvx_ds.models.dit.linear)."""

    cpu_kernel = "auto"

    def forward(self, x):
        if self.tp_group is None:
            bias = self.bias.to(x.dtype) if self.bias is not None else None
            return linear(x, self.weight.to(x.dtype), bias, self.cpu_kernel), None
        return super().forward(x)

    def _forward_impl(self, input, weight, **kwargs):
        return _linear_impl(self, super()._forward_impl, input, weight, **kwargs)


def _mark_tensor_parallel(weight: torch.Tensor, dim: int) -> None:
    """Flag a TP-sharded weight as Megatron's GPU initialisation does. With use_cpu_initialization and no
    initialisation (our weights come from cogvx_ds.checkpoint) Megatron leaves the weights unflagged, and
    DeepSpeed's gradient norm then counts them on TP rank 0 only, as if replicated: a wrong norm under TP > 1,
    so wrong clipping (and logged grad_norm)."""
    weight.tensor_model_parallel, weight.partition_dim, weight.partition_stride = True, dim, 1


class ColumnLinear(_LocalLinear, ColumnParallelLinear):
    """Megatron's ColumnParallelLinear (see _LocalLinear)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _mark_tensor_parallel(self.weight, 0)


class RowLinear(_LocalLinear, RowParallelLinear):
    """Megatron's RowParallelLinear (see _LocalLinear)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _mark_tensor_parallel(self.weight, 1)


def _to(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return x if dtype is None else x.to(dtype)


class ModulatedLayerNorm(nn.LayerNorm):
    """LayerNorm followed by a (scale, shift) modulation per sample and modality, fused (fused.ada_layer_norm).
    Its own module, so that ZeRO-3 gathers its weights when it runs."""

    def forward(self, x, n_text, text_scale, text_shift, video_scale, video_shift):
        return ada_layer_norm(x, n_text, self.weight, self.bias, self.eps, text_scale, text_shift, video_scale,
                              video_shift)


class ExpertAdaLN(nn.Module):
    """One LayerNorm, two modulations: (shift, scale, gate) for vision tokens and another set for text tokens."""

    def __init__(self, time_embed_dim: int, dim: int, eps: float, affine: bool):
        super().__init__()
        self.linear = Linear(time_embed_dim, 6 * dim)
        self.norm = ModulatedLayerNorm(dim, eps=eps, elementwise_affine=affine)

    def forward(self, x, n_text, temb):
        """x: the [text; video] stream -> (modulated stream, text gate, video gate)."""
        shift, scale, gate, t_shift, t_scale, t_gate = self.linear(F.silu(temb)).chunk(6, dim=-1)
        return self.norm(x, n_text, t_scale, t_shift, scale, shift), t_gate, gate


class HeadLayerNorm(nn.LayerNorm):
    """Per-head LayerNorm whose weights are shared by all heads, then RoPE when given its table (fused.head_norm_rope).
    Under TP each rank normalises its own heads, so the weight gradient is summed over the TP group to stay
    identical (and complete) on every rank."""

    def forward(self, x, rope=None):
        group = state.tp_group()
        w, b = (None if t is None else copy_to_group(t, group).to(x.dtype) for t in (self.weight, self.bias))
        return head_norm_rope(x, w, b, self.eps, rope)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig):
        super().__init__()
        tp = state.tp_size()
        dim, self.head_dim = cfg.inner_dim, cfg.attention_head_dim
        self.local_heads = cfg.num_attention_heads // tp
        self.kernel = cfg.cpu_attention  # cogvx_ds.models.dit.attention
        # Fused QKV: this rank's shard is [q; k; v] of its own heads (see cogvx_ds.checkpoint.layout).
        self.qkv = ColumnLinear(dim, 3 * dim, config=mp, init_method=_no_init, bias=cfg.attention_bias,
                                gather_output=False, tp_group=state.tp_group())
        self.norm_q = HeadLayerNorm(self.head_dim, eps=1e-6)
        self.norm_k = HeadLayerNorm(self.head_dim, eps=1e-6)
        self.proj = RowLinear(dim, dim, config=mp, init_method=_no_init, bias=True,
                              input_is_parallel=True, skip_bias_add=False, tp_group=state.tp_group())

    def forward(self, x, n_text, rope=None, compute=None, sp_sizes=None, keep_text=True):
        """x [B, S, D] stream; rope: RoPE tables of the whole stream (fused.rope_tables). With `compute`
        set (the half-precision CPU fallback) the whole sublayer runs in that dtype; returns x's dtype. Under SP,
        sp_sizes[r] is the stream length of SP rank r (parallel.ulysses). keep_text=False returns the video
        tokens' output only (the text tokens still serve as keys and values); without SP their queries are
        dropped before attention."""
        qkv, _ = self.qkv(_to(x, compute))
        q, k, v = qkv.unflatten(-1, (3, self.local_heads, self.head_dim)).unbind(2)
        k = self.norm_k(k, rope)
        if keep_text or sp_sizes is not None:
            q = self.norm_q(q, rope)
        else:
            q = self.norm_q(q[:, n_text:], None if rope is None else rope[:, n_text:])
        if sp_sizes is None:
            out = attention(q, k, v, self.kernel)
        else:
            out = ulysses_attention(q, k, v, sp_sizes, state.sp_group(), partial(attention, kernel=self.kernel))
            if not keep_text:
                out = out[:, n_text:]
        out, _ = self.proj(out.flatten(2))
        return out.to(x.dtype)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig):
        super().__init__()
        dim = cfg.inner_dim
        self.fc1 = ColumnLinear(dim, 4 * dim, config=mp, init_method=_no_init, bias=True,
                                gather_output=False, tp_group=state.tp_group())
        self.fc2 = RowLinear(4 * dim, dim, config=mp, init_method=_no_init, bias=True,
                             input_is_parallel=True, skip_bias_add=False, tp_group=state.tp_group())
        # under activation checkpointing nothing is kept anyway (and the recipe would keep fc1's output alive)
        self.recompute_gelu = cfg.recompute_gelu and not cfg.activation_checkpointing

    def forward(self, x, compute=None):
        h, _ = self.fc1(_to(x, compute))
        a = gelu_tanh(h)
        keep_a = nullcontext()
        if self.recompute_gelu and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            kept = h.detach()  # saved by the GELU's backward anyway
            keep_a = recompute_in_backward(a, lambda: gelu_tanh(kept))  # fc2 saves its input for the weight gradient
        with keep_a:
            out, _ = self.fc2(a)
        return out.to(x.dtype)


class ExpertBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig):
        super().__init__()
        dim = cfg.inner_dim
        self.norm1 = ExpertAdaLN(cfg.time_embed_dim, dim, cfg.norm_eps, cfg.norm_elementwise_affine)
        self.attn = Attention(cfg, mp)
        self.norm2 = ExpertAdaLN(cfg.time_embed_dim, dim, cfg.norm_eps, cfg.norm_elementwise_affine)
        self.mlp = MLP(cfg, mp)

    def forward(self, x, temb, n_text: int, rope=None, compute=None, sp_sizes=None, keep_text: bool = True):
        """x: [B, n_text + video tokens, D], text first (under SP: this rank's slices of both) -> the same stream,
        or with keep_text=False (the last block, whose text outputs nothing reads) the video tokens only: the
        text tokens then enter attention as keys and values, and skip the rest (their queries, output projection,
        MLP and residuals), as the last block of SD3's MMDiT does with its context stream."""
        h, t_gate, gate = self.norm1(x, n_text, temb)
        a = self.attn(h, n_text, rope, compute, sp_sizes, keep_text)
        if not keep_text:
            x, n_text = x[:, n_text:], 0
        x = gated_residual(x, a, n_text, t_gate, gate)
        h, t_gate, gate = self.norm2(x, n_text, temb)
        return gated_residual(x, self.mlp(h, compute), n_text, t_gate, gate)
