"""Peak memory (RSS) and frames/s of 3D-VAE encoding: cogvx_ds vs diffusers' AutoencoderKLCogVideoX.

Every measurement runs in a fresh subprocess so its peak RSS (ru_maxrss) belongs to that measurement alone.
Both implementations load the same random weights (diffusers format, written once), run under torch.no_grad,
and encode a batch of one clip after a 9-frame warm-up. diffusers runs with its memory savers on
(enable_slicing + enable_tiling; it always encodes 8 frames at a time); ours uses its defaults (8-frame chunks
with the frame cache). "encode MB" = peak RSS minus RSS just before encoding (model and input already resident).

    python benchmarks/vae_encode.py            # released CogVideoX architecture, random weights, 64x96
    python benchmarks/vae_encode.py --quick    # reduced-width VAE at 32x48, seconds
Writes benchmarks/results/vae_encode.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
QUICK_CONFIG = dict(block_out_channels=[32, 64, 64, 64], layers_per_block=1, norm_num_groups=16)


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def load(impl: str, weights: str):
    if impl == "diffusers":
        from diffusers import AutoencoderKLCogVideoX

        vae = AutoencoderKLCogVideoX.from_pretrained(weights).eval()
        vae.enable_slicing()
        vae.enable_tiling()
        return lambda x: vae.encode(x).latent_dist.mean
    sys.path.insert(0, str(REPO))
    from cogvx_ds.models.vae import CogVideoXVAE

    vae = CogVideoXVAE.from_diffusers(weights).eval()
    return lambda x: vae.encode(x)[0]


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    frames = args.frames[0]
    encode = load(args.impl, args.weights)
    with torch.no_grad():
        encode(torch.zeros(1, 3, 9, args.height, args.width))  # warm-up: allocator and kernel selection
        x = torch.rand(1, 3, frames, args.height, args.width, generator=torch.Generator().manual_seed(0)) * 2 - 1
        before = current_rss_mb()
        start = time.perf_counter()
        mean = encode(x)
        seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps(dict(impl=args.impl, frames=frames, seconds=seconds, fps=frames / seconds,
                          peak_rss_mb=peak, encode_mb=peak - before, latent_shape=list(mean.shape),
                          latent_checksum=float(mean.double().abs().sum()))))


def write_weights(path: Path, quick: bool) -> None:
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(0)
    AutoencoderKLCogVideoX(**(QUICK_CONFIG if quick else {})).save_pretrained(path)


def run_one(impl: str, frames: int, args, weights: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--impl", impl, "--frames", str(frames), "--weights", str(weights),
           "--height", str(args.height), "--width", str(args.width), "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{impl} {frames} frames failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="reduced-width VAE at 32x48 (seconds instead of minutes)")
    p.add_argument("--frames", type=int, nargs="+", default=[17, 33, 65], help="clip lengths (4k+1)")
    p.add_argument("--height", type=int, default=None, help="frame height (default 64, quick 32)")
    p.add_argument("--width", type=int, default=None, help="frame width (default 96, quick 48)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    p.add_argument("--out", type=Path, default=None,
                   help="default: benchmarks/results/vae_encode.json (or $COGVX_BENCH_RESULTS/vae_encode.json)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.height = args.height or (32 if args.quick else 64)
    args.width = args.width or (48 if args.quick else 96)
    if args.out is None:
        sys.path.insert(0, str(REPO))
        from benchmarks.common import RESULTS
        args.out = RESULTS / "vae_encode.json"
    if args.worker:
        return worker(args)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_weights(Path(tmp), args.quick)
        for frames in args.frames:
            for impl in ("ours", "diffusers"):
                rows.append(run_one(impl, frames, args, Path(tmp)))
    print(f"VAE encode, {'reduced-width' if args.quick else 'CogVideoX'} architecture, "
          f"{args.height}x{args.width}, batch 1, {args.threads} threads, float32, CPU")
    print(f"{'impl':<10} {'frames':>6} {'seconds':>8} {'frames/s':>9} {'peak RSS MB':>12} {'encode MB':>10}")
    for r in rows:
        print(f"{r['impl']:<10} {r['frames']:>6} {r['seconds']:>8.2f} {r['fps']:>9.2f} "
              f"{r['peak_rss_mb']:>12.0f} {r['encode_mb']:>10.0f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(quick=args.quick, height=args.height, width=args.width, threads=args.threads,
                torch=torch.__version__, architecture=QUICK_CONFIG if args.quick else "diffusers defaults")
    args.out.write_text(json.dumps(dict(meta=meta, results=rows), indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
