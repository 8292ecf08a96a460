"""Full attention over [B, S, heads, d] streams: torch SDPA, or on CPUs up to a few thousand tokens a tiled-math
kernel.

Why a second kernel: on CPUs PyTorch's SDPA runs its flash-attention kernel. In bfloat16 it reaches about 140
GFLOP/s on this project's reference CPU (2 AVX-512 cores with bf16 dot products), while bfloat16 matmuls of the
same shapes run at 300-400; in float32 it does 14 S^2 d FLOPs per head (the backward recomputes the scores) at
60-65% of the matmul peak. Up to a few thousand tokens one head's scores fit in memory and the cache, so
materialising them and using plain matmuls (12 S^2 d) wins. Forward + backward against SDPA, interleaved medians:
    bfloat16  2 threads: 1.54-1.59x at 256-512 tokens x 8 heads x 64, 1.49x at 1,088, 1.37x at 2,048, even at
              4,096; 2.8-3.7x at the demo's shapes (batch 32, 2-4 heads x 32, 64-124 tokens); 1 thread 1.5-4x
    float32   2 threads: 0.96-1.05x at 256, 1.06-1.17x at 512-768, 1.07-1.12x at 1,088, 1.00-1.04x at 1,536,
              0.98-1.02x at 2,048; 1.13-1.32x at the demo's shapes (batch 32, 32-124 tokens, where SDPA hardly
              gains from the second thread). 1 thread: 1.02-1.04x at 256, 1.04-1.08x at 512, 1.14-1.15x at 1,088,
              1.04-1.07x at 1,536, but 0.84-1.00x at the demo's (SDPA's flash loop is as good there)
So the "auto" route takes it up to `TILED_MAX_TOKENS` per dtype, and for float32 on one thread only from
`TILED_MIN_TOKENS_ONE_THREAD`. Without autograd (sampling) nothing is kept and the backward's gain is gone: there
SDPA's flash forward is 1.08-1.3x faster in float32 from 256 tokens (and on one thread), the tiled kernel 1.03-1.17x
faster at the demo's batched 64-124 tokens on two threads, and 1.01-1.23x faster in bfloat16 at every shape
measured; so float32 without autograd takes it only up to `TILED_MAX_TOKENS_NO_GRAD`. `benchmarks/attention.py`
prints this table for the CPU it runs on; `benchmarks/dit_step.py --attention-kernels` times the whole training step
both ways.

The kernel works on a few (sample, head) pairs at a time, a tile: as many as keep its scores within `TILE_BYTES`,
and with 2+ threads at least one pair per thread up to `TILE_BYTES_ONE_PAIR_PER_THREAD` (see there):
    forward   S = (q / sqrt(d)) k^T,  P = softmax(S),  O = P v             (P and O are kept for backward)
              (the 1 / sqrt(d) is the matmul's alpha: no scaled copy of q)
    backward  dV = P^T dO,  dS = P * (dO v^T - D),  D = rowsum(dO * O),  dQ = dS k / sqrt(d),  dK = dS^T q / sqrt(d)
Precision in bfloat16: the scores S are always float32, from float32 copies of q and k (rounding the raw scores to
bfloat16 would lose 2^-9 of |S|, 5-9x flash's error at large logits; one float32 matmul into a reused scratch tile
also costs less than two bfloat16 passes that compute a rounding-safe S - rowmax, 1.01-1.08x forward at 256-2,048
tokens, 1.3-1.5x at the demo's), the softmax runs in float32 and P is rounded once, for the kept copy and P v.
In the backward dO v^T - D comes from one bfloat16 matmul with D (float32, split into two bfloat16 parts) as extra
columns of dO, rounded once, after the cancellation. Every other matmul accumulates in float32 and rounds its
output. Errors against float64 attention: 0.65-1.55x SDPA's (2e-3 to 6.4e-3, about a bfloat16 ulp), and in a whole
bfloat16 model the same as SDPA's against the float32 model; see tests/test_dit_attention.py.

Memory: it keeps P, batch x heads x S^2 elements in the input dtype, where flash keeps O(S). The "auto" route
takes it only while that stays under `TILED_MAX_SAVED_BYTES` per call (no limit without autograd: then only one
tile lives at a time); `cogvx_ds.perf_model.activation_bytes(attention="tiled")` counts it. In half precision the
forward also holds one float32 tile of scores and float32 copies of q and k while it runs. Never on GPUs (flash
is faster there) and never inside torch.compile (`model.compile_blocks` compiles SDPA).

Why the tiles run one after another, each batched matmul on all threads, and the pairs are not split over the cores
in Python or C++ (4 pairs per core, measured on the 2-core reference CPU, float32, 8 pairs x 1,088 tokens x 64; the
comparison was made with one pair per tile): in C++ with `at::parallel_for`
on the caller's OpenMP team the forward took 24-26 ms against 17.5-20 (two cores writing kept probabilities at once
share the memory bandwidth), the backward 32-38 against 30-36, and the whole step was 1.005x. Two single-threaded
Python workers looked 1.08-1.3x faster alone, but made the step 3-6% slower: libgomp's team of the calling thread
spins for a few ms after each parallel region and takes a core from them.

`model.cpu_attention`: "auto" (the route above), "sdpa" (always torch SDPA), "tiled" (the tiled kernel for any
shape, dtype and device, outside torch.compile).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KERNELS = ("auto", "tiled", "sdpa")
TILE_BYTES = 4 << 20  # scores per tile: 4 MiB stays in the L3 cache between the matmul and the softmax
# With 2+ threads a tile holds at least one pair per thread while that stays within this: each bmm then runs its
# pairs side by side, one per thread, instead of splitting one pair's matmul over the threads (float32, 8 x 1,088
# tokens x 64, forward + backward on 2 threads: 1.06x with two pairs, mean of 8 processes, 0.96-1.16x each;
# neutral at 1,536-2,048 tokens, which this cap leaves at one pair; the benchmark model's training step: 1.016x,
# mean of 6 processes of 25-40 interleaved rounds, 0.99-1.04x each)
TILE_BYTES_ONE_PAIR_PER_THREAD = 16 << 20
# The "auto" route's longest sequence per dtype (see the module docstring); other dtypes (float16, float64): SDPA
TILED_MAX_TOKENS = {torch.bfloat16: 3072, torch.float32: 1536}
TILED_MAX_TOKENS_NO_GRAD = {torch.float32: 128}  # without autograd (see the module docstring)
# float32 with one thread: from this many tokens (below, many short sequences per tile gain nothing over SDPA's flash
# loop: 0.84-1.00x); with two or more threads SDPA scales poorly on short sequences and the tiled kernel wins there
TILED_MIN_TOKENS_ONE_THREAD = {torch.float32: 512}
TILED_MAX_SAVED_BYTES = 256 << 20  # the kept probabilities of one call


def sdpa_attention(q, k, v):
    """torch SDPA; q, k, v [B, S, heads, d] (any strides) -> [B, S, heads, d].

    SDPA reads them through transposed views: no copy into [B, heads, S, d] (the CPU flash kernel runs as fast on
    these strides), and its output comes back in [B, S, heads, d] memory order, ready for the projection."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def use_tiled(q, kernel: str = "auto", needs_grad: bool = True, kv_len: int | None = None) -> bool:
    """Whether `attention` takes the tiled kernel for q [B, S, heads, d] and kv_len keys (default S; see the module
    docstring)."""
    if kernel not in KERNELS:
        raise ValueError(f"attention kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "sdpa" or torch.compiler.is_compiling():
        return False
    if kernel == "tiled":
        return True
    b, s, heads, _ = q.shape
    kv_len = s if kv_len is None else kv_len
    shortest = TILED_MIN_TOKENS_ONE_THREAD.get(q.dtype, 0) if torch.get_num_threads() == 1 else 0
    longest = TILED_MAX_TOKENS.get(q.dtype, 0)
    if not needs_grad:
        longest = min(longest, TILED_MAX_TOKENS_NO_GRAD.get(q.dtype, longest))
    if q.device.type != "cpu" or not shortest <= kv_len <= longest:
        return False
    return not needs_grad or b * heads * s * kv_len * q.element_size() <= TILED_MAX_SAVED_BYTES


def attention(q, k, v, kernel: str = "auto"):
    """Full attention; q [B, S, heads, d], k, v [B, S_kv, heads, d] (any strides) -> [B, S, heads, d]."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if q.numel() == 0 or not use_tiled(q, kernel, needs_grad, k.shape[1]):
        return sdpa_attention(q, k, v)
    b, s, heads, d = q.shape
    pairs = [t.transpose(1, 2).reshape(b * heads, t.shape[1], d).contiguous() for t in (q, k, v)]  # [B*heads, S, d]
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


def _tile(n: int, s: int, dtype, s_kv: int | None = None) -> int:
    """How many (sample, head) pairs one tile of scores (s x s_kv, default s x s) holds."""
    pair = max(1, s * (s if s_kv is None else s_kv) * dtype.itemsize)
    per_thread = min(torch.get_num_threads(), TILE_BYTES_ONE_PAIR_PER_THREAD // pair)
    return max(1, min(n, max(TILE_BYTES // pair, per_thread)))


def _hi_lo(x, dtype):
    """x [c, S] (float32 or wider) -> [c, S, 2] in `dtype` with hi + lo = x to about twice dtype's precision."""
    hi = x.to(dtype)
    return torch.stack([hi, (x - hi.to(x.dtype)).to(dtype)], -1)


class _TiledAttention(torch.autograd.Function):
    """q [N, S, d], k, v [N, S_kv, d] contiguous (N = batch x heads) -> O [N, S, d]; see the module docstring.

    Every matmul writes into its destination (`out=`): the output's and the gradients' tiles, a kept tile of
    probabilities, and in the backward one dS buffer reused by all tiles, so no tile-sized temporaries are
    allocated and copied (fresh multi-MiB outputs cost page faults and cache misses: 1.1-1.3x the matmul)."""

    @staticmethod
    def forward(ctx, q, k, v, keep: bool):
        (n, s, d), s_kv = q.shape, k.shape[1]
        half = q.element_size() < 4
        scale = d**-0.5
        # The scores are float32 in every dtype: in half precision from float32 copies of q and k (one float32
        # matmul costs less than the two half-precision ones that a rounding-safe S - rowmax would need), and the
        # probabilities are rounded once, after the softmax. The 1 / sqrt(d) is the matmul's alpha.
        qf, kf = (q.float(), k.float()) if half else (q, k)
        c = _tile(n, s, torch.float32, s_kv)
        out = torch.empty_like(q)
        probs = []
        scores = None
        for i in range(0, n, c):
            j = min(n, i + c)
            if scores is None or scores.shape[0] != j - i or (keep and not half):
                scores = qf.new_empty(j - i, s, s_kv)  # float32 keeps each tile; half reuses one float32 tile
            torch.baddbmm(scores, qf[i:j], kf[i:j].transpose(1, 2), beta=0, alpha=scale, out=scores)
            p = torch._softmax(scores, -1, False, out=scores)
            if half:
                p = p.to(q.dtype)
            torch.bmm(p, v[i:j], out=out[i:j])
            if keep:
                probs.append(p)
        if keep:  # the backward's half path takes q pre-scaled (see there)
            ctx.save_for_backward(q * scale if half else q, k, v, out, *probs)
            ctx.scale, ctx.tile = scale, c
        return out

    @staticmethod
    def backward(ctx, g):
        qs, k, v, out, *probs = ctx.saved_tensors
        g = g.contiguous()
        n, c = qs.shape[0], ctx.tile
        half = qs.element_size() < 4
        acc = torch.promote_types(qs.dtype, torch.float32)
        dq, dk, dv = torch.empty_like(qs), torch.empty_like(k), torch.empty_like(v)
        # D = rowsum(dP * P) = rowsum(dO * O), for all pairs at once
        rowsum = (g.to(acc) * out.to(acc)).sum(-1, keepdim=True)
        ds = None
        for t, i in enumerate(range(0, n, c)):
            j = min(n, i + c)
            p = probs[t]
            if ds is None or ds.shape[0] != j - i:
                ds = torch.empty_like(p)
            torch.bmm(p.transpose(1, 2), g[i:j], out=dv[i:j])
            # dS = P * (dP - D): one matmul gives dP - D, accumulated in float32 and rounded once. In half
            # precision D enters as two extra columns of dO (hi + lo); in float32 as baddbmm's added input.
            if half:
                ga = _augment(g[i:j], -_hi_lo(rowsum[i:j, :, 0], g.dtype))
                torch.bmm(ga, _augment(v[i:j], 1.0).transpose(1, 2), out=ds)
            else:
                torch.baddbmm(rowsum[i:j].neg(), g[i:j], v[i:j].transpose(1, 2), out=ds)
            ds.mul_(p)
            if half:  # qs = q * scale
                torch.bmm(ds, k[i:j], out=dq[i:j])
                torch.bmm(ds.transpose(1, 2), qs[i:j], out=dk[i:j])
            else:  # qs = q: both gradients take the scale as alpha
                torch.baddbmm(dq[i:j], ds, k[i:j], beta=0, alpha=ctx.scale, out=dq[i:j])
                torch.baddbmm(dk[i:j], ds.transpose(1, 2), qs[i:j], beta=0, alpha=ctx.scale, out=dk[i:j])
        return dq.mul_(ctx.scale) if half else dq, dk, dv, None
