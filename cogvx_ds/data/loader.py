"""The training data stream: a global, deterministic plan of bucketed batches, sliced per rank.

Every rank scans the shards' metadata (tar headers and the small json members; latents stay on disk) and builds
the same global plan: per epoch a seeded shuffle, samples grouped into global batches within one bucket
(resolution x frames), image batches and video batches interleaved at random positions. Data-parallel rank i
loads only its slice of each global batch; TP and SP peers load the same slice. The data position is just the
number of global batches consumed, so resume replays the plan exactly, and the plan does not depend on how
many ranks share it: DP=1 with batch 4 sees the same samples as DP=2 with batch 2.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import struct
import tarfile
import threading
import time
import warnings
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as st_load

from cogvx_ds.data.shards import KNOWN_SUFFIXES, ShardError


@dataclass(frozen=True)
class SampleRef:
    shard: Path
    key: str
    bucket: str
    frames: int
    members: tuple  # ((suffix, offset, size), ...)

    @property
    def is_image(self) -> bool:
        return self.frames == 1


def _check_safetensors_header(data_head: bytes, size: int, where: str) -> None:
    n = struct.unpack("<Q", data_head[:8])[0] if len(data_head) >= 8 else -1
    if n <= 0 or 8 + n > size:
        raise ShardError(f"{where}: not a safetensors member")


def scan_shard(path: Path) -> list[SampleRef]:
    """Sample references of one shard, reading headers and json only. Raises ShardError if anything is off."""
    refs, members = [], {}
    file_size = path.stat().st_size
    try:
        with open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, _, suffix = Path(info.name).name.partition(".")
                if suffix not in KNOWN_SUFFIXES:
                    continue  # never decoded (pickles and anything else unknown)
                if info.offset_data + info.size > file_size:
                    raise ShardError(f"{path}: truncated inside member {info.name}")
                members.setdefault(key, {})[suffix] = (info.offset_data, info.size)
            for key, m in members.items():
                if "latent.safetensors" not in m or "json" not in m:
                    raise ShardError(f"{path}: sample {key!r} lacks its latent or json member")
                raw.seek(m["json"][0])
                meta = json.loads(raw.read(m["json"][1]))
                raw.seek(m["latent.safetensors"][0])
                _check_safetensors_header(raw.read(8), m["latent.safetensors"][1], f"{path}:{key}")
                frames = int(meta.get("latent_frames", meta.get("frames", 1)))
                bucket = str(meta.get("bucket", f"{frames}"))
                refs.append(SampleRef(path, key, bucket, frames, tuple((s, o, n) for s, (o, n) in m.items())))
    except (tarfile.TarError, OSError, EOFError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{path}: corrupt shard: {e}") from e
    return refs


def load_sample(ref: SampleRef) -> dict:
    try:
        return _read_sample(ref)
    except Exception as e:  # a shard that went bad after the scan: say which sample, not just the decoder's words
        raise ShardError(f"{ref.shard}: sample {ref.key!r} is unreadable: {type(e).__name__}: {e}") from e


def _read_sample(ref: SampleRef) -> dict:
    out = {"key": ref.key}
    with open(ref.shard, "rb") as f:
        for suffix, offset, size in ref.members:
            f.seek(offset)
            data = f.read(size)
            if suffix == "json":
                out["meta"] = json.loads(data)
            elif suffix == "latent.safetensors":
                out.update(st_load(data))
            else:
                text = st_load(data)
                out["text"] = text["embedding"]
    return out


class GlobalPlan:
    """Deterministic sequence of global batches (lists of SampleRef), epoch after epoch."""

    def __init__(self, shards: list[Path], global_batch: int, seed: int, image_ratio: float | None = None):
        self.refs, self.bad_shards, self.bad_paths = [], [], []
        for shard in shards:
            try:
                self.refs += scan_shard(shard)
            except ShardError as e:
                self.bad_shards.append(str(e))
                self.bad_paths.append(str(shard))
                warnings.warn(f"skipping shard: {e}", stacklevel=2)
        if not self.refs:
            raise ShardError(f"no readable samples in {len(shards)} shard(s): " + "; ".join(self.bad_shards[:3]))
        self.global_batch, self.seed, self.image_ratio = global_batch, seed, image_ratio
        self.small_buckets = self._small_buckets()
        self._fingerprint: dict | None = None
        self._epochs: dict[int, list[list[SampleRef]]] = {}
        self._lengths: dict[int, int] = {}  # batches per epoch, for every epoch built so far

    def _small_buckets(self) -> dict[str, int]:
        """Buckets with fewer samples than one global batch: a batch holds one bucket, so these never train."""
        counts = Counter(r.bucket for r in self.refs)
        small = {b: n for b, n in sorted(counts.items()) if n < self.global_batch}
        if small:
            warnings.warn(f"{sum(small.values())} sample(s) in bucket(s) smaller than the global batch of "
                          f"{self.global_batch} will never be trained: {small}", stacklevel=3)
        return small

    def drop_shards(self, paths) -> None:
        """Skip these shards too (another rank could not read them): every rank must plan from the same samples,
        or the DP slices stop partitioning one global batch and TP/SP peers load different samples."""
        paths = set(map(str, paths)) - set(self.bad_paths)
        if not paths:
            return
        self.refs = [r for r in self.refs if str(r.shard) not in paths]
        for path in sorted(paths):
            self.bad_paths.append(path)
            self.bad_shards.append(f"{path}: unreadable on another rank")
        if not self.refs:
            raise ShardError("no readable samples left: " + "; ".join(self.bad_shards[:3]))
        self._epochs.clear()
        self._lengths.clear()
        self._fingerprint = None
        self.small_buckets = self._small_buckets()

    def fingerprint(self) -> dict:
        """What decides the sequence of global batches; a resume from a data position is exact only under the same.
        Shards by file name and sample count, so a data folder may move. Computed once (every checkpoint keeps
        it, and at 10M samples a pass over them takes seconds)."""
        if self._fingerprint is None:
            self._fingerprint = self._compute_fingerprint()
        return dict(self._fingerprint)

    def _compute_fingerprint(self) -> dict:
        counts = Counter(r.shard.name for r in self.refs)
        listing = json.dumps(sorted(counts.items()) + sorted(Path(p).name for p in self.bad_paths))
        return {"samples": len(self.refs), "shards": len(counts), "unreadable_shards": len(self.bad_paths),
                "seed": self.seed, "image_ratio": self.image_ratio, "global_batch": self.global_batch,
                "shards_sha256": hashlib.sha256(listing.encode()).hexdigest()[:16]}

    def _batches(self, refs: list[SampleRef], gen: torch.Generator) -> list[list[SampleRef]]:
        order = torch.randperm(len(refs), generator=gen).tolist()
        pools: dict[str, list[SampleRef]] = {}
        batches = []
        for i in order:
            pool = pools.setdefault(refs[i].bucket, [])
            pool.append(refs[i])
            if len(pool) == self.global_batch:
                batches.append(pool)
                pools[refs[i].bucket] = []
        return batches  # each bucket's leftover (< a global batch) sits this epoch out; the next reshuffles

    def epoch(self, epoch: int) -> list[list[SampleRef]]:
        if epoch not in self._epochs:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            if self.image_ratio is None:
                batches = self._batches(self.refs, gen)
            else:  # explicit mix: each slot is an image batch with probability image_ratio, at random positions
                images = deque(self._batches([r for r in self.refs if r.is_image], gen))
                videos = deque(self._batches([r for r in self.refs if not r.is_image], gen))
                batches = []
                while images or videos:
                    pick_image = bool(images) and (not videos or torch.rand(1, generator=gen).item() < self.image_ratio)
                    batches.append((images if pick_image else videos).popleft())
            if not batches:
                raise ShardError(f"not one global batch of {self.global_batch} samples fits in one bucket; "
                                 f"buckets: {sorted({r.bucket for r in self.refs})}")
            self._epochs = {epoch: batches}  # keep one epoch in memory
            self._lengths[epoch] = len(batches)
        return self._epochs[epoch]

    def batch(self, position: int) -> list[SampleRef]:
        """The global batch at data position `position` (0-based count of global batches consumed). Earlier epochs
        count by their remembered lengths: each epoch is shuffled once, not once per batch of every later epoch."""
        epoch = 0
        while position >= self._length(epoch):
            position -= self._length(epoch)
            epoch += 1
        return self.epoch(epoch)[position]

    def _length(self, epoch: int) -> int:
        if epoch not in self._lengths:
            self.epoch(epoch)
        return self._lengths[epoch]


def collate(samples: list[dict]) -> dict:
    out = {"keys": [s["key"] for s in samples], "meta": [s["meta"] for s in samples],
           "mean": torch.stack([s["mean"] for s in samples]), "logvar": torch.stack([s["logvar"] for s in samples])}
    if all("text" in s for s in samples):
        out["text"] = torch.stack([s["text"] for s in samples])
    return out


class RankLoader:
    """This rank's micro-batches from the global plan, prefetched by a background thread.

    Global batch = dp_size x micro_batch x grad_accum samples; DP rank i owns the contiguous block
    [i*micro*accum, (i+1)*micro*accum) and takes micro-batch m of it at accumulation step m.
    """

    def __init__(self, plan: GlobalPlan, dp_rank: int, dp_size: int, micro_batch: int, grad_accum: int,
                 start_position: int = 0, prefetch: int = 4):
        self.plan, self.dp_rank, self.micro, self.accum = plan, dp_rank, micro_batch, grad_accum
        if plan.global_batch != dp_size * micro_batch * grad_accum:
            raise ValueError("plan.global_batch must equal dp_size x micro_batch x grad_accum")
        self.position = start_position  # global batches fully handed out
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        # test hook: a slow file system (seconds per sample read), to see it in the trainer's data_wait_s
        self._delay = float(os.environ.get("COGVX_FAULT_LOAD_DELAY_S", 0))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(start_position,), daemon=True)
        self._thread.start()

    def _produce(self, position: int) -> None:
        try:
            while not self._stop.is_set():
                refs = self.plan.batch(position)
                block = self.micro * self.accum
                mine = refs[self.dp_rank * block:(self.dp_rank + 1) * block]
                for m in range(self.accum):
                    chunk = mine[m * self.micro:(m + 1) * self.micro]
                    if self._delay:
                        time.sleep(self._delay * len(chunk))
                    item = {"position": position, "micro_step": m, "first_index": self.dp_rank * block + m * self.micro,
                            "global_keys": [r.key for r in refs], **collate([load_sample(r) for r in chunk])}
                    while not self._stop.is_set():
                        try:
                            self._queue.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                position += 1
        except Exception as e:  # surface loader errors in the training thread
            self._queue.put(e)

    def next(self) -> dict:
        item = self._queue.get()
        if isinstance(item, Exception):
            raise item
        if item["micro_step"] == self.accum - 1:
            self.position = item["position"] + 1
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
