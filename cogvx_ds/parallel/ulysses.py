"""Ulysses sequence-parallel attention over a sharded [text; video] stream.

Each SP rank holds its own slice of the text tokens and of the video tokens (`CogVideoXTransformer` splits both),
so no token-local work (AdaLN, QKV, MLP) is repeated across SP ranks. For attention one all-to-all moves q, k and
v together from (local tokens, all heads) to (all tokens, heads/SP); the ranks' slices may differ in length (the
text count need not divide by SP). The gathered sequence is every rank's [text; video] slice in rank order:
attention has no positional bias (RoPE is applied before), so any token order gives the same per-token result.
A second all-to-all returns each token's output to its rank.

Layout work is kept to one copy per direction: q, k, v are packed once into the send buffer, and with one
sample per micro-batch the received buffer is already [tokens, 3, heads, d], so SDPA reads q, k, v as strided
views of it without a copy (the CPU tiled kernel, `cogvx_ds.models.dit.attention`, copies them per head anyway).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def _pack(xs, sp: int) -> torch.Tensor:
    """[B, S, H, d] tensors -> one send buffer [SP, B, S, len(xs), H/SP, d] (a single pass over the data)."""
    b, s, heads, d = xs[0].shape
    send = xs[0].new_empty(sp, b, s, len(xs), heads // sp, d)
    for i, x in enumerate(xs):
        send[:, :, :, i] = x.unflatten(-2, (sp, heads // sp)).movedim(-3, 0)
    return send


def _to_heads(x, sizes: list[int], group) -> torch.Tensor:
    """x: a send buffer [SP, B, S_local, *M, H/SP, d] (see `_pack`) -> [B, sum(sizes), *M, H/SP, d]: rank r's
    tokens (sizes[r] of them) in rank order, this rank's heads."""
    sp, rank = dist.get_world_size(group), dist.get_rank(group)
    b, mid, (h, d) = x.shape[1], x.shape[3:-2], x.shape[-2:]
    row = math.prod(mid) * h * d * b
    recv = x.new_empty(sum(sizes) * row)
    dist.all_to_all_single(recv, x.view(-1), [n * row for n in sizes], [sizes[rank] * row] * sp, group=group)
    parts = [p.view(b, n, *mid, h, d) for p, n in zip(recv.split([n * row for n in sizes]), sizes)]
    return recv.view(1, sum(sizes), *mid, h, d) if b == 1 else torch.cat(parts, 1)


def _from_heads(y: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """The inverse of `_to_heads`: [B, sum(sizes), *M, H/SP, d] -> [B, S_local, *M, H, d]."""
    sp, rank = dist.get_world_size(group), dist.get_rank(group)
    b, mid, (h, d) = y.shape[0], y.shape[2:-2], y.shape[-2:]
    row = math.prod(mid) * h * d * b
    send = y.contiguous() if b == 1 else torch.cat([p.contiguous().flatten() for p in y.split(sizes, 1)])
    recv = y.new_empty(sp, b, sizes[rank], *mid, h, d)
    dist.all_to_all_single(recv.view(-1), send.view(-1), [sizes[rank] * row] * sp, [n * row for n in sizes],
                           group=group)
    return recv.movedim(0, -3).flatten(-3, -2)


class _QKVToHeads(torch.autograd.Function):
    """q, k, v [B, S_local, H, d] -> [B, S_total, 3, H/SP, d] in one all-to-all."""

    @staticmethod
    def forward(ctx, q, k, v, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        return _to_heads(_pack((q, k, v), dist.get_world_size(group)), sizes, group)

    @staticmethod
    def backward(ctx, g):
        return (*_from_heads(g, ctx.sizes, ctx.group).unbind(2), None, None)


class _FromHeads(torch.autograd.Function):
    """[B, S_total, H/SP, d] -> [B, S_local, H, d]."""

    @staticmethod
    def forward(ctx, y, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        return _from_heads(y, sizes, group)

    @staticmethod
    def backward(ctx, g):
        return _to_heads(_pack((g,), dist.get_world_size(ctx.group)), ctx.sizes, ctx.group)[:, :, 0], None, None


def ulysses_attention(q, k, v, sizes: list[int], group, attention):
    """q, k, v [B, S_local, H, d] of this rank's tokens -> attention output [B, S_local, H, d] over the tokens of
    all SP ranks (rank r holds sizes[r] tokens). `attention(q, k, v)` works on [B, S, heads, d]."""
    if q.shape[-2] % dist.get_world_size(group):
        raise ValueError(f"{q.shape[-2]} local attention heads cannot be split over "
                         f"{dist.get_world_size(group)} sequence-parallel ranks")
    qkv = _QKVToHeads.apply(q, k, v, sizes, group)  # [B, S_total, 3, H/SP, d]
    out = attention(*qkv.unbind(2))
    return _FromHeads.apply(out, sizes, group)

