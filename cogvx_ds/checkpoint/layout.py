"""The one mapping between our parameters and the diffusers-format (full, unsharded) state dict.

Every weight path goes through here: random init, diffusers and SAT loading, diffusers saving. Each of our
parameters corresponds to one or three diffusers tensors and has a TP kind:
  rep  replicated on every TP rank         col  rows split over TP (ColumnParallelLinear)
  row  columns split over TP (RowParallel)  qkv  to_q/to_k/to_v, each split by heads; this rank holds [q; k; v]
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import torch
import torch.distributed as dist

from cogvx_ds.parallel import state

_RENAMES = [(".attn.norm_", ".attn1.norm_"), (".attn.proj.", ".attn1.to_out.0."), (".mlp.fc1.", ".ff.net.0.proj."),
            (".mlp.fc2.", ".ff.net.2.")]


def diffusers_keys(name: str) -> list[str]:
    """Our parameter name -> its diffusers key(s)."""
    if name.startswith("blocks."):
        name = "transformer_blocks." + name[len("blocks."):]
    if ".attn.qkv." in name:
        base, suffix = name.split(".attn.qkv.")
        return [f"{base}.attn1.to_{x}.{suffix}" for x in "qkv"]
    for ours, theirs in _RENAMES:
        name = name.replace(ours, theirs)
    return [name]


def tp_kind(name: str) -> str:
    if ".attn.qkv." in name:
        return "qkv"
    if ".mlp.fc1." in name:
        return "col"
    if name.endswith((".attn.proj.weight", ".mlp.fc2.weight")):
        return "row"
    return "rep"


def full_shapes(name: str, local_shape: torch.Size, tp: int) -> list[tuple]:
    kind, shape = tp_kind(name), list(local_shape)
    if kind == "qkv":
        return [tuple([shape[0] // 3 * tp] + shape[1:])] * 3
    if kind == "col":
        return [tuple([shape[0] * tp] + shape[1:])]
    if kind == "row":
        return [tuple([shape[0], shape[1] * tp])]
    return [tuple(shape)]


def to_local(name: str, full: list[torch.Tensor], rank: int, tp: int) -> torch.Tensor:
    kind = tp_kind(name)
    if kind == "qkv":
        return torch.cat([t.chunk(tp, 0)[rank] for t in full], 0)
    if kind == "col":
        return full[0].chunk(tp, 0)[rank]
    if kind == "row":
        return full[0].chunk(tp, 1)[rank]
    return full[0]


def to_full(name: str, parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Inverse of to_local: `parts` are the local tensors of TP ranks 0..tp-1."""
    kind = tp_kind(name)
    if kind == "qkv":
        per_rank = [p.chunk(3, 0) for p in parts]
        return [torch.cat([r[i] for r in per_rank], 0) for i in range(3)]
    if kind == "col":
        return [torch.cat(parts, 0)]
    if kind == "row":
        return [torch.cat(parts, 1)]
    return [parts[0]]


# ---------------------------------------------------------------------------------------------------------------
# writing into (possibly ZeRO-3-partitioned) parameters and reading them back


def _is_zero3(p: torch.nn.Parameter) -> bool:
    return hasattr(p, "ds_id")


def assign_local(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    if _is_zero3(param):
        import deepspeed

        # modifier_rank is a rank *within* the parameter's partition group (DP x SP); with TP, each TP slice has
        # its own group. Every rank holds the same value, so all copy and rank 0 of the group broadcasts.
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            param.data.copy_(value.to(param.dtype))
        return
    with torch.no_grad():
        param.copy_(value.to(device=param.device, dtype=param.dtype))


def gather_full(name: str, param: torch.nn.Parameter) -> list[torch.Tensor]:
    """The diffusers tensors of one parameter, gathered over ZeRO-3 partitions and TP ranks (all ranks call)."""
    if _is_zero3(param):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param]):
            local = param.data.detach().clone()
    else:
        local = param.detach()
    tp = state.tp_size()
    if tp == 1 or tp_kind(name) == "rep":
        return to_full(name, [local.cpu()])
    local = local.contiguous()
    parts = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(parts, local, group=state.tp_group())
    return to_full(name, [p.cpu() for p in parts])


def _param_shape(param: torch.nn.Parameter) -> torch.Size:
    return param.ds_shape if _is_zero3(param) else param.shape


# ---------------------------------------------------------------------------------------------------------------
# loading a full diffusers-format state dict, and random init in the same format


class StateDictError(ValueError):
    pass


def check_state_dict(model: torch.nn.Module, source: Mapping, source_name: str = "state dict") -> None:
    """One error listing every missing, unexpected and mis-shaped key (shapes read without loading)."""
    tp = state.tp_size()
    expected = {}
    for name, p in model.named_parameters():
        for key, shape in zip(diffusers_keys(name), full_shapes(name, _param_shape(p), tp)):
            expected[key] = shape
    keys = set(source.keys())
    missing = sorted(set(expected) - keys)
    unexpected = sorted(keys - set(expected))
    misshaped = [f"{k}: expected {list(expected[k])}, got {list(_shape_of(source, k))}"
                 for k in sorted(set(expected) & keys) if tuple(_shape_of(source, k)) != tuple(expected[k])]
    if missing or unexpected or misshaped:
        lines = [f"{source_name} does not match the model ({model.config.num_layers} layers, "
                 f"width {model.config.inner_dim}):"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        raise StateDictError("\n".join(lines))


def _shape_of(source: Mapping, key: str):
    getter = getattr(source, "shape_of", None)
    return getter(key) if getter else source[key].shape


def load_full_state_dict(model: torch.nn.Module, source: Mapping, source_name: str = "state dict") -> None:
    """Fill the model from a full diffusers-format mapping; each rank keeps its TP shard."""
    check_state_dict(model, source, source_name)
    tp, rank = state.tp_size(), state.tp_rank()
    for name, p in model.named_parameters():
        full = [source[k] for k in diffusers_keys(name)]
        assign_local(p, to_local(name, full, rank, tp))


def full_state_dict(model: torch.nn.Module, dtype: torch.dtype | None = None,
                    keep: bool = True) -> dict[str, torch.Tensor]:
    """The diffusers-format state dict (all ranks call: the gathers are collective). keep=False takes part in the
    gathers and keeps nothing (the ranks that do not write: a whole 5B model on the host is 10-20 GB each)."""
    out = {}
    for name, p in model.named_parameters():
        for key, t in zip(diffusers_keys(name), gather_full(name, p)):
            if keep:
                out[key] = t.to(dtype) if dtype is not None else t
    return out


def _init_tensor(key: str, shape: tuple, cfg, seed: int) -> torch.Tensor:
    """Deterministic from (seed, key) alone, so every TP/SP layout starts from the same weights."""
    if key.endswith(".bias") or ".norm1.linear" in key or ".norm2.linear" in key or key.startswith(("norm_out.linear",
                                                                                                   "proj_out")):
        return torch.zeros(shape)  # biases; zero-initialised AdaLN modulations and output projection (DiT)
    if ".norm" in key or key.startswith("norm_final"):
        return torch.ones(shape)  # LayerNorm weights
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    std = cfg.init_std
    if key.endswith(("to_out.0.weight", "ff.net.2.weight")):
        std = std / math.sqrt(2 * cfg.num_layers)  # residual-branch outputs, as in Megatron/GPT-2
    if key == "patch_embed.proj.weight":
        fan_in, fan_out = math.prod(shape[1:]), shape[0]
        bound = math.sqrt(6.0 / (fan_in + fan_out))  # xavier-uniform on the flattened conv, as DiT does
        return torch.empty(shape).uniform_(-bound, bound, generator=gen)
    return torch.empty(shape).normal_(0.0, std, generator=gen)


def init_weights(model: torch.nn.Module, seed: int) -> None:
    tp, rank = state.tp_size(), state.tp_rank()
    for name, p in model.named_parameters():
        full = [_init_tensor(k, s, model.config, seed)
                for k, s in zip(diffusers_keys(name), full_shapes(name, _param_shape(p), tp))]
        assign_local(p, to_local(name, full, rank, tp))
