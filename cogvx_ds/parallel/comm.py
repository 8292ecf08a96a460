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
    """Forward: all-gather and concatenate along `dim` in rank order.

    Backward "split": keep this rank's chunk of the incoming gradient. Right when every rank then computes the
    same function of the gathered tensor (a replicated loss), so each rank's copy of the gradient is complete.
    Backward "sum": sum the gradients over the group first, then keep this rank's chunk. Right when each rank
    uses the gathered tensor differently (replicated text tokens that feed rank-local losses).
    """

    @staticmethod
    def forward(ctx, x, dim, group, grad_mode):
        ctx.dim, ctx.group, ctx.grad_mode = dim, group, grad_mode
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        if ctx.grad_mode == "sum":
            grad = grad.contiguous()
            dist.all_reduce(grad, group=ctx.group)
        chunk = grad.chunk(dist.get_world_size(ctx.group), dim=ctx.dim)[dist.get_rank(ctx.group)]
        return chunk.contiguous(), None, None, None


def gather_along_dim(x: torch.Tensor, dim: int, group, grad_mode: str = "split") -> torch.Tensor:
    if grad_mode not in ("split", "sum"):
        raise ValueError(f"grad_mode must be 'split' or 'sum', got {grad_mode!r}")
    return x if _size(group) == 1 else _GatherAlongDim.apply(x, dim, group, grad_mode)
