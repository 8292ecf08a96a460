"""Hand-fused pieces of the expert block, written as autograd Functions.

The block works on one stream [text tokens; video tokens] of shape [B, S, D]. The expert AdaLN and the gated
residuals apply one set of per-sample vectors to the first `n_text` tokens and another to the rest. Written with
slices and `cat`, autograd pays for it in both directions: every slice's backward allocates a zero tensor of the
full stream and copies into it, every `cat` copies. These Functions write each segment straight into one output
and save only what their backward needs (benchmarks/dit_step.py prints the per-op breakdown).

Also here: RoPE as one Function over the whole stream (text rows carry the identity rotation), fused with the QK
LayerNorm into head-major output memory on CPUs; the float32 tanh-GELU in its sigmoid form; and the choice of the
compute dtype for matmul-type ops of half-precision models on CPUs without native bf16/fp16 kernels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cogvx_ds.models.dit.linear import linear


def _segments(n_text: int):
    return slice(None, n_text), slice(n_text, None)


class _AdaLayerNorm(torch.autograd.Function):
    """y = LayerNorm(x; weight, bias) * (1 + scale) + shift, with (scale, shift) [B, D] per sample: text_* on
    tokens [:n_text], video_* on the rest.

    Per sample and segment the modulation folds into the LayerNorm's affine (W = weight * (1 + scale),
    B = bias * (1 + scale) + shift), whose gradients (token sums of g * x_hat and of g) are all the modulation
    gradients need. The backward computes them per sample with the native LayerNorm backward, or for the whole
    batch at once when samples are small (see BATCHED_NORM_BACKWARD_MAX_NUMEL). Saves x and the LayerNorm
    statistics only (not the normalised tensor)."""

    @staticmethod
    def forward(ctx, x, n_text, weight, bias, eps, text_scale, text_shift, video_scale, video_shift):
        y, mean, rstd = torch.native_layer_norm(x, x.shape[-1:], None, None, eps)
        affine = []
        for sl, scale, shift in zip(_segments(n_text), (text_scale, video_scale), (text_shift, video_shift)):
            w = 1 + scale if weight is None else weight * (1 + scale)
            b = shift if bias is None else torch.addcmul(shift, bias, 1 + scale)
            ys = y[:, sl]
            torch.addcmul(b[:, None], ys, w[:, None], out=ys)
            affine.append((w, b))
        ctx.n_text, ctx.has_weight, ctx.has_bias = n_text, weight is not None, bias is not None
        ctx.save_for_backward(x, mean, rstd, weight, bias, text_scale, video_scale, *affine[0], *affine[1])
        return y

    @staticmethod
    def backward(ctx, g):
        saved = ctx.saved_tensors
        if saved[0][0].numel() > BATCHED_NORM_BACKWARD_MAX_NUMEL:
            return _ada_ln_backward_per_sample(ctx.n_text, g, *saved)
        return _ada_ln_backward_batched(ctx.n_text, g, *saved)


# The AdaLN backward takes one of two routes by the size of one sample ([S, D] elements):
# - small samples (many short sequences per batch, as in the CPU demo: 32 x [64, 128]): one batched pass over the
#   whole tensor. Per-sample native calls would be 2 x batch small kernels whose fixed cost (and, on a busy CPU,
#   the wake-up of OpenMP threads) dominates: the demo's LQ stage trained 1.35-1.45x faster with the batched
#   route (92-112 -> 133-140 samples/s).
# - large samples (long sequences, the 2B/5B case): one native LayerNorm backward per sample and segment, a single
#   fused kernel each, where the batched route's extra whole-tensor passes would cost more.
# Crossover measured on a 2-core AVX-512 CPU, batch 8, fp32: batched 1.5-4.5x faster up to 65,536 elements per
# sample, 0.45-0.72x from 131,072 up.
BATCHED_NORM_BACKWARD_MAX_NUMEL = 1 << 16


def _modulation_grads(weight, bias, scales, g_w, g_b):
    """Gradients of (weight, bias, text_scale, text_shift, video_scale, video_shift) from those of each segment's
    per-sample folded affine (W = weight * (1 + scale), B = bias * (1 + scale) + shift): g_w, g_b are
    [text [B, D], video [B, D]]."""
    g_scale = [(gw if weight is None else gw * weight) + (0 if bias is None else gb * bias) for gw, gb in zip(g_w, g_b)]
    one_plus = [1 + scale for scale in scales]
    g_weight = None if weight is None else sum((gw * op).sum(0) for gw, op in zip(g_w, one_plus)).to(weight.dtype)
    g_bias = None if bias is None else sum((gb * op).sum(0) for gb, op in zip(g_b, one_plus)).to(bias.dtype)
    text_scale, video_scale = scales
    return (g_weight, g_bias, g_scale[0].to(text_scale.dtype), g_b[0].to(text_scale.dtype),
            g_scale[1].to(video_scale.dtype), g_b[1].to(video_scale.dtype))


def _ada_ln_backward_per_sample(n_text, g, x, mean, rstd, weight, bias, text_scale, video_scale, tw, tb, vw, vb):
    """One native LayerNorm backward per sample and segment, with that sample's folded affine."""
    parts, g_w, g_b = [], [[], []], [[], []]
    for i in range(x.shape[0]):
        for k, (sl, w, b) in enumerate(zip(_segments(n_text), (tw, vw), (tb, vb))):
            if x[i, sl].shape[0] == 0:  # no tokens of this modality on this rank (sequence parallelism)
                g_w[k].append(torch.zeros_like(w[i]))
                g_b[k].append(torch.zeros_like(b[i]))
                continue
            gx, gw, gb = torch.ops.aten.native_layer_norm_backward(
                g[i, sl], x[i, sl], x.shape[-1:], mean[i, sl], rstd[i, sl], w[i], b[i], [True, True, True])
            parts.append(gx)
            g_w[k].append(gw)
            g_b[k].append(gb)
    gx = torch.cat(parts).view(x.shape)  # per sample: text rows then video rows, i.e. x's layout
    g_weight, g_bias, *g_mod = _modulation_grads(
        weight, bias, (text_scale, video_scale), [torch.stack(v) for v in g_w], [torch.stack(v) for v in g_b])
    return gx, None, g_weight, g_bias, None, *g_mod


def _ada_ln_backward_batched(n_text, g, x, mean, rstd, weight, bias, text_scale, video_scale, tw, tb, vw, vb):
    """All samples at once, in float32 (or float64 for float64 inputs): the gradient w.r.t. the normalised input
    is g times each sample's folded weight, one native LayerNorm backward without affine maps it to x, and the
    folded affine's gradients are per-sample token sums."""
    acc = torch.promote_types(x.dtype, torch.float32)
    xa, ga, mean, rstd = x.to(acc), g.to(acc), mean.to(acc), rstd.to(acc)
    x_hat = (xa - mean) * rstd
    g_x_hat = torch.empty_like(ga)
    g_w, g_b = [], []
    for sl, w in zip(_segments(n_text), (tw, vw)):
        gs = ga[:, sl]
        torch.mul(gs, w.to(acc)[:, None], out=g_x_hat[:, sl])
        g_w.append((gs * x_hat[:, sl]).sum(1))
        g_b.append(gs.sum(1))
    gx = torch.ops.aten.native_layer_norm_backward(
        g_x_hat, xa, x.shape[-1:], mean, rstd, None, None, [True, False, False])[0].to(x.dtype)
    g_weight, g_bias, *g_mod = _modulation_grads(weight, bias, (text_scale, video_scale), g_w, g_b)
    return gx, None, g_weight, g_bias, None, *g_mod


class _GatedResidual(torch.autograd.Function):
    """y = x + gate * a; gate is [B, D]: text_gate on tokens [:n_text], video_gate on the rest."""

    @staticmethod
    def forward(ctx, x, a, n_text, text_gate, video_gate):
        y = torch.empty_like(x)
        for sl, gate in zip(_segments(n_text), (text_gate, video_gate)):
            torch.addcmul(x[:, sl], a[:, sl], gate[:, None], out=y[:, sl])
        ctx.n_text = n_text
        ctx.save_for_backward(a, text_gate, video_gate)
        return y

    @staticmethod
    def backward(ctx, g):
        a, text_gate, video_gate = ctx.saved_tensors
        ga = torch.empty_like(a)
        g_gates = []
        for sl, gate in zip(_segments(ctx.n_text), (text_gate, video_gate)):
            gs = g[:, sl]
            torch.mul(gs, gate[:, None], out=ga[:, sl])
            g_gates.append((gs * a[:, sl]).sum(1))
        return g, ga, None, *g_gates


def ada_layer_norm(x, n_text, weight, bias, eps, text_scale, text_shift, video_scale, video_shift):
    return _AdaLayerNorm.apply(x, n_text, weight, bias, eps, text_scale, text_shift, video_scale, video_shift)


def gated_residual(x, a, n_text, text_gate, video_gate):
    return _GatedResidual.apply(x, a, n_text, text_gate, video_gate)


# tanh-GELU: 0.5 x (1 + tanh(u)) = x sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3)
_GELU_C1 = 2 * math.sqrt(2 / math.pi)
_GELU_C3 = _GELU_C1 * 0.044715


class _GeluTanh(torch.autograd.Function):
    """float32 tanh-GELU whose forward is x * sigmoid(2u): aten's kernel evaluates tanh (SLEEF's, about 6x the cost
    of a sigmoid on AVX-512), and four vectorised passes beat it (1.1 vs 1.9 ms at 1,088 x 2,048 on 2 threads).
    The backward is aten's gelu_backward, which a chain of passes does not beat (2.6 vs 2.1 ms). The result differs
    from F.gelu by float32 rounding (tested against float64)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        y = torch.addcmul(x.new_tensor(_GELU_C1), x, x, value=_GELU_C3)  # 2u / x
        return y.mul_(x).sigmoid_().mul_(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return torch.ops.aten.gelu_backward(g, x, approximate="tanh")


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """F.gelu(x, approximate="tanh"); float32 on CPUs outside torch.compile through `_GeluTanh`."""
    if x.dtype == torch.float32 and x.device.type == "cpu" and not torch.compiler.is_compiling():
        return _GeluTanh.apply(x)
    return F.gelu(x, approximate="tanh")


class _Rebuild:
    """What autograd keeps instead of a saved tensor under `recompute_in_backward`: how to make it again, and the
    saved tensor's view of it (a linear may save a reshaped view of its input)."""

    __slots__ = ("fn", "size", "stride", "offset")

    def __init__(self, fn, t: torch.Tensor):
        self.fn, self.size, self.stride, self.offset = fn, t.size(), t.stride(), t.storage_offset()


class _Outer:
    """A saved tensor as packed by the saved-tensor hooks that were active around `recompute_in_backward`."""

    __slots__ = ("packed",)

    def __init__(self, packed):
        self.packed = packed


def _outer_hooks():
    """The saved-tensor hooks active now (e.g. a user's `torch.autograd.graph.save_on_cpu`), or None. Autograd runs
    only the innermost hooks, so ours hand every other tensor to these. Private API (functorch uses it); without
    it the other tensors are kept as they are."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top(False) if top is not None else None


def recompute_in_backward(target: torch.Tensor, fn):
    """A context in which autograd saves `target` (contiguous), or any view of it, as `fn` (called under no_grad in
    backward to rebuild it, exactly, with target's shape) instead of keeping its memory; every other saved tensor
    goes to the saved-tensor hooks active around this context, if any, or is kept as usual. `fn` must not capture
    `target`. Not for use inside activation checkpointing (its recomputation re-enters the forward)."""
    if not target.is_contiguous() or target.storage_offset():
        raise ValueError("recompute_in_backward: the target must be a contiguous tensor that starts its storage")
    storage, dtype = target.untyped_storage().data_ptr(), target.dtype
    outer = _outer_hooks()

    def pack(t):
        if t.dtype == dtype and t.untyped_storage().data_ptr() == storage:
            return _Rebuild(fn, t)
        return t if outer is None else _Outer(outer[0](t))

    def unpack(p):
        if isinstance(p, _Rebuild):
            with torch.no_grad():
                return p.fn().as_strided(p.size, p.stride, p.offset)
        return outer[1](p.packed) if isinstance(p, _Outer) else p

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _as_complex(x: torch.Tensor) -> torch.Tensor:
    """[..., d] real (channel pairs (2i, 2i+1)) -> [..., d/2] complex view (a float32 copy only if needed)."""
    x = _at_least_fp32(x).unflatten(-1, (-1, 2))
    if x.stride(-1) != 1 or any(st % 2 for st in x.stride()[:-1]) or x.storage_offset() % 2:
        x = x.contiguous()
    return torch.view_as_complex(x)


def _rotate(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate the channel pairs of x [B, S, H, d] by the angles of table [S, d/2, 2] (cos, sin); float32 out."""
    if not torch.compiler.is_compiling():  # eager: one complex multiply, a single vectorised pass
        return torch.view_as_real(_as_complex(x) * torch.view_as_complex(table)[:, None]).flatten(-2)
    # compiled (inductor cannot trace complex views): the same in real arithmetic, which it fuses
    x0, x1 = _at_least_fp32(x).unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = table[:, None].unbind(-1)
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1).flatten(-2)


class _Rope(torch.autograd.Function):
    """RoPE on interleaved channel pairs (2i, 2i+1) of x [B, S, H, d]; tables [2, S, d/2, 2]: the rotation and
    its inverse (see `rope_tables`). Computed in float32, returned in `out_dtype`; the backward is the inverse
    rotation and saves only the tables."""

    @staticmethod
    def forward(ctx, x, tables, out_dtype):
        ctx.save_for_backward(tables)
        ctx.in_dtype = x.dtype
        return _rotate(x, tables[0]).to(out_dtype)

    @staticmethod
    def backward(ctx, g):
        (tables,) = ctx.saved_tensors
        return _rotate(g, tables[1]).to(ctx.in_dtype), None, None


def rope_tables(cos: torch.Tensor, sin: torch.Tensor, n_text: int) -> torch.Tensor:
    """Rotation tables of the whole [text; video] stream, [2, n_text + N, d/2, 2] float32: (cos, sin) and the
    inverse (cos, -sin), from the video tokens' RoPE tables (cos/sin [N, d], each value repeated on its pair
    (2i, 2i+1)); text rows rotate by 0."""
    video = torch.stack([cos[:, ::2], sin[:, ::2]], -1).float()
    text = torch.zeros(n_text, *video.shape[1:], dtype=video.dtype, device=video.device)
    text[..., 0] = 1.0
    table = torch.cat([text, video])
    return torch.stack([table, table * torch.tensor([1.0, -1.0], dtype=table.dtype, device=table.device)])


def apply_rope_stream(x: torch.Tensor, table: torch.Tensor, out_dtype=None) -> torch.Tensor:
    return _Rope.apply(x, table, out_dtype or x.dtype)


class _HeadNormRope(torch.autograd.Function):
    """The per-head QK LayerNorm, then RoPE (table [2, S, d/2, 2] or None), of x [B, S, H, d] (a strided view of the
    fused QKV output), returned as a [B, S, H, d] view of head-major memory ([B, H, S, d] contiguous): the layout
    the CPU attention kernel works in, so its per-head copies of q and k, and the copies of their gradients back to
    token-major, disappear (4 passes over q/k per layer). Saves x as given (a view: no extra memory) and makes the
    head-major copy again in backward, as LayerNorm's backward did for the strided view."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, table):
        xh = x.transpose(1, 2).contiguous()
        y, mean, rstd = torch.native_layer_norm(xh, xh.shape[-1:], weight, bias, eps)
        y = y.transpose(1, 2)
        if table is not None:  # the product takes y's (head-major) layout
            y = _rotate(y, table[0]).to(x.dtype)
        ctx.save_for_backward(x, mean, rstd, weight, bias, table)
        return y

    @staticmethod
    def backward(ctx, g):
        x, mean, rstd, weight, bias, table = ctx.saved_tensors
        if table is not None:
            g = _rotate(g, table[1]).to(x.dtype)
        xh = x.transpose(1, 2).contiguous()
        mask = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1],
                bias is not None and ctx.needs_input_grad[2]]
        gx, gw, gb = torch.ops.aten.native_layer_norm_backward(
            g.transpose(1, 2).contiguous(), xh, xh.shape[-1:], mean, rstd, weight, bias, mask)
        return None if gx is None else gx.transpose(1, 2), gw, gb, None, None


def head_norm_rope(x, weight, bias, eps: float, table=None):
    """LayerNorm over the head dim of x [B, S, H, d] (weight/bias [d] or None), then RoPE by `rope_tables`' table if
    given; on CPUs in eager mode as `_HeadNormRope` (head-major output memory), else as the plain composition."""
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        return _HeadNormRope.apply(x, weight, bias, eps, table)
    y = F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    return y if table is None else apply_rope_stream(y, table)


# ---- half precision on CPUs without native kernels ----------------------------------------------------------------

def native_half_supported(dtype: torch.dtype) -> bool:
    """Whether oneDNN has native kernels for this half dtype on this CPU (bf16: AVX512 and up; fp16: AVX512-FP16
    or AMX-FP16). Without them (AVX2-only CPUs) bf16 matmuls, attention and convs fall back to reference code that
    runs 10-40x slower than fp32 (benchmarks/dit_step.py --bf16-native)."""
    probe = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}.get(dtype)
    if probe is None:
        return True
    try:
        return bool(getattr(torch.ops.mkldnn, probe)())
    except (AttributeError, RuntimeError):
        return False


def compute_dtype(mode: str, dtype: torch.dtype, device: torch.device) -> torch.dtype | None:
    """float32 when matmul-type ops (linear, attention, patch conv) of a bf16/fp16 model should run in fp32 from
    half storage (`model.cpu_half_compute`), else None (run in the model's dtype). Never on GPUs."""
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16) or mode == "native":
        return None
    if mode == "fp32" or not native_half_supported(dtype):
        return torch.float32
    return None


class Linear(nn.Linear):
    """nn.Linear computing in its input's dtype (float32 input, half weights: the CPU fallback above), on the
    CPU kernel `cpu_kernel` picks (cogvx_ds.models.dit.linear)."""

    cpu_kernel = "auto"

    def forward(self, x):
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return linear(x, self.weight.to(x.dtype), bias, self.cpu_kernel)


class PatchConv(nn.Conv2d):
    """The patch embedding (a Conv2d with kernel = stride = patch size, weights in Conv2d layout) computed as one
    matmul over patchified latents [B, F, C, H, W] -> tokens [B, F*h*w, D] in (f, h, w) order: no im2col and no
    transpose copy of the tokens. Computes in the input's dtype, like `Linear`."""

    cpu_kernel = "auto"

    def forward(self, latents, start: int | None = None, end: int | None = None):
        """Tokens [start, end) only, when given (a sequence-parallel rank's slice)."""
        b, f, c, hh, ww = latents.shape
        p, q = self.kernel_size
        x = latents.reshape(b, f, c, hh // p, p, ww // q, q).permute(0, 1, 3, 5, 2, 4, 6).flatten(4).flatten(1, 3)
        x = x[:, start:end]
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return linear(x, self.weight.flatten(1).to(x.dtype), bias, self.cpu_kernel)
