"""Summarise latent shards and check their integrity.

Prints the shard and sample counts, the bucket histogram and one sample (keys, tensor shapes and dtypes,
caption, metadata). With --check, reads every sample of every shard and verifies it: readable (no truncated or
corrupt member, no tar cut short), mean/logvar finite and of one shape, the json fields present and consistent
with the latent shape, keys unique across shards, per-shard counts equal to index.json, and each shard's manifest
(shard-N.manifest.json, what training plans from) equal to the shard. Exits 1 on any problem.

With --write-manifests, writes the manifest of every shard that lacks a current one (shards written before
manifests existed, by other tools, or changed since), so that training starts without walking the tars.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from contextlib import closing
from pathlib import Path

import torch
from tqdm import tqdm

from cogvx_ds.data.loader import scan_shard
from cogvx_ds.data.shards import (
    INDEX_NAME,
    LatentSample,
    ShardError,
    iter_shard,
    manifest_path,
    read_manifest,
    resolve_shards,
    write_manifest,
)

REQUIRED_META = ("caption", "frames", "height", "width", "source", "bucket")


def sample_problems(s: LatentSample, temporal_ratio: int = 4, spatial_ratio: int = 8) -> list[str]:
    """What is wrong with one sample (empty list: nothing)."""
    problems = [f"json lacks {k!r}" for k in REQUIRED_META if k not in s.meta]
    for name, t in (("mean", s.mean), ("logvar", s.logvar)):
        if not torch.isfinite(t.float()).all():
            problems.append(f"{name} has non-finite values")
    if not problems:
        m = s.meta  # encode_latents records the VAE's latent shape; other writers get CogVideoX's 4x / 8x ratios
        expect = tuple(m["latent_shape"][1:]) if "latent_shape" in m else (
            (m["frames"] - 1) // temporal_ratio + 1, m["height"] // spatial_ratio, m["width"] // spatial_ratio)
        if tuple(s.mean.shape[1:]) != expect:
            problems.append(f"latent [C,F,H,W] {tuple(s.mean.shape)} does not match frames/height/width "
                            f"{m['frames']}/{m['height']}/{m['width']} (expected [C,{','.join(map(str, expect))}])")
    emb, mask = s.text_embedding, s.text_mask
    if emb is not None and mask is not None and mask.shape[0] != emb.shape[0]:
        problems.append(f"text mask {tuple(mask.shape)} does not match embedding {tuple(emb.shape)}")
    return problems


def check(shards: list[Path], index: dict | None) -> tuple[list[str], Counter, int]:
    """(problems, bucket histogram, sample count) after reading every sample."""
    problems, buckets, total, seen = [], Counter(), 0, {}
    expected = {e["path"]: e["num_samples"] for e in index["shards"]} if index else {}
    bar = tqdm(shards, desc="check", unit="shard", disable=len(shards) < 20)
    for path in bar:
        count = 0
        try:
            for s in iter_shard(path):
                count += 1
                buckets[s.meta.get("bucket", "unknown")] += 1
                problems += [f"{path.name}: {s.key}: {p}" for p in sample_problems(s)]
                if s.key in seen:
                    problems.append(f"{path.name}: key {s.key} also in {seen[s.key]}")
                seen[s.key] = path.name
                if s.skipped_members:
                    problems.append(f"{path.name}: unknown members skipped: {s.skipped_members[:5]}")
        except ShardError as e:
            problems.append(str(e))
        problems += manifest_problems(path)
        if path.name in expected and expected[path.name] != count:
            problems.append(f"{path.name}: index.json says {expected[path.name]} samples, read {count}")
        total += count
        bar.set_postfix(samples=total, problems=len(problems), refresh=False)
    return problems, buckets, total


def manifest_problems(path: Path) -> list[str]:
    """A manifest that does not match its shard (none at all is fine: training then scans the tar)."""
    manifest, why = read_manifest(path)
    if manifest is None:
        return [] if why == "no manifest" else [f"{why}; --write-manifests renews it"]
    try:
        scanned = scan_shard(path)
    except ShardError:
        return []  # reported by the sample check
    if manifest != scanned:
        return [f"{manifest_path(path).name} does not list what {path.name} holds; --write-manifests renews it"]
    return []


def write_manifests(shards: list[Path]) -> tuple[int, list[str]]:
    """Write the manifest of each shard without one that lists what the tar holds; (written, problems)."""
    written, problems = 0, []
    for path in tqdm(shards, desc="manifests", unit="shard", disable=len(shards) < 20):
        try:
            scanned = scan_shard(path)
            if read_manifest(path)[0] != scanned:  # missing, stale, or listing something else
                write_manifest(path, scanned)
                written += 1
        except ShardError as e:
            problems.append(str(e))
    return written, problems


def describe(s: LatentSample) -> str:
    def shape(t):
        return f"{list(t.shape)} {str(t.dtype).replace('torch.', '')}"

    lines = [f"sample {s.key}: caption {s.meta.get('caption')!r}",
             f"  mean {shape(s.mean)}, logvar {shape(s.logvar)}"]
    if s.text_embedding is not None:
        mask = f", mask {shape(s.text_mask)}" if s.text_mask is not None else ""
        lines.append(f"  text embedding {shape(s.text_embedding)}{mask}")
    meta = {k: v for k, v in s.meta.items() if k != "caption"}
    lines.append(f"  meta {json.dumps(meta, sort_keys=True)[:600]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_tools.inspect_shards", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards", nargs="+",
                   help="shard folder (with or without index.json), index.json, .tar files or globs")
    p.add_argument("--check", action="store_true", help="read and verify every sample (integrity check)")
    p.add_argument("--sample", type=int, default=0, help="which sample of the first shard to show (default 0)")
    p.add_argument("--write-manifests", action="store_true",
                   help="write shard-N.manifest.json for every shard without a current one (training then "
                        "starts without walking the tars)")
    args = p.parse_args(argv)
    try:
        shards = resolve_shards(args.shards, what="shards")
    except FileNotFoundError as e:
        print(f"inspect_shards: error: {e}", file=sys.stderr)
        return 1
    index_file = next((Path(s) / INDEX_NAME if Path(s).is_dir() else Path(s) for s in args.shards
                       if (Path(s) / INDEX_NAME).is_file() or Path(s).name == INDEX_NAME), None)
    index = json.loads(index_file.read_text()) if index_file else None
    if index:
        print(f"index {index_file}: {len(index['shards'])} shards, {index['num_samples']} samples, "
              f"{index.get('num_rejects', 0)} rejected inputs")
        print("buckets: " + ", ".join(f"{k}: {v}" for k, v in sorted(index["bucket_histogram"].items())))
    try:
        with closing(iter_shard(shards[0])) as samples:
            shown = next((s for i, s in enumerate(samples) if i == args.sample), None)
        print(describe(shown) if shown else f"{shards[0].name}: no sample #{args.sample}")
    except ShardError as e:
        print(f"cannot show a sample: {e}")
    if args.write_manifests:
        written, problems = write_manifests(shards)
        print(f"manifests: wrote {written}, {len(shards) - written - len(problems)} already current"
              + "".join(f"\nPROBLEM {p}" for p in problems))
        if problems and not args.check:
            return 1
    if not args.check:
        return 0
    problems, buckets, total = check(shards, index)
    print(f"checked {len(shards)} shards, {total} samples; buckets: "
          + ", ".join(f"{k}: {v}" for k, v in sorted(buckets.items())))
    if index and index["num_samples"] != total:
        problems.append(f"index.json says {index['num_samples']} samples in total, read {total}")
    for problem in problems[:50]:
        print(f"PROBLEM {problem}")
    print("integrity: OK" if not problems else f"integrity: {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
