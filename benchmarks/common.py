"""Helpers shared by the benchmarks: timing, matmul peak, table printing, JSON results."""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def timeit(fn, warmup: int = 1, reps: int = 5) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def matmul_peak_gflops(dtype: torch.dtype, n: int = 1536, reps: int = 5) -> float:
    """This machine's dense matmul rate (GFLOP/s) for square n x n matrices: the ceiling for linear layers."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    best = min(timeit(lambda: a @ b, warmup=2, reps=reps))
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
