"""Decode stored latents back to pixels with the VAE, for a visual check of a shard folder.

Videos become <key>.mp4 at the fps recorded in their metadata, 1-frame samples <key>.png; a captions.jsonl
beside them lists key, caption, source and output file. The posterior mean is decoded (no sampling).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from cogvx_ds.data.shards import iter_shard, resolve_shards
from cogvx_ds.utils import out_dir_problem
from data_tools._video_io import to_uint8, write_mp4


def decode_shards(shards: list[Path], vae, out: Path, num: int | None = None, keys: set[str] | None = None,
                  default_fps: float = 8.0) -> list[dict]:
    """Decode up to `num` samples (or those in `keys`); returns one record per written file."""
    out.mkdir(parents=True, exist_ok=True)
    records, written = [], set()
    for path in shards:
        for s in iter_shard(path):
            if keys is not None and s.key not in keys:
                continue
            with torch.inference_mode():
                video = vae.decode(s.mean[None].to(vae.dtype))[0]
            frames = to_uint8(video)
            # keys are unique within an encode folder only: a key met again (another folder) gets its shard's
            # folder and name in front, and a number after if that is taken too, instead of overwriting a file
            name = s.key if s.key not in written else f"{path.parent.name}_{path.stem}_{s.key}"
            base, n = name, 1
            while name in written:
                n += 1
                name = f"{base}_{n}"
            written.add(name)
            if frames.shape[0] == 1:
                from PIL import Image

                file = out / f"{name}.png"
                Image.fromarray(frames[0]).save(file)
            else:
                file = out / f"{name}.mp4"
                write_mp4(file, frames, s.meta.get("fps") or default_fps)
            records.append({"key": s.key, "caption": s.meta.get("caption"), "source": s.meta.get("source"),
                            "file": file.name, "frames": int(frames.shape[0])})
            if num is not None and len(records) >= num:
                return records
    return records


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_tools.decode_latents", description=__doc__)
    p.add_argument("shards", nargs="+", help="shard folder, index.json, .tar files or globs")
    p.add_argument("--vae", required=True, help="diffusers-format CogVideoX VAE folder (the one that encoded them)")
    p.add_argument("--out", required=True, help="output folder for the mp4/png files")
    p.add_argument("--num", type=int, default=4, help="decode this many samples (default 4; 0 = all)")
    p.add_argument("--keys", help="comma-separated sample keys to decode instead of the first --num")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the VAE decodes (default: cuda if this PyTorch sees a GPU, else cpu)")
    p.add_argument("--tiling", action="store_true", help="spatial tiling in the VAE decoder (less memory)")
    args = p.parse_args(argv)
    if args.num < 0:
        p.error(f"--num must be >= 0 (0 = all), got {args.num}")
    problem = out_dir_problem(args.out, "--out")
    if problem:
        p.error(problem)
    from cogvx_ds.models.vae import CogVideoXVAE

    try:
        shards = resolve_shards(args.shards, what="shards")
        vae = CogVideoXVAE.from_diffusers(args.vae).to(args.device).eval()
    except (FileNotFoundError, ValueError) as e:
        print(f"decode_latents: error: {e}", file=sys.stderr)
        return 1
    if args.tiling:
        vae.enable_tiling()
    keys = {k.strip() for k in args.keys.split(",")} if args.keys else None
    records = decode_shards(shards, vae, Path(args.out), None if keys or args.num <= 0 else args.num, keys)
    if keys and len(records) < len(keys):
        missing = sorted(keys - {r["key"] for r in records})
        print(f"decode_latents: keys not found: {missing}", file=sys.stderr)
    with open(Path(args.out) / "captions.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    print(f"decode_latents: wrote {len(records)} files to {args.out}", file=sys.stderr)
    return 0 if records else 1


if __name__ == "__main__":
    raise SystemExit(main())
