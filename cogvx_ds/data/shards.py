"""Latent shards: webdataset-style `.tar` files, written atomically and read without ever unpickling.

One sample = members sharing a key:
  <key>.latent.safetensors   "mean", "logvar": posterior of the VAE, [C, F, H, W], bf16 or fp16
  <key>.text.safetensors     optional: "embedding" [L, D] and "mask" [L] (precomputed text encoder output)
  <key>.json                 caption, frames, height, width, fps, source, clip range, bucket, ...
A folder of shards has an `index.json`: shards, per-shard sample counts and bucket histograms.
Members with any other suffix (for example a pickle) are skipped and counted, never decoded.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from cogvx_ds.utils import temp_path

KNOWN_SUFFIXES = ("latent.safetensors", "text.safetensors", "json")
INDEX_NAME = "index.json"


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

    def _add_bytes(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: identical inputs, identical bytes
        self.tar.addfile(info, io.BytesIO(data))

    def add(self, key: str, mean: torch.Tensor, logvar: torch.Tensor, meta: dict,
            text_embedding: torch.Tensor | None = None, text_mask: torch.Tensor | None = None) -> None:
        if "." in key or "/" in key or key in self.keys:
            raise ValueError(f"sample key {key!r} must be unique and contain no '.' or '/'")
        if mean.shape != logvar.shape or mean.dim() != 4:
            raise ValueError(f"{key}: mean/logvar must both be [C, F, H, W], got {tuple(mean.shape)} / "
                             f"{tuple(logvar.shape)}")
        self.keys.add(key)
        latents = {"mean": mean.to(self.latent_dtype).contiguous(), "logvar": logvar.to(self.latent_dtype).contiguous()}
        self._add_bytes(f"{key}.latent.safetensors", st_save(latents))
        if text_embedding is not None:
            text = {"embedding": text_embedding.contiguous()}
            if text_mask is not None:
                text["mask"] = text_mask.contiguous()
            self._add_bytes(f"{key}.text.safetensors", st_save(text))
        self._add_bytes(f"{key}.json", json.dumps(meta, sort_keys=True).encode())
        self.count += 1
        self.buckets[str(meta.get("bucket", "unknown"))] += 1

    def close(self) -> dict:
        self.tar.close()
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
    if set(lat) != {"mean", "logvar"} or lat["mean"].shape != lat["logvar"].shape or lat["mean"].dim() != 4:
        raise ShardError(f"{path}: {key}.latent.safetensors must hold mean and logvar [C,F,H,W], has "
                         f"{ {k: tuple(v.shape) for k, v in lat.items()} }")
    return LatentSample(key, lat["mean"], lat["logvar"], meta, text.get("embedding"), text.get("mask"), skipped)


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


def resolve_shards(specs: list[str]) -> list[Path]:
    """Paths, globs, folders (with or without index.json) or index.json files -> a sorted list of shard paths."""
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
        raise FileNotFoundError(f"data.shards: shard files not found: {', '.join(missing[:10])}")
    if not out:
        raise FileNotFoundError(f"data.shards: no shard files matched {specs}")
    return out
