"""Helpers shared by the benchmarks: timing, matmul peak, table printing, JSON results."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

# COGVX_BENCH_RESULTS redirects the JSON (the tests' smoke runs use it so they never overwrite real results)
RESULTS = Path(os.environ.get("COGVX_BENCH_RESULTS", Path(__file__).parent / "results"))


def timeit(fn, warmup: int = 1, reps: int = 5, clock=time.perf_counter) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return times


def device_clock(device: torch.device, clock=time.perf_counter):
    """A clock that waits for the device's queued work first (CUDA kernels run asynchronously)."""
    if device.type != "cuda":
        return clock

    def synced():
        torch.cuda.synchronize(device)
        return clock()
    return synced


def matmul_peak_gflops(dtype: torch.dtype, n: int = 1536, reps: int = 5, clock=time.perf_counter,
                       device: torch.device | str = "cpu") -> float:
    """This machine's dense matmul rate (GFLOP/s) for square n x n matrices: the ceiling for linear layers. On the
    CPU, the faster of aten's matmul (MKL on x86) and, where the DiT uses it, oneDNN's float32 linear: the peak is
    the machine's, not one library's. On a GPU (the MFU denominator), timed with device synchronisation."""
    from cogvx_ds.models.dit.linear import onednn_available

    device = torch.device(device)
    clock = device_clock(device, clock)
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    kernels = [lambda: a @ b]
    if device.type == "cpu" and dtype == torch.float32 and onednn_available():
        kernels.append(lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""))
    best = min(min(timeit(k, warmup=2, reps=reps, clock=clock)) for k in kernels)
    return 2 * n**3 / best / 1e9


def median(xs):
    return statistics.median(xs)


def print_table(rows: list[dict], columns: list[tuple[str, str]]) -> None:
    widths = [max(len(title), *(len(fmt.format(r[key])) for r in rows)) for key, (title, fmt) in
              ((c[0], (c[1], c[2] if len(c) > 2 else "{}")) for c in columns)]
    print("  ".join(c[1].rjust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join((c[2] if len(c) > 2 else "{}").format(r[c[0]]).rjust(w) for c, w in zip(columns, widths)))


def write_results(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = dict(payload, machine={"cpu": platform.processor() or platform.machine(),
                                     "threads": torch.get_num_threads(), "torch": torch.__version__})
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


# ---- per-op breakdown -----------------------------------------------------------------------------------------

_MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmv", "aten::mv",
            "mkldnn::_linear_pointwise"}  # the oneDNN linear of cogvx_ds.models.dit.linear
_COPIES = {"aten::copy_", "aten::cat", "aten::fill_", "aten::zero_", "aten::clone", "aten::contiguous",
           "aten::stack", "aten::flip", "aten::_to_copy", "aten::index", "aten::index_put_", "aten::slice_backward",
           "aten::select_backward", "aten::new_zeros", "aten::zeros", "aten::zeros_like", "aten::where"}


# ops run inside these autograd Functions (the CPU tiled attention kernel: matmuls, softmax) count as attention
_ATTENTION_SCOPES = ("_TiledAttention", "_TiledAttentionBackward")


def _in_attention_scope(evt) -> bool:
    parent = evt.cpu_parent
    while parent is not None:
        if parent.name in _ATTENTION_SCOPES:
            return True
        parent = parent.cpu_parent
    return False


def _category(name: str) -> str:
    if name in _MATMULS:
        return "linear"
    if "scaled_dot_product" in name or "flash_attention" in name or "efficient_attention" in name:
        return "attention"
    if "layer_norm" in name or "group_norm" in name:
        return "norm"
    if "convolution" in name:
        return "conv"
    if name in _COPIES:
        return "copies"
    if name.startswith("aten::"):
        return "elementwise"
    return "other"


def _gemm_dims(shapes) -> tuple[int, int, int]:
    """(rows, inner, cols) of a oneDNN linear from its recorded input shapes."""
    from cogvx_ds.models.dit.linear import gemm_dims

    return gemm_dims(shapes[0], shapes[1])


def _matmul_flops(name: str, shapes) -> float:
    shapes = [s for s in shapes if s]
    if name == "mkldnn::_linear_pointwise":
        m, k, n = _gemm_dims(shapes)
        return 2.0 * m * k * n
    if name in ("aten::mm", "aten::bmm"):
        a, b = shapes[0], shapes[1]
    elif name in ("aten::addmm", "aten::baddbmm"):
        a, b = shapes[1], shapes[2]
    else:  # matrix-vector
        a, b = shapes[-2], shapes[-1] + [1]
    batch = a[0] if len(a) == 3 else 1
    return 2.0 * batch * a[-2] * a[-1] * b[-1]


def _is_large(name: str, shapes) -> bool:
    """A matmul with every dimension >= 256: in a DiT step, the transformer blocks' QKV / out / MLP linears (and
    their backward), as opposed to the narrow patch / output / text projections and the per-sample AdaLN GEMVs."""
    shapes = [s for s in shapes if s]
    if name == "mkldnn::_linear_pointwise":
        return min(_gemm_dims(shapes)) >= 256
    a, b = (shapes[0], shapes[1]) if name in ("aten::mm", "aten::bmm") else (shapes[-2], shapes[-1])
    return min(a[-2], a[-1], b[-1]) >= 256


def op_breakdown(fn, steps: int = 3, peak_dtype: torch.dtype = torch.float32) -> dict:
    """Profile `fn` (e.g. forward + backward) `steps` times: self time (ms, wall) per op category, and the matmul
    ops' achieved GFLOP/s (FLOPs from the recorded shapes over their kernel time) as a percentage of the matmul
    peak in `peak_dtype` (the dtype the matmuls run in) measured (wall clock) right before each profiled call, for
    all matmuls and for the large ones (see `_is_large`). Medians over the calls."""
    from torch.profiler import ProfilerActivity, profile

    per_call = []
    for _ in range(steps):
        peak = matmul_peak_gflops(peak_dtype, reps=3)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            fn()
        ms: dict[str, float] = {}
        flops, us = [0.0, 0.0], [0.0, 0.0]  # all matmuls, large ones
        for evt in prof.events():
            cat = "attention" if evt.name in _ATTENTION_SCOPES or _in_attention_scope(evt) else _category(evt.name)
            ms[cat] = ms.get(cat, 0.0) + evt.self_cpu_time_total / 1e3
            if cat == "linear":
                f = _matmul_flops(evt.name, evt.input_shapes)
                large = _is_large(evt.name, evt.input_shapes)
                for k in (0, 1) if large else (0,):
                    flops[k] += f
                    us[k] += evt.self_cpu_time_total
        gflops = [f / (u * 1e-6) / 1e9 if u else 0.0 for f, u in zip(flops, us)]
        per_call.append((ms, gflops, peak, flops[1] / flops[0] if flops[0] else 0.0))
    cats = sorted({c for ms, *_ in per_call for c in ms})
    ms = {c: median([m.get(c, 0.0) for m, *_ in per_call]) for c in cats}
    return {"ms": ms, "total_ms": sum(ms.values()), "peak_gflops": median([p for _, _, p, _ in per_call]),
            "peak_dtype": str(peak_dtype).replace("torch.", ""),
            "linear_gflops": median([g[0] for _, g, _, _ in per_call]),
            "linear_pct_of_peak": median([100 * g[0] / p for _, g, p, _ in per_call]),
            "large_linear_gflops": median([g[1] for _, g, _, _ in per_call]),
            "large_linear_pct_of_peak": median([100 * g[1] / p for _, g, p, _ in per_call]),
            "large_linear_flop_share": median([s for *_, s in per_call])}
