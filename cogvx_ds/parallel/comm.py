"""Autograd-aware collectives for the DiT's TP and SP paths (work on gloo and NCCL).

Gradient convention: under SP every rank's backward computes its *share* of the gradient (the part flowing
from its own video tokens); the shares of one sample sum to the full gradient, which is what ZeRO's reduction
over the DP x SP group needs. These ops keep that convention at the places where tensors are replicated.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _size(group) -> int:
    return dist.get_world_size(group) if group is not None else 1


class _CopyToGroup(torch.autograd.Function):
    """Forward: identity. Backward: sum the gradient over the group.

    For a tensor that is replicated on every rank of the group but whose uses differ per rank: model inputs
    under SP (each rank uses its own tokens) and the QK-LayerNorm weights under TP (each rank normalises its own
    heads with the shared weights). The summed gradient is then the full one, identical on every rank.
    """

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def copy_to_group(x: torch.Tensor, group) -> torch.Tensor:
    return x if _size(group) == 1 else _CopyToGroup.apply(x, group)


class _GatherAlongDim(torch.autograd.Function):
    """Forward: all-gather and concatenate along `dim` in rank order; the ranks' sizes along `dim` may differ
    (`sizes`, one per rank: the parts are padded to the largest for the collective and trimmed after).

    Backward "split": keep this rank's chunk of the incoming gradient. Right when every rank then computes the
    same function of the gathered tensor (a replicated loss), so each rank's copy of the gradient is complete.
    Backward "sum": sum the gradients over the group first, then keep this rank's chunk. Right when each rank
    uses the gathered tensor differently (replicated text tokens that feed rank-local losses).
    """

    @staticmethod
    def forward(ctx, x, dim, group, grad_mode, sizes):
        ctx.dim, ctx.group, ctx.grad_mode, ctx.sizes = dim, group, grad_mode, sizes
        longest = max(sizes)
        x = x.contiguous()
        if x.shape[dim] < longest:
            pad = list(x.shape)
            pad[dim] = longest - x.shape[dim]
            x = torch.cat([x, x.new_zeros(pad)], dim)
        parts = [torch.empty_like(x) for _ in sizes]
        dist.all_gather(parts, x, group=group)
        return torch.cat([part.narrow(dim, 0, n) for part, n in zip(parts, sizes)], dim=dim)

    @staticmethod
    def backward(ctx, grad):
        if ctx.grad_mode == "sum":
            grad = grad.contiguous()
            dist.all_reduce(grad, group=ctx.group)
        rank = dist.get_rank(ctx.group)
        chunk = grad.narrow(ctx.dim, sum(ctx.sizes[:rank]), ctx.sizes[rank])
        return chunk.contiguous(), None, None, None, None


def gather_along_dim(x: torch.Tensor, dim: int, group, grad_mode: str = "split", sizes=None) -> torch.Tensor:
    """All-gather x along `dim` over `group` (autograd-aware, see _GatherAlongDim). `sizes`: every rank's size
    along `dim` when they differ (default: all equal to this rank's)."""
    if grad_mode not in ("split", "sum"):
        raise ValueError(f"grad_mode must be 'split' or 'sum', got {grad_mode!r}")
    if _size(group) == 1:
        return x
    sizes = [x.shape[dim]] * _size(group) if sizes is None else [int(n) for n in sizes]
    if len(sizes) != _size(group) or sizes[dist.get_rank(group)] != x.shape[dim]:
        raise ValueError(f"sizes {sizes} must list every rank's size along dim {dim} (this rank: {x.shape[dim]})")
    return _GatherAlongDim.apply(x, dim, group, grad_mode, sizes)
