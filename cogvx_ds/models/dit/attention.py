"""Full attention over [B, S, heads, d] streams: torch SDPA, or on CPUs in bfloat16 a tiled-math kernel.

Why a second kernel: on CPUs PyTorch's SDPA runs its flash-attention kernel, which in bfloat16 reaches about 140
GFLOP/s on this project's reference CPU (2 AVX-512 cores with bf16 dot products), while bfloat16 matmuls of the
same shapes run at 300-400. Up to a few thousand tokens one head's scores fit in memory and the cache, so
materialising them and using the fast matmuls wins. Forward + backward against SDPA, bfloat16, interleaved medians:
1.66x at 256 tokens x 8 heads x 64, 1.48x at 1,088, 1.44x at 2,048, even at 4,096; 2.3-3.1x for the demo's
shapes (batch 32, 4 heads x 32, 64-124 tokens). In float32 SDPA's kernel already runs at matmul speed and the tiled
kernel is 0.92-0.99x, so the "auto" route keeps float32 on SDPA. (`benchmarks/dit_step.py --attention-kernels` times the
whole training step both ways.)

The kernel works on a few (sample, head) pairs at a time, as many as keep one tile of scores within `TILE_BYTES`:
    forward   S = (q / sqrt(d)) k^T,  P = softmax(S),  O = P v             (P and O are kept for backward)
    backward  dV = P^T dO,  dS = P * (dO v^T - D),  D = rowsum(dO * O),  dQ = dS k / sqrt(d),  dK = dS^T q / sqrt(d)
Precision in bfloat16: every matmul accumulates in float32 but its output is rounded to bfloat16, and rounding the
raw scores S would lose 2^-9 of |S| (5-9x flash's error at large logits). So S - rowmax is computed instead, by one
matmul with the (rounded) row maxima of a first pass as an extra column of q, and dO v^T - D by one matmul with D
(float32, split into two bfloat16 parts) as extra columns of dO: each is rounded once, after the cancellation.
The softmax runs in float32 internally. Errors against float64 attention: 0.7-2.4x SDPA's (2e-3 to 9e-3, about
a bfloat16 ulp; the most for the output at large logits), and in a whole bfloat16 model the same as SDPA's against
the float32 model (0.73% vs 0.73%); see tests/test_dit_attention.py.

Memory: it keeps P, batch x heads x S^2 elements in the input dtype, where flash keeps O(S). The "auto" route
takes it only while that stays under `TILED_MAX_SAVED_BYTES` per call (no limit without autograd: then only one
tile lives at a time); `cogvx_ds.perf_model.activation_bytes(attention="tiled")` counts it. Never on GPUs (flash
is faster there) and never inside torch.compile (`model.compile_blocks` compiles SDPA).

`model.cpu_attention`: "auto" (the route above), "sdpa" (always torch SDPA), "tiled" (the tiled kernel for any
shape, dtype and device, outside torch.compile).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KERNELS = ("auto", "tiled", "sdpa")
TILE_BYTES = 4 << 20  # scores per tile: 4 MiB stays in the L3 cache between the matmul and the softmax
# The "auto" route's longest sequence per dtype (bfloat16: 1.44x at 2,048 tokens, even at 4,096); other dtypes: SDPA
TILED_MAX_TOKENS = {torch.bfloat16: 3072}
TILED_MAX_SAVED_BYTES = 256 << 20  # the kept probabilities of one call


def sdpa_attention(q, k, v):
    """torch SDPA; q, k, v [B, S, heads, d] (any strides) -> [B, S, heads, d].

    SDPA reads them through transposed views: no copy into [B, heads, S, d] (the CPU flash kernel runs as fast on
    these strides), and its output comes back in [B, S, heads, d] memory order, ready for the projection."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def use_tiled(q, kernel: str = "auto", needs_grad: bool = True) -> bool:
    """Whether `attention` takes the tiled kernel for q [B, S, heads, d] (see the module docstring)."""
    if kernel not in KERNELS:
        raise ValueError(f"attention kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "sdpa" or torch.compiler.is_compiling():
        return False
    if kernel == "tiled":
        return True
    b, s, heads, _ = q.shape
    if q.device.type != "cpu" or s > TILED_MAX_TOKENS.get(q.dtype, 0):
        return False
    return not needs_grad or b * heads * s * s * q.element_size() <= TILED_MAX_SAVED_BYTES


def attention(q, k, v, kernel: str = "auto"):
    """Full attention; q, k, v [B, S, heads, d] (any strides) -> [B, S, heads, d]."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if q.numel() == 0 or not use_tiled(q, kernel, needs_grad):
        return sdpa_attention(q, k, v)
    b, s, heads, d = q.shape
    pairs = [t.transpose(1, 2).reshape(b * heads, s, d).contiguous() for t in (q, k, v)]  # [B*heads, S, d]
    out = _TiledAttention.apply(*pairs, needs_grad)
    return out.view(b, heads, s, d).transpose(1, 2)


# ----------------------------------------------------------------------------------------------- the tiled kernel
def _augment(x, cols):
    """[c, S, d] -> [c, S, d + 2] with two extra columns (a [c, S, 2] tensor or a scalar; two, not one, keep the
    matmul's inner dimension even)."""
    out = x.new_empty(*x.shape[:-1], x.shape[-1] + 2)
    out[..., :-2] = x
    out[..., -2:] = cols
    return out


def _tile(n: int, s: int, dtype) -> int:
    """How many (sample, head) pairs one tile of scores holds."""
    return max(1, min(n, TILE_BYTES // max(1, s * s * dtype.itemsize)))


def _hi_lo(x, dtype):
    """x [c, S] (float32 or wider) -> [c, S, 2] in `dtype` with hi + lo = x to about twice dtype's precision."""
    hi = x.to(dtype)
    return torch.stack([hi, (x - hi.to(x.dtype)).to(dtype)], -1)


class _TiledAttention(torch.autograd.Function):
    """q, k, v [N, S, d] contiguous (N = batch x heads) -> O [N, S, d]; see the module docstring."""

    @staticmethod
    def forward(ctx, q, k, v, keep: bool):
        n, s, d = q.shape
        half = q.element_size() < 4
        scale = d**-0.5
        qs = q * scale
        c = _tile(n, s, q.dtype)
        out = torch.empty_like(q)
        probs = []
        for i in range(0, n, c):
            j = min(n, i + c)
            if half:  # the row maxima (to a rounding) from a first pass: S - max is then computed in float32
                shift = -torch.bmm(qs[i:j], k[i:j].transpose(1, 2)).amax(-1, keepdim=True)
                qa = _augment(qs[i:j], torch.cat([shift, torch.zeros_like(shift)], -1))
                scores = torch.bmm(qa, _augment(k[i:j], 1.0).transpose(1, 2))
            else:
                scores = torch.bmm(qs[i:j], k[i:j].transpose(1, 2))
            p = torch._softmax(scores, -1, False, out=scores)
            out[i:j] = torch.bmm(p, v[i:j])
            if keep:
                probs.append(p)
        if keep:
            ctx.save_for_backward(qs, k, v, out, *probs)
            ctx.scale, ctx.tile = scale, c
        return out

    @staticmethod
    def backward(ctx, g):
        qs, k, v, out, *probs = ctx.saved_tensors
        g = g.contiguous()
        n, c = qs.shape[0], ctx.tile
        acc = torch.promote_types(qs.dtype, torch.float32)
        dq, dk, dv = torch.empty_like(qs), torch.empty_like(k), torch.empty_like(v)
        for t, i in enumerate(range(0, n, c)):
            j = min(n, i + c)
            p = probs[t]
            dv[i:j] = torch.bmm(p.transpose(1, 2), g[i:j])
            # dS = P * (dP - D), D = rowsum(dP * P) = rowsum(dO * O): one matmul gives dP - D with D as two extra
            # columns (hi + lo), accumulated in float32 and rounded once
            rowsum = (g[i:j].to(acc) * out[i:j].to(acc)).sum(-1)
            ga = _augment(g[i:j], -_hi_lo(rowsum, g.dtype))
            ds = torch.bmm(ga, _augment(v[i:j], 1.0).transpose(1, 2)).mul_(p)
            dq[i:j] = torch.bmm(ds, k[i:j])
            dk[i:j] = torch.bmm(ds.transpose(1, 2), qs[i:j])
        return dq.mul_(ctx.scale), dk, dv, None
