"""Measurements that check `cogvx_ds.perf_model` against reality (used by benchmarks/memory.py and the tests).

- `saved_tensor_bytes`: bytes of the distinct storages autograd saves for backward during a forward
  (torch.autograd.graph.saved_tensors_hooks), weights and other constants excluded.
- `live_bytes`: net CPU allocation of a call (the profiler's memory events): what the forward leaves alive, a
  cross-check independent of autograd's bookkeeping. Under gloo it reads a few MiB high: tensors whose last
  reference dies on a gloo thread are freed where the profiler does not record.
- `zero3_state_bytes`: the partitions a DeepSpeed ZeRO-3 engine really holds on this rank.
"""

from __future__ import annotations

import torch


def model_constants(model: torch.nn.Module) -> list[torch.Tensor]:
    """Tensors that live with the model, not with one forward: parameters, buffers, cached position tables."""
    consts = list(model.parameters()) + list(model.buffers())
    for entry in getattr(model, "_pos_cache", {}).values():
        consts += [t for t in entry if isinstance(t, torch.Tensor)]
    return consts


def saved_tensor_bytes(fn, exclude: list[torch.Tensor] = ()):
    """Run `fn()`; return (its result, bytes of the unique storages saved for backward, `exclude` left out).

    Counted by storage, not by tensor: a saved view keeps its whole base alive."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def live_bytes(fn):
    """Run `fn()` under the CPU memory profiler; return (its result, bytes allocated and still alive after it).

    Garbage is collected first and the collector paused meanwhile: earlier garbage (an autograd graph held by a
    reference cycle) freed inside the window would count as negative bytes."""
    import gc

    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn()
    finally:
        if enabled:
            gc.enable()
    return out, sum(e.self_cpu_memory_usage for e in prof.events())


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def zero3_state_bytes(engine) -> dict:
    """Bytes of model state this rank holds in a ZeRO-3 engine (after at least one optimizer step):
    params = the bf16/fp32 parameter partitions (`p.ds_tensor`), grads = the gradient partition buffer,
    master = fp32 master partitions, adam = the optimizer's moment tensors; persistent = small parameters kept
    gathered in full (ZeRO-3's persistence threshold); bucket = the reduce bucket (a working buffer)."""
    opt = engine.optimizer
    params = list(engine.module.parameters())
    out = {"params": sum(_nbytes(p.ds_tensor) for p in params),
           "grads": _nbytes(opt.grad_partitions_flat_buffer),
           "master": sum(_nbytes(t) for t in opt.fp32_partitioned_groups_flat
                         if t.data_ptr() not in {f.data_ptr() for f in opt.fp16_partitioned_groups_flat}),
           "adam": sum(_nbytes(v) for flat in opt.fp32_partitioned_groups_flat
                       for v in opt.optimizer.state.get(flat, {}).values() if torch.is_tensor(v) and v.dim() > 0),
           "persistent": sum(_nbytes(p.data) for p in params if getattr(p, "ds_persist", False)),
           "bucket": sum(_nbytes(b.buffer) for b in getattr(opt, "ipg_buckets", {}).values()
                         if getattr(b, "buffer", None) is not None)}
    out["model_states"] = out["params"] + out["grads"] + out["master"] + out["adam"]
    return out
