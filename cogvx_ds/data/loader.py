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
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as st_load

from cogvx_ds.data.shards import KNOWN_SUFFIXES, ShardError, ShardSamples, check_tar_end, read_manifest


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


def scan_shard(path: Path) -> ShardSamples:
    """One shard's samples from the tar itself: headers and json only. Raises ShardError if anything is off."""
    samples, members = ShardSamples(), {}
    file_size = path.stat().st_size
    try:
        with open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, _, suffix = info.name.rpartition("/")[2].partition(".")  # no Path(): it interns every name
                if suffix not in KNOWN_SUFFIXES:
                    continue  # never decoded (pickles and anything else unknown)
                if info.offset_data + info.size > file_size:
                    raise ShardError(f"{path}: truncated inside member {info.name}")
                members.setdefault(key, {})[suffix] = (info.offset_data, info.size)
            check_tar_end(raw, tar.offset, path)
            for key, m in members.items():
                if "latent.safetensors" not in m or "json" not in m:
                    raise ShardError(f"{path}: sample {key!r} lacks its latent or json member")
                raw.seek(m["json"][0])
                meta = json.loads(raw.read(m["json"][1]))
                raw.seek(m["latent.safetensors"][0])
                _check_safetensors_header(raw.read(8), m["latent.safetensors"][1], f"{path}:{key}")
                samples.add(key, meta, m, f"{path}: {key}.json")
    except (tarfile.TarError, OSError, EOFError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{path}: corrupt shard: {e}") from e
    return samples


def shard_samples(path: Path, notes: list[str] | None = None) -> ShardSamples:
    """A shard's samples from its manifest when that matches the shard, else from a scan of the tar (and why, in
    `notes`: a missing manifest is not noted)."""
    samples, why = read_manifest(path)
    if samples is None:
        if notes is not None and why != "no manifest":
            notes.append(why)
        samples = scan_shard(path)
    return samples


def load_sample(ref: SampleRef) -> dict:
    try:
        return _read_sample(ref)
    except Exception as e:  # a shard that went bad after the scan: say which sample, not just the decoder's words
        raise ShardError(f"{ref.shard}: sample {ref.key!r} is unreadable: {type(e).__name__}: {e} (the shard changed "
                         f"or was damaged after start-up; `python -m data_tools.inspect_shards {ref.shard.parent} "
                         f"--check` lists damaged shards: move them away, then resume with "
                         f"train.resume_with_new_data=true)") from e


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
    """Deterministic sequence of global batches (lists of SampleRef), epoch after epoch.

    The samples are held in columns (keys, shard / bucket ids, frames, member byte ranges: about 135 bytes per
    sample, 1.3 GB per rank at 10M samples), a SampleRef is made only for the samples of a batch asked for, and an
    epoch is an array of sample indices. An object per sample took over 525 bytes (`benchmarks/loader.py`)."""

    def __init__(self, shards: list[Path], global_batch: int, seed: int, image_ratio: float | None = None):
        self.shards: list[Path] = []  # readable shards, by shard id
        self.bad_shards, self.bad_paths, notes = [], [], []
        keys, buckets, frames, spans, shard_ids = [], [], [], [], []
        for shard in shards:
            try:
                got = shard_samples(shard, notes)
            except ShardError as e:
                self.bad_shards.append(str(e))
                self.bad_paths.append(str(shard))
                warnings.warn(f"skipping shard: {e}", stacklevel=2)
                continue
            keys += got.keys
            buckets += got.buckets
            frames += got.frames
            spans.append(got.span_array())
            shard_ids.append(np.full(len(got.keys), len(self.shards), dtype=np.int32))
            self.shards.append(shard)
        if notes:
            warnings.warn(f"{len(notes)} shard manifest(s) not used, those shards were scanned instead (slower "
                          f"start; `python -m data_tools.inspect_shards <folder> --write-manifests` renews them): "
                          + "; ".join(notes[:3]), stacklevel=2)
        if not keys:
            raise ShardError(f"no readable samples in {len(shards)} shard(s): " + "; ".join(self.bad_shards[:3]))
        self.keys = keys
        ids: dict[str, int] = {}
        self.bucket_ids = np.fromiter((ids.setdefault(b, len(ids)) for b in buckets), np.int32, len(buckets))
        self.bucket_names = list(ids)
        self.frames = np.asarray(frames, dtype=np.int32)
        self.spans = np.concatenate(spans)
        self.shard_ids = np.concatenate(shard_ids)
        self.samples = np.arange(len(keys))  # the indices planned from (drop_shards removes some)
        self.global_batch, self.seed, self.image_ratio = global_batch, seed, image_ratio
        self.small_buckets = self._small_buckets()
        self._fingerprint: dict | None = None
        self._epochs: dict[int, np.ndarray] = {}
        self._lengths: dict[int, int] = {}  # batches per epoch, for every epoch built so far

    def __len__(self) -> int:
        return len(self.samples)

    def ref(self, i: int) -> SampleRef:
        """Sample i (an index into the columns)."""
        members = tuple((suffix, int(o), int(n)) for suffix, (o, n) in zip(KNOWN_SUFFIXES, self.spans[i]) if o >= 0)
        return SampleRef(self.shards[self.shard_ids[i]], self.keys[i], self.bucket_names[self.bucket_ids[i]],
                         int(self.frames[i]), members)

    def samples_without_text(self) -> np.ndarray:
        """Planned samples whose text embedding member is missing (shards encoded without --text-encoder)."""
        col = KNOWN_SUFFIXES.index("text.safetensors")
        return self.samples[self.spans[self.samples, col, 0] < 0]

    def _small_buckets(self) -> dict[str, int]:
        """Buckets with fewer samples than one global batch: a batch holds one bucket, so these never train."""
        counts = np.bincount(self.bucket_ids[self.samples], minlength=len(self.bucket_names))
        small = {b: int(n) for b, n in sorted(zip(self.bucket_names, counts)) if 0 < n < self.global_batch}
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
        dropped = [i for i, shard in enumerate(self.shards) if str(shard) in paths]
        self.samples = self.samples[~np.isin(self.shard_ids[self.samples], dropped)]
        for path in sorted(paths):
            self.bad_paths.append(path)
            self.bad_shards.append(f"{path}: unreadable on another rank")
        if not len(self.samples):
            raise ShardError("no readable samples left: " + "; ".join(self.bad_shards[:3]))
        self._epochs.clear()
        self._lengths.clear()
        self._fingerprint = None
        self.small_buckets = self._small_buckets()

    def fingerprint(self) -> dict:
        """What decides the sequence of global batches; a resume from a data position is exact only under the same.
        Shards by file name and sample count, so a data folder may move. Computed once (every checkpoint keeps
        it)."""
        if self._fingerprint is None:
            self._fingerprint = self._compute_fingerprint()
        return dict(self._fingerprint)

    def _compute_fingerprint(self) -> dict:
        counts, order = Counter(), []
        for shard, n in zip(self.shards, np.bincount(self.shard_ids[self.samples], minlength=len(self.shards))):
            if n:
                counts[shard.name] += int(n)
                # with the file's size: two encodes of one input list (LQ, HQ) have the same shard names and
                # counts, and their folders are often named alike (latents/); a moved or renamed folder keeps it
                order.append((shard.name, int(n), shard.stat().st_size))
        listing = json.dumps(sorted(counts.items()) + sorted(Path(p).name for p in self.bad_paths))
        return {"samples": len(self.samples), "shards": len(counts), "unreadable_shards": len(self.bad_paths),
                "seed": self.seed, "image_ratio": self.image_ratio, "global_batch": self.global_batch,
                "shards_sha256": hashlib.sha256(listing.encode()).hexdigest()[:16],
                # the shuffle indexes the shards in the order given: data.shards [A, B] and [B, A] plan other
                # batches from the same files (a later key: checkpoints written without it are not checked on it)
                "shards_order_sha256": hashlib.sha256(json.dumps(order).encode()).hexdigest()[:16],
                # the image/video mix changed (no one-kind tail): a checkpoint of the old mix resumes only with
                # train.resume_with_new_data (plans without a ratio are unchanged)
                **({"mix": 2} if self.image_ratio is not None else {})}

    def _batches(self, idx: np.ndarray, gen: torch.Generator) -> np.ndarray:
        """Shuffle the samples `idx`, then cut each bucket's samples, in shuffled order, into global batches; a
        batch comes in the order its last sample came. [batches, global_batch] sample indices. Each bucket's
        leftover (< a global batch) sits this epoch out; the next epoch reshuffles."""
        g = self.global_batch
        shuffled = idx[torch.randperm(len(idx), generator=gen).numpy()]
        by_bucket = np.argsort(self.bucket_ids[shuffled], kind="stable")  # positions, grouped, in shuffled order
        counts = np.bincount(self.bucket_ids[shuffled], minlength=len(self.bucket_names))
        groups, completed, start = [], [], 0
        for n in counts:
            full = n // g * g
            if full:
                pos = by_bucket[start:start + full].reshape(-1, g)
                groups.append(shuffled[pos])
                completed.append(pos[:, -1])
            start += n
        if not groups:
            return np.empty((0, g), dtype=np.int64)
        return np.concatenate(groups)[np.argsort(np.concatenate(completed))]

    def _mixed(self, gen: torch.Generator) -> np.ndarray:
        """An epoch under `image_ratio`: each slot is an image batch with probability image_ratio, a video batch
        otherwise, and the epoch ends at the first slot whose kind has run out. The other kind's remaining batches
        sit this epoch out (the next epoch reshuffles everything), so the ratio holds to the end instead of one
        kind's surplus making a one-kind tail. 0 trains videos only, 1 images only; data holding only one kind
        trains that kind (`mix_note` says so)."""
        is_image = self.frames[self.samples] == 1
        images = self._batches(self.samples[is_image], gen)
        videos = self._batches(self.samples[~is_image], gen)
        r = self.image_ratio
        if r == 0 or not len(images):
            return videos
        if r == 1 or not len(videos):
            return images
        draws = torch.rand(len(images) + len(videos), generator=gen).numpy() < r  # more slots cannot be used
        n_img, n_vid = np.cumsum(draws), np.cumsum(~draws)
        # the first slot that asks for an image (video) batch beyond the last one ends the epoch
        over = (draws & (n_img > len(images))) | (~draws & (n_vid > len(videos)))
        slots = draws[:int(np.argmax(over))] if over.any() else draws
        out = np.empty((len(slots), self.global_batch), dtype=np.int64)
        out[slots] = images[:int(slots.sum())]
        out[~slots] = videos[:int((~slots).sum())]
        return out

    def mix_note(self) -> str | None:
        """What `image_ratio` leaves out on this data (0: the images, 1: the videos), or why it cannot be honoured
        (one kind absent); None when the mix is as asked."""
        r = self.image_ratio
        if r is None:
            return None
        n_images = int((self.frames[self.samples] == 1).sum())
        n_videos = len(self.samples) - n_images
        if r == 0 and n_images:
            return f"data.image_ratio=0 trains videos only: the {n_images} image samples are left out"
        if r == 1 and n_videos:
            return f"data.image_ratio=1 trains images only: the {n_videos} video samples are left out"
        if 0 < r < 1 and not (n_images and n_videos):
            have = "images" if n_images else "videos"
            return f"data.image_ratio={r}, but the data holds {have} only: training on {have} alone"
        return None

    def epoch(self, epoch: int) -> np.ndarray:
        """The epoch's global batches: [batches, global_batch] sample indices."""
        if epoch not in self._epochs:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            if self.image_ratio is None:
                batches = self._batches(self.samples, gen)
            else:
                batches = self._mixed(gen)
            if not len(batches):
                buckets = sorted({self.bucket_names[b] for b in np.unique(self.bucket_ids[self.samples])})
                only = {0: " (data.image_ratio=0 trains videos only)", 1: " (data.image_ratio=1 trains images only)"}
                raise ShardError(f"not one global batch of {self.global_batch} samples fits in one bucket"
                                 f"{only.get(self.image_ratio, '')}; buckets: {buckets}")
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
        return [self.ref(i) for i in self.epoch(epoch)[position]]

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
