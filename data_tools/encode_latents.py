"""Pre-encode videos and images into VAE latent shards, so that training never decodes video or runs the VAE.

Inputs (--input):
  a folder             every video/image under it (sorted), captioned by a sidecar <name>.txt
  a .jsonl / .csv file one record per input: path (relative to the manifest), caption, optional start/end (s)
  a videos.txt         one path per line, captions line by line from --prompts (default: prompts.txt beside it)
Images become 1-frame samples.

Per video: decode (decord, PyAV where decord fails or mis-reads), resample to --fps, pick the bucket nearest in
aspect ratio that the video has enough frames for, cut --clips-per-video evenly spaced clips of its 8j+1 frames,
resize + centre-crop, encode with the VAE (chunked in time), and store posterior mean + logvar (+ optional
text embeddings) with metadata in webdataset shards (see cogvx_ds/data/shards.py).

Bucket choice: among the buckets a video has enough (resampled) frames for, the nearest in aspect ratio, then
the one with most frames, then most pixels; images take 1-frame buckets if configured, else the nearest-aspect
resolution with 1 frame. Frames are scaled to cover the bucket and centre-cropped (no black borders).

Sample key <input index:09d>_<clip:03d>; its json: caption, frames, height, width, fps, bucket, source (as
listed), is_image, clip {start_s, end_s, frame_indices}, source_fps/frames/height/width, latent_shape, backend.

Scale-out and resume: input i goes to shard i // (samples_per_shard // clips_per_video), shard k to worker
k % world_size; so every worker count writes the same shards with the same samples. A shard is finished iff its
.tar exists (written via temp file + rename, after its sidecar shard-NNNNNN.json with its index entry and
rejects); a re-run skips finished shards and rewrites partial ones. The worker that completes the last shard
(or --finalize) writes index.json and rejects.jsonl. Beside each shard, shard-NNNNNN.manifest.json lists its
samples' keys, buckets, frames and byte ranges: training plans from these without reading the tars.

A worker killed while decoding (the kernel's OOM killer on a huge video, a decoder crash) leaves no exception to
record. So each unfinished shard keeps shard-NNNNNN.attempts.jsonl: which inputs started and finished decoding,
per attempt. A re-run decodes a shard whose last attempt died mid-input one input at a time, and an input that
was being decoded in two attempts that died is rejected as `worker_killed` instead of killing every re-run.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import signal
import socket
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice, zip_longest
from pathlib import Path

import torch

from cogvx_ds.data.shards import ShardWriter, write_index
from cogvx_ds.utils import atomic_write_text, local_gpu, out_dir_problem, slurm_step_task, temp_path
from data_tools.video_decode import (
    IMAGE_EXTS,
    VIDEO_EXTS,
    BadInput,
    Bucket,
    ClipPlan,
    choose_bucket,
    parse_buckets,
    plan_clips,
    read_clips,
    read_image,
    resize_center_crop,
)

PLAN_NAME = "encode_plan.json"
ATTEMPTS_SUFFIX = ".attempts.jsonl"
REJECTS_NAME = "rejects.jsonl"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ------------------------------------------------------------------------------------------------ inputs
@dataclass
class InputItem:
    index: int
    source: str  # as written in the input (relative paths stay relative): portable metadata
    path: Path | None
    caption: str | None
    start: float | None = None
    end: float | None = None
    error: tuple[str, str] | None = None  # (reason, detail) known before decoding

    @property
    def is_image(self) -> bool:
        return self.source.lower().endswith(IMAGE_EXTS)


def _make_item(index: int, root: Path, source, caption, start=None, end=None, where: str = "") -> InputItem:
    source = str(source or "").strip()
    caption = str(caption).strip() if caption is not None else None
    item = InputItem(index, source, root / source if source else None, caption or None)
    if not source:
        item.error = ("missing_path", f"{where}: no path")
    elif not item.caption:
        item.error = ("missing_caption", f"{where}: no caption for {source}")
    try:
        item.start = float(start) if start not in (None, "") else None
        item.end = float(end) if end not in (None, "") else None
    except (TypeError, ValueError):
        item.error = item.error or ("bad_clip_range", f"{where}: start/end must be seconds, got {start!r}/{end!r}")
        return item
    bounds = [t for t in (item.start, item.end) if t is not None]
    if (any(not math.isfinite(t) or t < 0 for t in bounds)
            or (item.start is not None and item.end is not None and item.end <= item.start)):
        # a negative start is read from the video's end by decord; an empty or reversed range has no frames
        item.error = item.error or ("bad_clip_range", f"{where}: start/end must be seconds with 0 <= start < end, "
                                                      f"got {start!r}/{end!r}")
    return item


def _pick(record: dict, names: tuple[str, ...]):
    return next((record[n] for n in names if record.get(n) not in (None, "")), None)


# How input lists are read. 2: UTF-8 with or without a byte-order mark (Excel's "CSV UTF-8" and some editors write
# one: read as text it became part of the first column name, record or caption), and a JSONL manifest cut into
# lines at "\n" only, as JSONL is defined (json.dumps(ensure_ascii=False) writes U+2028, U+0085, \x0b-\x0c and
# \x1c-\x1e raw inside captions). 1: plain UTF-8, and JSONL cut at every str.splitlines break, which split such a
# record in two bad lines; folders whose encode_plan.json has no "listing" were read so, and are re-read so (their
# listing hash holds).
LISTING_VERSION = 2


def _encoding(listing: int) -> str:
    return "utf-8-sig" if listing >= 2 else "utf-8"


def _manifest_rows(path: Path, listing: int = LISTING_VERSION) -> Iterator[tuple[str, dict | None]]:
    """(where, record or None) per non-empty line, read as a stream (a manifest may list millions of inputs)."""
    with open(path, newline="" if path.suffix == ".csv" else None, encoding=_encoding(listing)) as f:
        if path.suffix == ".csv":
            yield from ((f"{path}:{n}", r) for n, r in enumerate(csv.DictReader(f), start=2))
            return
        lines = (part for raw in f for part in (raw.splitlines() or [""])) if listing == 1 else f
        for n, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    record = None
                yield f"{path}:{n}", record if isinstance(record, dict) else None


def _manifest_items(path: Path, listing: int = LISTING_VERSION) -> Iterator[InputItem]:
    for i, (where, r) in enumerate(_manifest_rows(path, listing)):
        if r is None:
            yield InputItem(i, where, None, None, error=("bad_manifest_line", f"{where}: not a JSON object"))
            continue
        yield _make_item(i, path.parent, _pick(r, ("path", "video", "file")),
                         _pick(r, ("caption", "text", "prompt")), r.get("start"), r.get("end"), where)


def _list_items(videos: Path, prompts: Path | None, listing: int = LISTING_VERSION) -> Iterator[InputItem]:
    prompts = prompts or videos.with_name("prompts.txt")
    if not prompts.is_file():
        raise FileNotFoundError(f"--prompts: {prompts} not found (captions for {videos}, one per line)")
    return _paired_lines(videos, prompts, listing)


def _paired_lines(videos: Path, prompts: Path, listing: int = LISTING_VERSION) -> Iterator[InputItem]:
    """videos.txt and prompts.txt side by side, as streams; their lengths are compared at the end (blank lines
    count, trailing ones do not): a line added or lost on one side shifts every caption after it."""
    i = last_video = last_caption = 0
    with open(videos, encoding=_encoding(listing)) as fv, open(prompts, encoding=_encoding(listing)) as fc:
        for n, (line, caption) in enumerate(zip_longest(fv, fc), start=1):
            last_caption = n if caption is not None and caption.strip() else last_caption
            if line is not None and line.strip():
                last_video = n
                yield _make_item(i, videos.parent, line.rstrip("\r\n"),
                                 caption.rstrip("\r\n") if caption is not None else None, where=f"{videos}:{n}")
                i += 1
    if last_video != last_caption:
        raise ValueError(f"--prompts: {prompts} has {last_caption} lines but {videos} has {last_video}; they pair "
                         f"by line number (blank lines included), so every caption after the first difference would "
                         f"be wrong")


def _folder_items(folder: Path, listing: int = LISTING_VERSION) -> Iterator[InputItem]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTS + IMAGE_EXTS)
    for i, p in enumerate(files):
        sidecar = p.with_suffix(".txt")
        caption = sidecar.read_text(encoding=_encoding(listing), errors="replace") if sidecar.is_file() else None
        yield _make_item(i, folder, p.relative_to(folder).as_posix(), caption, where=str(sidecar))


def iter_inputs(input_path: str | Path, prompts: str | Path | None = None,
                listing: int = LISTING_VERSION) -> Iterator[InputItem]:
    """The inputs in a fixed order (their index decides shard and key), as a stream; a bad --input fails here,
    a videos.txt / prompts.txt length mismatch at the end of the stream. `listing`: see LISTING_VERSION."""
    path = Path(input_path)
    if path.is_dir():
        return _folder_items(path, listing)
    if not path.is_file():
        raise FileNotFoundError(f"--input: {path} does not exist")
    if path.suffix in (".jsonl", ".csv"):
        return _manifest_items(path, listing)
    if path.suffix == ".txt":
        return _list_items(path, Path(prompts) if prompts else None, listing)
    raise ValueError(f"--input: {path} must be a folder, a .jsonl/.csv manifest or a videos.txt list")


def load_inputs(input_path: str | Path, prompts: str | Path | None = None) -> list[InputItem]:
    """All inputs, in order (see iter_inputs)."""
    return list(iter_inputs(input_path, prompts))


def read_inputs(input_path: str | Path, prompts: str | Path | None, inputs_per_shard: int, rank: int, world: int,
                progress: bool = False, listing: int = LISTING_VERSION) -> tuple[int, str, dict[int, InputItem]]:
    """One pass over the inputs: (how many, the sha256 of the whole listing, this worker's inputs by index).
    Only this worker's are kept: at 10M inputs with dense captions, the whole list is about 15 GB per worker."""
    from tqdm import tqdm

    digest, mine, count = hashlib.sha256(b"["), {}, 0
    for item in tqdm(iter_inputs(input_path, prompts, listing), desc="reading inputs", unit=" inputs", disable=not progress,
                     mininterval=2):
        # the bytes of json.dumps([[source, caption, start, end], ...]), fed item by item
        digest.update((b", " if count else b"") + json.dumps([item.source, item.caption, item.start, item.end]).encode())
        if item.index // inputs_per_shard % world == rank:
            mine[item.index] = item
        count += 1
    digest.update(b"]")
    return count, digest.hexdigest(), mine


# ------------------------------------------------------------------------------------------------ plan
@dataclass(frozen=True)
class ShardPlan:
    num_inputs: int
    inputs_per_shard: int

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_inputs / self.inputs_per_shard)

    def inputs_of(self, shard: int) -> range:
        return range(shard * self.inputs_per_shard, min(self.num_inputs, (shard + 1) * self.inputs_per_shard))

    def owned(self, rank: int, world_size: int) -> list[int]:
        return list(range(rank, self.num_shards, world_size))


def shard_name(shard: int) -> str:
    return f"shard-{shard:06d}"


def _launcher_rank(env) -> tuple[int, int]:
    """This process within its launch: torchrun's RANK/WORLD_SIZE, else one task of a multi-task `srun` step
    (`cogvx_ds.utils.slurm_step_task`: a batch script's own shell is one process), else (0, 1)."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"])
    return slurm_step_task(env) or (0, 1)


def detect_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """--rank/--world-size, else from the environment: a slurm array task, a process of torchrun or a task of a
    multi-task srun step (`_launcher_rank`), or both (array task a of A running n processes: worker a * n + i of
    A * n), else a single worker."""
    env = os.environ
    if (rank is None) != (world_size is None):  # one alone made every worker rank 0 (or a world of 1)
        raise ValueError("--rank and --world-size go together (or give neither: the launcher's environment says)")
    if rank is None and world_size is None:
        array_rank, array_size = 0, 1
        if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
            first = int(env.get("SLURM_ARRAY_TASK_MIN", 0))  # arrays may start at 1 (--array=1-8)
            step = int(env.get("SLURM_ARRAY_TASK_STEP", 1))  # or skip ids (--array=0-15:2)
            array_rank = (int(env["SLURM_ARRAY_TASK_ID"]) - first) // step
            array_size = int(env["SLURM_ARRAY_TASK_COUNT"])
        inner, inner_size = _launcher_rank(env)
        rank, world_size = array_rank * inner_size + inner, array_size * inner_size
    rank, world_size = rank or 0, world_size or 1
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
    return rank, world_size


def _check_model_paths(args) -> None:
    """--vae and --text-encoder point at loadable folders (a typo used to lock the output folder: the plan, which
    records both paths, was written before the models were loaded, and the corrected re-run was refused)."""
    if not (Path(args.vae) / "config.json").is_file():
        raise FileNotFoundError(f"--vae {args.vae}: no config.json there (expected a diffusers "
                                f"AutoencoderKLCogVideoX folder, e.g. <CogVideoX pipeline>/vae)")
    if args.text_encoder:
        from cogvx_ds.models.text_encoder import _resolve_folders

        try:
            _resolve_folders(args.text_encoder)
        except (FileNotFoundError, NotADirectoryError) as e:
            raise FileNotFoundError(f"--text-encoder: {e}") from None


def plan_record(args, inputs_sha256: str, plan: ShardPlan, listing: int = LISTING_VERSION) -> dict:
    """What decides the output: a re-run (or another worker) with different values would mix two datasets."""
    return {"inputs_sha256": inputs_sha256, "num_inputs": plan.num_inputs, "listing": listing,
            "inputs_per_shard": plan.inputs_per_shard, "num_shards": plan.num_shards,
            "buckets": [b.label for b in args.buckets], "fps": args.fps, "clips_per_video": args.clips_per_video,
            "latent_dtype": args.latent_dtype, "vae": str(Path(args.vae).resolve()),
            "text_encoder": str(Path(args.text_encoder).resolve()) if args.text_encoder else None,
            "text_max_length": args.text_max_length if args.text_encoder else None}


def check_or_write_plan(out: Path, record: dict) -> None:
    path = out / PLAN_NAME
    if path.is_file():
        old = {"listing": 1, **json.loads(path.read_text())}  # plans before the key: read by the first rule
        diff = {k: (old.get(k), v) for k, v in record.items() if old.get(k) != v}
        if diff:
            raise ValueError(f"{path}: this folder was encoded with other settings ({diff}, as (was, now)); "
                             "use a new --out or the original settings")
        return
    atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True))


# ------------------------------------------------------------------------------------------------ decode
@dataclass
class Prepared:
    """One input after decoding and resizing, ready for the VAE (or its reject)."""

    item: InputItem
    clips: list[tuple[ClipPlan, torch.Tensor]] = field(default_factory=list)  # uint8 [T, 3, H, W]
    meta: dict = field(default_factory=dict)
    reject: tuple[str, str] | None = None
    decode_s: float = 0.0
    resize_s: float = 0.0


def prepare(item: InputItem, buckets: list[Bucket], fps: float | None, clips_per_video: int,
            backend: str = "auto") -> Prepared:
    """Decode + resize one input; every failure becomes a reject (never an exception)."""
    out = Prepared(item)
    if item.error:
        out.reject = item.error
        return out
    t0 = time.perf_counter()
    try:
        source_hw = []

        def fit(clip, plan):  # each clip is scaled down as soon as it is decoded (see read_clips)
            t = time.perf_counter()
            source_hw.append(clip.shape[1:3])
            clip = resize_center_crop(clip, plan.bucket.height, plan.bucket.width)
            out.resize_s += time.perf_counter() - t
            return clip

        if item.is_image:
            frames = read_image(item.path)
            bucket = choose_bucket(buckets, frames.shape[1], frames.shape[2], 1, is_image=True)
            plans, info = [ClipPlan(bucket, (0,), None, None, None)], None
            clips = [fit(frames, plans[0])]
        else:
            def choose(info):
                return plan_clips(info, buckets, fps, clips_per_video, item.start, item.end)

            info, plans, clips, out.meta["backend"] = read_clips(item.path, choose, backend, transform=fit)
        out.clips = list(zip(plans, clips))
        out.decode_s = time.perf_counter() - t0 - out.resize_s
        h, w = source_hw[0]
        out.meta.update(source_height=int(h), source_width=int(w))
        if info is not None:
            out.meta.update(source_fps=info.fps, source_frames=info.num_frames)
    except BadInput as e:
        out.reject = (e.reason, e.detail)
    except Exception as e:  # anything else a hostile file triggers: one bad file never stops the job
        out.reject = ("decode_error", f"{item.source}: {type(e).__name__}: {e}")
    return out


def prefetched(fn: Callable, items: Iterable, workers: int, depth: int) -> Iterator:
    """fn(item) for each item, in order; with workers > 0 up to `depth` results are computed ahead in threads
    (decord, PyAV and torch release the GIL), overlapping decoding with the VAE in the caller."""
    if workers <= 0:
        yield from map(fn, items)
        return
    it = iter(items)
    with ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
        pending = deque(pool.submit(fn, x) for x in islice(it, max(depth, 1)))
        while pending:
            result = pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(fn, nxt))
            yield result


# ------------------------------------------------------------------------------------------------ attempts
def attempts_path(out: Path, shard: int) -> Path:
    return out / f"{shard_name(shard)}{ATTEMPTS_SUFFIX}"


def died_while_decoding(path: Path) -> Counter:
    """Per input index: in how many earlier attempts the worker died while decoding it (started, not finished,
    in an attempt that did not end in an ordinary error)."""
    died, current, aborted = Counter(), set(), False
    if not path.is_file():
        return died

    def end_attempt():
        if not aborted:
            died.update(current)

    for line in path.read_text().splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by the kill
        if "attempt" in event:
            end_attempt()
            current, aborted = set(), False
        elif "started" in event:
            current.add(event["started"])
        elif "done" in event:
            current.discard(event["done"])
        elif "aborted" in event:
            aborted = True
    end_attempt()
    return died


class AttemptJournal:
    """Appends, per shard, which inputs start and finish decoding (shard-NNNNNN.attempts.jsonl); see the module
    docstring. Written from the decoding threads; deleted when the shard is finished."""

    def __init__(self, out: Path, plan: ShardPlan):
        self.out, self.plan, self.lock, self.files, self.closed = out, plan, threading.Lock(), {}, False

    def _write(self, shard: int, event: dict) -> None:
        with self.lock:
            if self.closed:
                return  # decoding threads still finishing after an error
            f = self.files.get(shard)
            if f is None:
                f = self.files[shard] = open(attempts_path(self.out, shard), "a")
                # on a line of its own: the last line of a killed attempt may be cut short
                f.write("\n" + json.dumps({"attempt": f"{socket.gethostname()}-{os.getpid()}", "time": time.time()}) + "\n")
            f.write(json.dumps(event) + "\n")
            f.flush()  # in the page cache: survives the process being killed

    def started(self, index: int) -> None:
        self._write(index // self.plan.inputs_per_shard, {"started": index})

    def done(self, index: int) -> None:
        self._write(index // self.plan.inputs_per_shard, {"done": index})

    def finished(self, shard: int) -> None:
        with self.lock:
            if shard in self.files:
                self.files.pop(shard).close()
        attempts_path(self.out, shard).unlink(missing_ok=True)

    def aborted(self) -> None:
        """An ordinary error or a polite stop (not a kill): the inputs in flight are not to blame. Journals opened
        later by decoding threads still running are not written."""
        with self.lock:
            self.closed = True
            for f in self.files.values():
                f.write(json.dumps({"aborted": True}) + "\n")
                f.close()
            self.files.clear()


# ------------------------------------------------------------------------------------------------ encode
EMPTY_TEXT_NAME = "empty_text.safetensors"


class Encoder:
    """VAE (+ optional text encoder) on one device; batches clips of one bucket."""

    def __init__(self, args):
        from cogvx_ds.models.vae import CogVideoXVAE

        self.device = torch.device(args.device)
        if self.device.type == "cuda":  # library calls that use the current device must not open a context on GPU 0
            torch.cuda.set_device(self.device)
        self.vae = CogVideoXVAE.from_diffusers(args.vae, dtype=DTYPES[args.vae_dtype]).to(self.device).eval()
        self.vae.set_chunking(args.encode_chunk_frames or None, self.vae.latent_frames_per_chunk)
        if args.tiling:
            self.vae.enable_tiling()
        if args.slicing:
            self.vae.enable_slicing()
        self.text = None
        if args.text_encoder:
            from cogvx_ds.models.text_encoder import TextEncoder

            dtype = DTYPES[args.text_dtype or ("bf16" if self.device.type == "cuda" else "fp32")]
            self.text = TextEncoder.from_pretrained(args.text_encoder, max_length=args.text_max_length,
                                                    device=self.device, dtype=dtype)

    @torch.inference_mode()
    def write_empty_text(self, out: Path) -> None:
        """empty_text.safetensors: the empty caption's embedding, which training uses for caption dropout."""
        if self.text is None or (out / EMPTY_TEXT_NAME).is_file():
            return
        from safetensors.torch import save_file

        emb, mask = self.text.empty_embedding()
        tmp = temp_path(out / EMPTY_TEXT_NAME)
        save_file({"embedding": emb[0].float().cpu().contiguous(), "mask": mask[0].cpu().contiguous()}, str(tmp))
        os.replace(tmp, out / EMPTY_TEXT_NAME)

    @torch.inference_mode()
    def encode(self, clips: list[torch.Tensor], captions: list[str]):
        """uint8 [T, 3, H, W] clips of one size -> mean, logvar [B, C, F, h, w] (+ text embedding, mask)."""
        video = torch.stack(clips).to(self.device).permute(0, 2, 1, 3, 4)  # [B, 3, T, H, W]
        video = video.to(self.vae.dtype) / 127.5 - 1.0
        mean, logvar = self.vae.encode(video)
        emb, mask = self.text.encode(captions) if self.text else (None, None)
        return mean.float().cpu(), logvar.float().cpu(), emb, mask


@dataclass
class Stats:
    clips: int = 0
    frames: int = 0
    inputs: int = 0
    rejects: Counter = field(default_factory=Counter)
    bytes_written: int = 0
    shards_written: int = 0
    shards_skipped: int = 0
    times: Counter = field(default_factory=Counter)  # decode / resize (summed over workers), wait, encode, write


class ShardJob:
    """Writes one shard: buffers clips of one bucket into VAE batches, then the sidecar, then the tar."""

    def __init__(self, out: Path, shard: int, args, encoder: Encoder, stats: Stats):
        self.out, self.shard, self.args, self.encoder, self.stats = out, shard, args, encoder, stats
        self.writer = ShardWriter(out / f"{shard_name(shard)}.tar", DTYPES[self.args.latent_dtype])
        self.batch: list[tuple[str, torch.Tensor, dict]] = []
        self.rejects: list[dict] = []

    def add(self, prep: Prepared) -> None:
        self.stats.inputs += 1
        if prep.reject:
            reason, detail = prep.reject
            self.rejects.append({"input_index": prep.item.index, "source": prep.item.source, "reason": reason,
                                 "detail": detail})
            self.stats.rejects[reason] += 1
            return
        for n, (plan, clip) in enumerate(prep.clips):
            full = len(self.batch) >= self.args.batch_size
            if self.batch and (full or self.batch[0][2]["bucket"] != plan.bucket.label):
                self.flush()
            self.batch.append((f"{prep.item.index:09d}_{n:03d}", clip, self._meta(prep, n, plan)))

    def _meta(self, prep: Prepared, n: int, plan: ClipPlan) -> dict:
        b = plan.bucket
        return {"caption": prep.item.caption, "frames": b.frames, "height": b.height, "width": b.width,
                "fps": plan.fps, "source": prep.item.source, "bucket": b.label, "is_image": prep.item.is_image,
                "input_index": prep.item.index, "clip_index": n,
                "clip": {"start_s": plan.start_s, "end_s": plan.end_s, "frame_indices": list(plan.indices)},
                **prep.meta}

    def flush(self) -> None:
        if not self.batch:
            return
        keys, clips, metas = zip(*self.batch)
        t0 = time.perf_counter()
        try:
            mean, logvar, emb, mask = self.encoder.encode(list(clips), [m["caption"] for m in metas])
        except torch.cuda.OutOfMemoryError:
            raise  # a bigger problem than one input: stop (the shard is rewritten on the next run)
        except Exception as e:
            raise RuntimeError(f"VAE encode failed for {keys} ({metas[0]['bucket']}): {e}") from e
        t1 = time.perf_counter()
        for i, (key, meta) in enumerate(zip(keys, metas)):
            meta = dict(meta, latent_shape=list(mean.shape[1:]))
            text = (emb[i].to(DTYPES[self.args.latent_dtype]).cpu(), mask[i].bool().cpu()) if emb is not None else ()
            self.writer.add(key, mean[i], logvar[i], meta, *text)
            self.stats.clips += 1
            self.stats.frames += meta["frames"]
        self.stats.times["encode"] += t1 - t0
        self.stats.times["write"] += time.perf_counter() - t1
        self.batch = []

    def finish(self) -> None:
        self.flush()
        t0 = time.perf_counter()
        entry = {"path": self.writer.path.name, "num_samples": self.writer.count, "buckets": dict(self.writer.buckets)}
        sidecar = self.out / f"{shard_name(self.shard)}.json"
        atomic_write_text(sidecar, json.dumps({"entry": entry, "rejects": self.rejects}, indent=1, sort_keys=True))
        self.writer.close()  # the rename that marks the shard finished: after its sidecar exists
        self.stats.bytes_written += self.writer.path.stat().st_size + sidecar.stat().st_size
        self.stats.shards_written += 1
        self.stats.times["write"] += time.perf_counter() - t0

    def abort(self) -> None:
        self.writer.abort()


# ------------------------------------------------------------------------------------------------ index
def missing_shards(out: Path, plan: ShardPlan) -> list[int]:
    return [k for k in range(plan.num_shards) if not (out / f"{shard_name(k)}.tar").is_file()]


def finalize(out: Path) -> Path:
    """index.json + rejects.jsonl from the finished shards' sidecars; every planned shard must be finished."""
    record = json.loads((out / PLAN_NAME).read_text())
    plan = ShardPlan(record["num_inputs"], record["inputs_per_shard"])
    missing = missing_shards(out, plan)
    if missing:
        raise RuntimeError(f"{out}: {len(missing)} of {plan.num_shards} shards are not finished yet "
                           f"(e.g. {', '.join(shard_name(k) for k in missing[:5])}); re-run their workers")
    entries, rejects = [], []
    for k in range(plan.num_shards):
        side = json.loads((out / f"{shard_name(k)}.json").read_text())
        rejects += side["rejects"]
        if side["entry"]["num_samples"]:
            entries.append(side["entry"])  # empty shards (all inputs rejected) are left out of the index
    atomic_write_text(out / REJECTS_NAME, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rejects))
    reasons = Counter(r["reason"] for r in rejects)
    extra = {"num_inputs": plan.num_inputs, "num_rejects": len(rejects), "reject_reasons": dict(reasons),
             "latent_dtype": record["latent_dtype"], "buckets_configured": record["buckets"],
             "fps": record["fps"], "has_text_embeddings": bool(record["text_encoder"])}
    return write_index(out, entries, extra)


# ------------------------------------------------------------------------------------------------ run
def run(args) -> dict:
    """Encode this worker's unfinished shards; returns the summary (also printed)."""
    out = Path(args.out)
    if args.finalize:
        return {"index": str(finalize(out))}
    # before anything is created, the inputs read (minutes at 10M) or the plan (which records them) written
    _check_model_paths(args)
    rank, world = detect_rank(args.rank, args.world_size)
    out.mkdir(parents=True, exist_ok=True)
    per_shard = max(1, args.samples_per_shard // max(args.clips_per_video, 1))
    plan_file = out / PLAN_NAME  # a folder started before LISTING_VERSION 2 goes on reading its inputs as it did
    listing = json.loads(plan_file.read_text()).get("listing", 1) if plan_file.is_file() else LISTING_VERSION
    count, inputs_sha256, items = read_inputs(args.input, args.prompts, per_shard, rank, world,
                                              progress=not args.no_progress, listing=listing)
    if not count:
        raise ValueError(f"--input: no inputs found in {args.input}")
    plan = ShardPlan(count, per_shard)
    check_or_write_plan(out, plan_record(args, inputs_sha256, plan, listing))
    owned = plan.owned(rank, world)
    todo = [k for k in owned if not (out / f"{shard_name(k)}.tar").is_file()]
    stats = Stats(shards_skipped=len(owned) - len(todo))
    start = time.perf_counter()
    if todo:
        _remove_stale_temps(out, todo)
        _encode_shards(out, plan, todo, items, args, stats, f"{rank}/{world}")
    summary = _summary(stats, time.perf_counter() - start, rank, world, len(owned))
    if not missing_shards(out, plan):  # this worker finished last (or everything was done): build the index
        summary["index"] = str(finalize(out))
    _print_summary(summary)
    return summary


def _remove_stale_temps(out: Path, todo: list[int]) -> None:
    """Temp files of unfinished shards this worker owns, left by a killed run: one listing of the folder for all
    of them (a glob per shard lists it once per shard: quadratic over tens of thousands of shards)."""
    mine = {shard_name(k) for k in todo}
    with os.scandir(out) as entries:
        for e in entries:
            if e.name.startswith(".") and ".tmp-" in e.name and e.name[1:].split(".", 1)[0] in mine:
                Path(e.path).unlink(missing_ok=True)


def _encode_shards(out: Path, plan: ShardPlan, todo: list[int], items: dict[int, InputItem], args, stats: Stats,
                   label: str) -> None:
    from tqdm import tqdm

    t0 = time.perf_counter()
    encoder = Encoder(args)
    encoder.write_empty_text(out)
    stats.times["setup"] += time.perf_counter() - t0  # model loading: not part of the throughput
    died = {k: died_while_decoding(attempts_path(out, k)) for k in todo}
    careful = [k for k in todo if died[k]]  # the last attempt died mid-input: one input at a time, to find it
    condemned = {i: n for k in careful for i, n in died[k].items() if n >= 2}
    journal = AttemptJournal(out, plan)
    kill_on = os.environ.get("COGVX_FAULT_KILL_ON_SOURCE")

    def _prepare(item):
        if item.index in condemned:
            return Prepared(item, reject=("worker_killed", f"{item.source}: the encoder died while decoding it in "
                                          f"{condemned[item.index]} attempts (killed for memory? a decoder crash?); "
                                          f"skipped. To retry it (more memory, fewer --decode-workers), delete "
                                          f"{shard_name(item.index // plan.inputs_per_shard)}.tar and .json and "
                                          f"re-run"))
        journal.started(item.index)
        if kill_on and kill_on in item.source:  # test hook: the process dies mid-decode, as under the OOM killer
            os.kill(os.getpid(), getattr(signal, os.environ.get("COGVX_FAULT_KILL_SIGNAL", "SIGKILL")))
        prep = prepare(item, args.buckets, args.fps, args.clips_per_video, args.backend)
        journal.done(item.index)
        return prep

    bar = tqdm(total=sum(len(plan.inputs_of(k)) for k in todo), desc=f"encode_latents {label}", unit="input",
               disable=args.no_progress)
    # slurm's preemption, scancel and time limit send SIGTERM (then SIGKILL after its grace time): an exception
    # here, so that the journal records a stop and not a death that the inputs in flight are blamed for
    polite = (signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, _raise_exit) for s in polite}
    try:
        for shards, workers in ((careful, 0), ([k for k in todo if k not in careful], args.decode_workers)):
            work = [items[i] for k in shards for i in plan.inputs_of(k)]
            stream = prefetched(_prepare, work, workers, args.prefetch)
            for k in shards:
                job = ShardJob(out, k, args, encoder, stats)
                try:
                    for _ in plan.inputs_of(k):
                        t0 = time.perf_counter()
                        prep = next(stream)
                        stats.times["wait"] += time.perf_counter() - t0
                        stats.times["decode"] += prep.decode_s
                        stats.times["resize"] += prep.resize_s
                        job.add(prep)
                        bar.update(1)
                        bar.set_postfix(clips=stats.clips, rejects=sum(stats.rejects.values()))
                    job.finish()
                    journal.finished(k)
                except BaseException:
                    job.abort()
                    raise
    except BaseException:  # an error, Ctrl-C, SIGTERM: not the inputs' fault (a kill never gets here)
        journal.aborted()
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    bar.close()


def _raise_exit(signum, _frame):
    raise SystemExit(128 + signum)


def _summary(stats: Stats, elapsed: float, rank: int, world: int, owned: int) -> dict:
    busy = max(elapsed - stats.times.get("setup", 0.0), 1e-9)
    return {"rank": rank, "world_size": world, "shards_owned": owned, "shards_written": stats.shards_written,
            "shards_skipped": stats.shards_skipped, "inputs": stats.inputs, "clips": stats.clips,
            "frames": stats.frames, "rejects": sum(stats.rejects.values()), "reject_reasons": dict(stats.rejects),
            "bytes_written": stats.bytes_written, "elapsed_s": elapsed,
            "clips_per_s": stats.clips / busy, "frames_per_s": stats.frames / busy,
            "times_s": {k: round(v, 4) for k, v in stats.times.items()}}


def _print_summary(s: dict) -> None:
    if "clips" not in s:
        print(f"encode_latents: wrote {s['index']}", file=sys.stderr)
        return
    lines = [
        f"encode_latents rank {s['rank']}/{s['world_size']}: {s['shards_written']} shards written, "
        f"{s['shards_skipped']} already finished (of {s['shards_owned']} owned)",
        f"  {s['inputs']} inputs -> {s['clips']} clips, {s['frames']} frames in {s['elapsed_s']:.1f} s "
        f"({s['times_s'].get('setup', 0):.1f} s loading models): "
        f"{s['clips_per_s']:.2f} clips/s, {s['frames_per_s']:.1f} frames/s",
        f"  rejects: {s['rejects']} {s['reject_reasons'] or ''}",
        f"  bytes written: {s['bytes_written']:,} ({s['bytes_written'] / 2**20:.1f} MiB)",
        "  time (s): " + ", ".join(f"{k} {v:.2f}" for k, v in s["times_s"].items()),
    ]
    if "index" in s:
        lines.append(f"  index: {s['index']}")
    print("\n".join(lines), file=sys.stderr)


# ------------------------------------------------------------------------------------------------ cli
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_tools.encode_latents", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("--config", help="YAML file whose keys are these options (dashes or underscores); "
                                    "command-line options override it")
    io = p.add_argument_group("input and output")
    io.add_argument("--input", help="folder, .jsonl/.csv manifest, or videos.txt (required)")
    io.add_argument("--prompts", help="captions for a videos.txt input (default: prompts.txt beside it)")
    io.add_argument("--out", help="output folder for shards, index.json and rejects.jsonl (required; the only "
                                  "option --finalize needs)")
    io.add_argument("--vae", help="diffusers-format CogVideoX VAE folder (config.json + safetensors) (required)")
    io.add_argument("--text-encoder", help="local T5 (or other encoder) folder: store each caption's text embeddings too (training needs them; "
                         "without it the shards hold latents only, e.g. for VAE checks)")
    io.add_argument("--text-max-length", type=int, default=226, help="text tokens per caption (default 226)")
    io.add_argument("--text-dtype", choices=("fp32", "bf16"), default=None,
                    help="text encoder dtype (default bf16 on GPUs, fp32 on CPUs; T5 overflows in fp16)")
    clip = p.add_argument_group("clips")
    clip.add_argument("--buckets", default="480x720x49",
                      help="comma-separated HEIGHTxWIDTHxFRAMES buckets, frames 1 or 8j+1 (an odd latent count; "
                           "default 480x720x49)")
    clip.add_argument("--fps", type=float, default=None, help="resample videos to this frame rate (default: keep)")
    clip.add_argument("--clips-per-video", type=int, default=1,
                      help="evenly spaced, non-overlapping clips per video; 0 = as many as fit (counted as 1 "
                           "for --samples-per-shard) (default 1)")
    enc = p.add_argument_group("encoding")
    enc.add_argument("--latent-dtype", choices=("bf16", "fp16"), default="bf16", help="stored dtype (default bf16)")
    enc.add_argument("--vae-dtype", choices=tuple(DTYPES), default="fp32",
                     help="VAE compute dtype (default fp32; bf16 on GPUs halves memory)")
    enc.add_argument("--device", default=None, help="torch device (default: cuda[:LOCAL_RANK] if available, else cpu)")
    enc.add_argument("--batch-size", type=int, default=1, help="clips of one bucket per VAE call (default 1)")
    enc.add_argument("--encode-chunk-frames", type=int, default=8,
                     help="frames per VAE encoder chunk, a multiple of 4; 0 = whole clip (default 8)")
    enc.add_argument("--tiling", action="store_true", help="spatial tiling in the VAE (large frames, less memory)")
    enc.add_argument("--slicing", action="store_true", help="encode a batch one sample at a time")
    run_ = p.add_argument_group("scale-out and performance")
    run_.add_argument("--samples-per-shard", type=int, default=256,
                      help="a shard holds the clips of samples_per_shard // clips_per_video consecutive inputs "
                           "(default 256)")
    run_.add_argument("--rank", type=int, default=None, help="this worker (default: from the slurm array task, torchrun or a multi-task srun step, combined when nested)")
    run_.add_argument("--world-size", type=int, default=None, help="number of workers")
    run_.add_argument("--decode-workers", type=int, default=2,
                      help="background decoding threads; 0 = decode inline (default 2)")
    run_.add_argument("--prefetch", type=int, default=None, help="inputs decoded ahead (default 2x decode workers)")
    run_.add_argument("--backend", choices=("auto", "decord", "pyav"), default="auto",
                      help="video decoder; auto = decord with PyAV fallback (default)")
    run_.add_argument("--finalize", action="store_true",
                      help="only (re)build index.json and rejects.jsonl from the finished shards")
    run_.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    run_.add_argument("--summary-json", help="also write the summary to this file")
    return p


EPILOG = """examples:
  python -m data_tools.encode_latents --input data/manifest.jsonl --vae ckpt/vae --out latents/lq \\
      --buckets 256x256x17,256x384x17 --fps 8 --clips-per-video 2
  # slurm array of 64 workers (each owns shards k % 64 == task); any one may finish last and write index.json
  sbatch --array=0-63 launch/encode_array.sbatch
  python -m data_tools.encode_latents --out latents/lq --finalize   # rebuild index.json by hand

outputs in --out: shard-NNNNNN.tar (+ shard-NNNNNN.json sidecar), index.json, rejects.jsonl, encode_plan.json
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        import yaml

        values = yaml.safe_load(Path(pre.config).read_text()) or {}
        known = {a.dest for a in parser._actions}
        values = {str(k).replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(values) - known - {"config"})
        if unknown:
            parser.error(f"{pre.config}: unknown keys {unknown}")
        parser.set_defaults(**values)
    args = parser.parse_args(argv)
    for name in ("out",) if args.finalize else ("input", "out", "vae"):
        if not getattr(args, name):
            parser.error(f"--{name} is required")
    try:
        args.buckets = parse_buckets(args.buckets)
    except ValueError as e:
        parser.error(str(e))
    if args.samples_per_shard < 1 or args.batch_size < 1 or args.clips_per_video < 0:
        parser.error("--samples-per-shard and --batch-size must be >= 1, --clips-per-video >= 0")
    if args.world_size is not None and args.world_size < 1:
        parser.error(f"--world-size must be >= 1, got {args.world_size}")
    if args.decode_workers < 0 or (args.prefetch is not None and args.prefetch < 0):
        parser.error(f"--decode-workers and --prefetch must be >= 0, got {args.decode_workers} / {args.prefetch}")
    if args.encode_chunk_frames % 4:
        parser.error(f"--encode-chunk-frames must be a multiple of 4, got {args.encode_chunk_frames}")
    if args.fps is not None and args.fps <= 0:
        parser.error(f"--fps must be > 0, got {args.fps}")
    if args.prefetch is None:
        args.prefetch = 2 * max(args.decode_workers, 1)
    problem = None if args.finalize else out_dir_problem(args.out, "--out")  # after every other check
    if problem:
        parser.error(problem)
    if args.device is None:
        args.device = f"cuda:{local_gpu()}" if torch.cuda.is_available() else "cpu"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        summary = run(args)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"encode_latents: error: {e}", file=sys.stderr)
        return 1
    if args.summary_json:
        atomic_write_text(Path(args.summary_json), json.dumps(summary, indent=2))
    if summary.get("inputs") and not summary.get("clips"):
        print(f"encode_latents: error: all {summary['inputs']} input(s) were rejected ({summary['reject_reasons']}); "
              f"see rejects.jsonl in {args.out}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
