"""torchrun worker for tests/test_dit_distributed.py: one forward/backward of the DiT under TP x SP.

Each rank writes rank<R>.safetensors with the (gathered) output, the input gradients and the full parameter
gradients: SP shares summed over the SP group, TP shards gathered into diffusers layout.
"""

import argparse
import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import layers as megatron_layers
from safetensors.torch import load_file, save_file

from cogvx_ds.checkpoint.layout import diffusers_keys, gather_full
from cogvx_ds.config import ConfigError
from cogvx_ds.models import CogVideoXTransformer
from cogvx_ds.models.dit import linear as linear_mod
from cogvx_ds.parallel import init_distributed, state

_UNPATCHED_CURRENT_DEVICE = torch.cuda.current_device  # before init_distributed installs the CPU shim

ap = argparse.ArgumentParser()
ap.add_argument("--tp", type=int, required=True)
ap.add_argument("--sp", type=int, required=True)
ap.add_argument("--case", action="append", required=True, help="a folder with model/ and inputs.safetensors")
args = ap.parse_args()

# Count the local matmuls by kernel: on an x86 CPU with oneDNN every TP linear must take our oneDNN path
# (cogvx_ds.models.dit.layers._linear_impl) with Megatron's communication kept, not Megatron's own matmul.
calls = {"onednn": 0, "megatron": 0}


def _counting(key, fn):
    def wrapped(*a, **k):
        calls[key] += 1
        return fn(*a, **k)
    return wrapped


linear_mod._onednn = _counting("onednn", linear_mod._onednn)
megatron_layers.linear_with_grad_accumulation_and_async_allreduce = _counting(
    "megatron", megatron_layers.linear_with_grad_accumulation_and_async_allreduce)

init_distributed(args.tp, args.sp, backend="gloo")
for case in map(Path, args.case):
    # a "-tiled" case runs every attention on the CPU tiled kernel (models.dit.attention; under SP it gets the
    # all-to-all's strided q/k/v views); the single-process reference stays on SDPA
    overrides = {"cpu_attention": "tiled"} if case.name.endswith("-tiled") else {}
    model = CogVideoXTransformer.from_diffusers(case / "model", **overrides)
    inputs = load_file(str(case / "inputs.safetensors"))
    x, text = inputs["x"].requires_grad_(True), inputs["text"].requires_grad_(True)
    out = model(x, text, inputs["t"])
    (out * inputs["probe"]).sum().backward()

    result = {"out": out.detach(), "gx": x.grad, "gt": text.grad}
    for name, p in model.named_parameters():
        grad = p.grad.clone()
        dist.all_reduce(grad, group=state.sp_group())  # per-rank shares sum to the full gradient
        for key, g in zip(diffusers_keys(name), gather_full(name, grad)):
            result[f"grad.{key}"] = g
    save_file({k: v.contiguous() for k, v in result.items()}, str(case / f"rank{dist.get_rank()}.safetensors"))
    model.save_diffusers(case / "saved")
    if args.tp > 1:
        assert calls["megatron"] == 0 if linear_mod.onednn_available() else calls["megatron"] > 0, calls
        assert calls["onednn"] > 0 if linear_mod.onednn_available() else calls["onednn"] == 0, calls

# An invalid split must fail at construction with a message naming the field.
bad = dataclasses.replace(model.config, num_attention_heads=6, attention_head_dim=16)
if args.tp * args.sp > 2:
    try:
        CogVideoXTransformer(bad)
        raise SystemExit("expected ConfigError for 6 heads over TP x SP")
    except ConfigError as e:
        assert "model.num_attention_heads" in str(e) and "divisible" in str(e), e


def check_cpu_shim(out: Path) -> None:
    """Megatron-core's sequence-parallel gather/reduce-scatter allocate on torch.cuda.current_device():
    they fail on this CUDA-less machine without the shim and give the right result with it."""
    from megatron.core.tensor_parallel import mappings

    group, rank = state.tp_group(), state.tp_rank()
    x = torch.arange(4.0).reshape(2, 2) + 10 * rank  # [seq/TP, hidden]
    shim = torch.cuda.current_device
    torch.cuda.current_device = _UNPATCHED_CURRENT_DEVICE
    try:
        mappings.gather_from_sequence_parallel_region(x, group=group)
        raise SystemExit("expected Megatron's SP gather to fail without the CPU shim")
    except (RuntimeError, AssertionError, AttributeError):
        pass
    finally:
        torch.cuda.current_device = shim
    full = mappings.gather_from_sequence_parallel_region(x, group=group)
    assert torch.equal(full, torch.cat([torch.arange(4.0).reshape(2, 2) + 10 * r for r in range(2)])), full
    back = mappings.reduce_scatter_to_sequence_parallel_region(full, group=group)
    assert torch.equal(back, 2 * x), back
    (out / f"shim_ok_rank{dist.get_rank()}").write_text("ok")


if args.tp == 2 and args.sp == 1:
    check_cpu_shim(Path(args.case[0]))
dist.barrier()
dist.destroy_process_group()
