"""Latent shards: webdataset-style `.tar` files, written atomically and read without ever unpickling.

One sample = members sharing a key:
  <key>.latent.safetensors   "mean", "logvar": posterior of the VAE, [C, F, H, W], bf16 or fp16
  <key>.text.safetensors     optional: "embedding" [L, D] and "mask" [L] (precomputed text encoder output)
  <key>.json                 caption, frames, height, width, fps, source, clip range, bucket, ...
A folder of shards has an `index.json`: shards, per-shard sample counts and bucket histograms.
Members with any other suffix (for example a pickle) are skipped and counted, never decoded.

Beside each `shard-N.tar`, `ShardWriter` writes a manifest `shard-N.manifest.json`: every sample's key, bucket,
frame count and the byte ranges of its members, in columns. A training run must know these for every sample
before it can plan a batch; read from the tar itself they cost a header walk and two small reads per sample
(about 77 us per sample per rank: 13 CPU-minutes per rank at 10M samples, and millions of small reads on a
parallel file system), from the manifest one sequential read per shard. A manifest is used only while it matches
its shard as recorded when it was written: size, modification time (a rewritten or plainly copied shard is
walked; `cp -p` and `rsync -a` keep it) and a hash of 8 evenly spaced 4 KiB blocks; otherwise the loader walks
the tar and says so. A manifest skips the start-up walk's header checks, so after copying data
`inspect_shards --check` is the integrity check. `python -m data_tools.inspect_shards <folder> --write-manifests` adds
manifests to shards written before they existed or by other tools.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from cogvx_ds.utils import atomic_write_text, temp_path

KNOWN_SUFFIXES = ("latent.safetensors", "text.safetensors", "json")
INDEX_NAME = "index.json"
MANIFEST_SUFFIX = ".manifest.json"
MANIFEST_FORMAT = "cogvx_ds.shard_manifest/1"
_SAMPLED_BLOCKS, _BLOCK = 8, 4096  # evenly spaced blocks of the tar (first and last included) in a manifest's check


class ShardError(ValueError):
    """A shard or sample is unreadable; the message names the file and member."""


@dataclass
class LatentSample:
    key: str
    mean: torch.Tensor
    logvar: torch.Tensor
    meta: dict
    text_embedding: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None
    skipped_members: list[str] = field(default_factory=list)

    @property
    def is_image(self) -> bool:
        return self.mean.shape[1] == 1


def _split_name(name: str) -> tuple[str, str]:
    base = os.path.basename(name)
    key, _, suffix = base.partition(".")
    return key, suffix


class ShardWriter:
    """Write samples into `path` via a temp file that is renamed into place on close (all or nothing)."""

    def __init__(self, path: str | os.PathLike, latent_dtype: torch.dtype = torch.bfloat16):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temp_path(self.path)
        self.tar = tarfile.open(self.tmp, "w")
        self.latent_dtype = latent_dtype
        self.count, self.buckets, self.keys = 0, Counter(), set()
        self.samples = ShardSamples()  # for the manifest

    def _add_bytes(self, name: str, data: bytes) -> tuple[int, int]:
        """Append a member; returns its data's (offset, size) in the tar."""
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: identical inputs, identical bytes
        self.tar.addfile(info, io.BytesIO(data))
        return self.tar.offset - -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE, len(data)

    def add(self, key: str, mean: torch.Tensor, logvar: torch.Tensor, meta: dict,
            text_embedding: torch.Tensor | None = None, text_mask: torch.Tensor | None = None) -> None:
        if "." in key or "/" in key or key in self.keys:
            raise ValueError(f"sample key {key!r} must be unique and contain no '.' or '/'")
        if mean.shape != logvar.shape or mean.dim() != 4:
            raise ValueError(f"{key}: mean/logvar must both be [C, F, H, W], got {tuple(mean.shape)} / "
                             f"{tuple(logvar.shape)}")
        self.keys.add(key)
        latents = {"mean": mean.to(self.latent_dtype).contiguous(), "logvar": logvar.to(self.latent_dtype).contiguous()}
        spans = {"latent.safetensors": self._add_bytes(f"{key}.latent.safetensors", st_save(latents))}
        if text_embedding is not None:
            text = {"embedding": text_embedding.contiguous()}
            if text_mask is not None:
                text["mask"] = text_mask.contiguous()
            spans["text.safetensors"] = self._add_bytes(f"{key}.text.safetensors", st_save(text))
        meta_json = json.dumps(meta, sort_keys=True)
        spans["json"] = self._add_bytes(f"{key}.json", meta_json.encode())
        self.samples.add(key, json.loads(meta_json), spans)  # as a reader will see it (tuples become lists)
        self.count += 1
        self.buckets[str(meta.get("bucket", "unknown"))] += 1

    def close(self) -> dict:
        """Finish the tar, write its manifest, then rename the tar into place (a finished shard has its manifest)."""
        self.tar.close()
        write_manifest(self.path, self.samples, self.tmp)
        os.replace(self.tmp, self.path)
        return {"path": self.path.name, "num_samples": self.count, "buckets": dict(self.buckets)}

    def abort(self) -> None:
        self.tar.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _build_sample(key: str, members: dict[str, bytes], path: Path, skipped: list[str]) -> LatentSample:
    if "latent.safetensors" not in members or "json" not in members:
        have = ", ".join(sorted(members)) or "nothing"
        raise ShardError(f"{path}: sample {key!r} needs {key}.latent.safetensors and {key}.json, has {have}")
    try:
        lat = st_load(members["latent.safetensors"])
        meta = json.loads(members["json"])
        text = st_load(members["text.safetensors"]) if "text.safetensors" in members else {}
    except Exception as e:  # safetensors / json only: parsing errors, never code execution
        raise ShardError(f"{path}: sample {key!r} is corrupt: {e}") from e
    sample_bucket(meta, f"{path}: {key}.json")  # an object with a usable frame count, or a ShardError
    if set(lat) != {"mean", "logvar"} or lat["mean"].shape != lat["logvar"].shape or lat["mean"].dim() != 4:
        raise ShardError(f"{path}: {key}.latent.safetensors must hold mean and logvar [C,F,H,W], has "
                         f"{ {k: tuple(v.shape) for k, v in lat.items()} }")
    return LatentSample(key, lat["mean"], lat["logvar"], meta, text.get("embedding"), text.get("mask"), skipped)


def check_tar_end(f, end: int, path: Path) -> None:
    """After the last member (at byte `end`) a tar must go on with its end-of-archive zero blocks. Python's
    tarfile takes a header cut short, or a file cut right after a member, for the end of the archive: that is a
    shard cut short, with samples lost, not a complete one."""
    f.seek(end)
    tail = f.read(64 << 10)
    if not tail:
        raise ShardError(f"{path}: truncated: the file ends right after a member (byte {end}), with no "
                         f"end-of-archive blocks")
    if tail.count(0) != len(tail):
        raise ShardError(f"{path}: not one complete tar: bytes after the last readable member (byte {end}) that "
                         f"are neither a member nor the end of the archive (cut inside a header, or tars joined)")


def iter_shard(path: str | os.PathLike) -> Iterator[LatentSample]:
    """Samples of one shard in file order. Raises ShardError on a truncated/corrupt tar or sample."""
    path = Path(path)
    try:
        tar = tarfile.open(path, "r:")
    except (tarfile.TarError, OSError) as e:
        raise ShardError(f"{path}: not a readable tar file: {e}") from e
    with tar:
        key, members, skipped = None, {}, []
        try:
            for info in tar:
                if not info.isfile():
                    continue
                k, suffix = _split_name(info.name)
                if suffix not in KNOWN_SUFFIXES:
                    skipped.append(info.name)  # e.g. a .pyd/.pickle member: never decoded
                    continue
                if key is not None and k != key:
                    yield _build_sample(key, members, path, skipped)
                    members, skipped = {}, []
                key = k
                members[suffix] = tar.extractfile(info).read()
            check_tar_end(tar.fileobj, tar.offset, path)
        except (tarfile.TarError, OSError, EOFError) as e:
            raise ShardError(f"{path}: truncated or corrupt tar: {e}") from e
        if key is not None:
            yield _build_sample(key, members, path, skipped)


def write_index(folder: str | os.PathLike, shard_entries: list[dict], extra: dict | None = None) -> Path:
    folder = Path(folder)
    hist = Counter()
    for e in shard_entries:
        hist.update(e.get("buckets", {}))
    index = {"shards": sorted(shard_entries, key=lambda e: e["path"]),
             "num_samples": sum(e["num_samples"] for e in shard_entries), "bucket_histogram": dict(hist),
             **(extra or {})}
    tmp = temp_path(folder / INDEX_NAME)
    tmp.write_text(json.dumps(index, indent=2, sort_keys=True))
    os.replace(tmp, folder / INDEX_NAME)
    return folder / INDEX_NAME


# ------------------------------------------------------------------------------------------------ manifests
MAX_LATENT_FRAMES = 1_000_000  # far above any clip; a larger count in a sample json is damage, not data


def sample_bucket(meta: dict, where: str = "sample json") -> tuple[str, int]:
    """A sample's (bucket, latent frames) from its json: how the training plan groups it. A json that is not an
    object with a positive whole frame count is a ShardError naming `where` (the shard is then skipped as bad)."""
    if not isinstance(meta, dict):
        raise ShardError(f"{where}: expected a JSON object, got {type(meta).__name__}")
    raw = meta.get("latent_frames", meta.get("frames", 1))
    if (isinstance(raw, bool) or not isinstance(raw, (int, float))
            or (isinstance(raw, float) and not math.isfinite(raw))
            or not 1 <= raw <= MAX_LATENT_FRAMES or raw != int(raw)):
        raise ShardError(f"{where}: latent_frames/frames must be a positive whole number, got {raw!r}")
    frames = int(raw)
    return str(meta.get("bucket", f"{frames}")), frames


@dataclass
class ShardSamples:
    """What the training plan needs of one shard's samples, in columns: keys, buckets, latent frames, and the
    (offset, size) of each member in KNOWN_SUFFIXES order, (-1, -1) where a sample has none."""
    keys: list[str] = field(default_factory=list)
    buckets: list[str] = field(default_factory=list)
    frames: list[int] = field(default_factory=list)
    spans: list[list[int]] = field(default_factory=list)  # per sample [offset, size] x len(KNOWN_SUFFIXES)
    _array: np.ndarray | None = field(default=None, compare=False, repr=False)  # span_array, made once

    def add(self, key: str, meta: dict, spans: dict[str, tuple[int, int]], where: str = "sample json") -> None:
        self._array = None
        bucket, frames = sample_bucket(meta, where)
        self.keys.append(key)
        self.buckets.append(bucket)
        self.frames.append(frames)
        self.spans.append([v for suffix in KNOWN_SUFFIXES for v in spans.get(suffix, (-1, -1))])

    def span_array(self) -> np.ndarray:
        """int64 [samples, len(KNOWN_SUFFIXES), 2] (made once: read_manifest checks it, the plan keeps it)."""
        if self._array is None:
            self._array = np.asarray(self.spans, dtype=np.int64).reshape(len(self.keys), len(KNOWN_SUFFIXES), 2)
        return self._array


def manifest_path(shard: str | os.PathLike) -> Path:
    return Path(shard).with_suffix(MANIFEST_SUFFIX)


def _shard_identity(path: Path) -> dict:
    """What a manifest checks its shard by: size, modification time, a hash of evenly spaced blocks."""
    st = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for k in range(_SAMPLED_BLOCKS):
            f.seek(max(0, st.st_size - _BLOCK) * k // (_SAMPLED_BLOCKS - 1))
            digest.update(f.read(_BLOCK))
    return {"shard_bytes": st.st_size, "shard_mtime_ns": st.st_mtime_ns, "shard_blocks_sha256": digest.hexdigest()[:32]}


def write_manifest(shard: str | os.PathLike, samples: ShardSamples, written: str | os.PathLike | None = None) -> Path:
    """Write `shard`'s manifest (atomically). `written`: where the finished tar is now, if not yet at `shard`."""
    doc = {"format": MANIFEST_FORMAT, "shard": Path(shard).name, **_shard_identity(Path(written or shard)),
           "suffixes": list(KNOWN_SUFFIXES), "keys": samples.keys,
           "buckets": samples.buckets, "frames": samples.frames, "spans": samples.spans}
    path = manifest_path(shard)
    atomic_write_text(path, json.dumps(doc, separators=(",", ":")))
    return path


def read_manifest(shard: Path) -> tuple[ShardSamples | None, str]:
    """(samples, "") from `shard`'s manifest, or (None, why not): missing, malformed, or not matching the shard."""
    path = manifest_path(shard)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None, "no manifest"
    except (OSError, ValueError) as e:
        return None, f"{path.name} is unreadable: {e}"
    if not isinstance(doc, dict):
        return None, f"{path.name} is malformed: not a JSON object"
    try:
        if doc.get("format") != MANIFEST_FORMAT or doc.get("suffixes") != list(KNOWN_SUFFIXES):
            return None, f"{path.name} has format {doc.get('format')!r}, expected {MANIFEST_FORMAT!r}"
        identity = _shard_identity(shard)
        if any(doc[k] != v for k, v in identity.items()):
            return None, f"{path.name} is stale ({shard.name} was rewritten, changed or copied since)"
        size = identity["shard_bytes"]
        samples = ShardSamples(doc["keys"], doc["buckets"], [int(f) for f in doc["frames"]], doc["spans"])
        spans = samples.span_array()
        if not len(samples.keys) == len(samples.buckets) == len(samples.frames):
            return None, f"{path.name}: columns of different lengths"
        present = spans[..., 0] >= 0
        ends = np.where(present, spans[..., 0] + spans[..., 1], 0)
        latent, meta = KNOWN_SUFFIXES.index("latent.safetensors"), KNOWN_SUFFIXES.index("json")
        if (ends > size).any() or not (present[:, latent].all() and present[:, meta].all()):
            return None, f"{path.name}: member ranges outside the shard or missing"
    except (KeyError, TypeError, ValueError, OSError) as e:
        return None, f"{path.name} is malformed: {type(e).__name__}: {e}"
    return samples, ""


def resolve_shards(specs: list[str], what: str = "data.shards") -> list[Path]:
    """Paths, globs, folders (with or without index.json) or index.json files -> a sorted list of shard paths;
    errors name `what` (the config field, or a command's argument)."""
    out: list[Path] = []
    for spec in specs:
        p = Path(spec)
        if p.is_dir() and (p / INDEX_NAME).is_file():
            p = p / INDEX_NAME
        if p.name == INDEX_NAME and p.is_file():
            out += [p.parent / e["path"] for e in json.loads(p.read_text())["shards"]]
        elif p.is_dir():
            out += sorted(p.glob("*.tar"))
        elif any(c in spec for c in "*?["):
            out += sorted(Path().glob(spec)) if not p.is_absolute() else sorted(Path("/").glob(spec.lstrip("/")))
        else:
            out.append(p)
    missing = [str(p) for p in out if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{what}: shard files not found: {', '.join(missing[:10])}")
    if not out:
        raise FileNotFoundError(f"{what}: no shard files matched {specs}")
    return out
