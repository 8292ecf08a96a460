"""Attention kernels on the CPU: the tiled-math kernel against torch SDPA (forward + backward), per dtype, thread
count and shape, next to what `model.cpu_attention=auto` picks for that shape (cogvx_ds.models.dit.attention).

The route's thresholds (TILED_MAX_TOKENS per dtype, TILED_MIN_TOKENS_ONE_THREAD) come from tables like this one; on
another CPU, run it to see whether they still hold. q, k, v are views of one [B, S, 3, heads, d] tensor, as in the
model. The two kernels alternate within every round (the order rotates) and the table gives the median of the
per-round ratios (SDPA time / tiled time: > 1 means the tiled kernel is faster), so machine noise hits both alike.

    python benchmarks/attention.py                                  # default shapes, fp32 + bf16, 2 and 1 threads
    python benchmarks/attention.py --dtypes fp32 --threads 1 --shapes 32x124x2x32 1x1088x8x64
    python benchmarks/attention.py --no-grad                        # forward only, as in sampling
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import median, print_table, write_results  # noqa: E402

# batch x tokens x heads x head_dim: around the float32 range (512-1,536 tokens), the benchmark DiT (1,088), longer
# sequences, and the demo's many short ones (LQ 64 tokens, HQ 124 tokens; 2 heads per rank under SP=2)
SHAPES = ["1x256x8x64", "1x512x8x64", "1x1088x8x64", "1x1536x8x64", "1x2048x8x64", "32x124x4x32", "32x124x2x32",
          "32x64x4x32"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _shape(text: str) -> tuple[int, int, int, int]:
    try:
        b, s, h, d = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"shape {text!r}: expected BATCHxTOKENSxHEADSxHEAD_DIM, e.g. 1x1088x8x64") from None
    return b, s, h, d


def compare(shape, dtype, rounds: int, grad: bool = True) -> dict:
    """Median times (ms) of forward + backward (forward only under no_grad with grad=False, as in sampling) on each
    kernel and the median per-round ratio SDPA / tiled."""
    from cogvx_ds.models.dit.attention import attention, use_tiled

    b, s, h, d = shape
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(b, s, 3, h, d, generator=g).to(dtype).requires_grad_(grad)
    cot = torch.randn(b, s, h, d, generator=g).to(dtype)

    def run(kernel):
        if not grad:
            with torch.no_grad():
                attention(*qkv.unbind(2), kernel=kernel)
            return
        qkv.grad = None
        attention(*qkv.unbind(2), kernel=kernel).backward(cot)

    kernels = ["tiled", "sdpa"]
    for k in kernels:  # warm-up
        run(k)
    times = {k: [] for k in kernels}
    for r in range(rounds):
        for k in kernels[r % 2:] + kernels[:r % 2]:
            t0 = time.perf_counter()
            run(k)
            times[k].append(time.perf_counter() - t0)
    ratios = [a / t for a, t in zip(times["sdpa"], times["tiled"])]
    return {"tiled_ms": 1e3 * median(times["tiled"]), "sdpa_ms": 1e3 * median(times["sdpa"]),
            "sdpa_over_tiled": median(ratios),
            "auto": "tiled" if use_tiled(qkv[:, :, 0], "auto", needs_grad=grad) else "sdpa"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", type=_shape, default=[_shape(s) for s in SHAPES],
                    metavar="BxSxHxD", help="batch x tokens x heads x head_dim (default: %(default)s)")
    ap.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"],
                    help="default: fp32 bf16")
    ap.add_argument("--threads", nargs="+", type=int, default=[2, 1],
                    help="torch thread counts to run each shape with (default: 2 1)")
    ap.add_argument("--rounds", type=int, default=15, help="interleaved rounds per case (default: 15)")
    ap.add_argument("--no-grad", action="store_true",
                    help="forward only under torch.no_grad (sampling), where the route differs for float32")
    ap.add_argument("--quick", action="store_true", help="seconds: two small shapes, 1 thread, 2 rounds")
    args = ap.parse_args(argv)
    if args.quick:
        args.shapes, args.threads, args.rounds = [(1, 64, 2, 16), (4, 16, 2, 8)], [1], 2
    if any(t < 1 for t in args.threads) or args.rounds < 1:
        ap.error("--threads and --rounds must be positive")
    from cogvx_ds.models.dit.fused import native_half_supported
    from cogvx_ds.utils import tune_malloc

    tune_malloc()  # as the trainer does
    before = torch.get_num_threads()
    rows = []
    try:
        for dt_name in args.dtypes:
            dtype = DTYPES[dt_name]
            if not native_half_supported(dtype):
                print(f"skipping {dt_name}: this CPU has no native {dt_name} kernels (both kernels would crawl)")
                continue
            for threads in args.threads:
                torch.set_num_threads(threads)
                for shape in args.shapes:
                    row = {"dtype": dt_name, "threads": threads, "shape": "x".join(map(str, shape)),
                           **compare(shape, dtype, args.rounds, grad=not args.no_grad)}
                    rows.append(row)
                    print(f"{row['dtype']} {threads} thread(s) {row['shape']}: SDPA/tiled "
                          f"{row['sdpa_over_tiled']:.2f}x (auto: {row['auto']})", flush=True)
    finally:
        torch.set_num_threads(before)
    if not rows:
        print("nothing to measure")
        return 0
    what = "forward under no_grad" if args.no_grad else "forward + backward"
    print(f"\nAttention {what}, tiled kernel vs torch SDPA (medians of {args.rounds} interleaved rounds; "
          "> 1: the tiled kernel is faster); 'auto' = what model.cpu_attention=auto picks")
    print_table(rows, [("dtype", "dtype"), ("threads", "threads"), ("shape", "BxSxHxD"),
                       ("tiled_ms", "tiled ms", "{:.2f}"), ("sdpa_ms", "SDPA ms", "{:.2f}"),
                       ("sdpa_over_tiled", "SDPA/tiled", "{:.2f}x"), ("auto", "auto")])
    path = write_results("attention_no_grad" if args.no_grad else "attention", {"rows": rows, "rounds": args.rounds})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
