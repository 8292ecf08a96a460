"""Reading raw videos and images for latent pre-encoding: buckets, clip planning, decoding, resize + centre crop.

Decoding uses decord (fast random access) and falls back to PyAV whenever decord raises *or* returns frames of
the wrong shape: decord 0.6.0 silently mis-reads some frame sizes (a 32x48 video comes back with 4 channels and
`get_batch` then fails), so its output is validated, not trusted.

Everything a bad file can do is turned into `BadInput(reason, detail)`, which the encoder records as a reject.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".gif")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_EPS = 1e-6  # absorbs float error in frame-time arithmetic (e.g. 29.97 fps)


class BadInput(Exception):
    """An input that cannot become a sample. `reason` is a short stable code, `detail` a human explanation."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Bucket:
    height: int
    width: int
    frames: int

    @property
    def label(self) -> str:
        return f"{self.height}x{self.width}x{self.frames}"


def parse_buckets(spec: str | Sequence[str], temporal_ratio: int = 4, spatial_ratio: int = 8) -> list[Bucket]:
    """'480x720x49,256x256x17' (or a list of such strings) -> buckets; frames must be 1 or 8j+1 (an odd number of
    latents), sides multiples of 8."""
    items = spec.split(",") if isinstance(spec, str) else [s for part in spec for s in str(part).split(",")]
    buckets = []
    for item in (s.strip() for s in items if s.strip()):
        try:
            h, w, f = (int(x) for x in item.lower().split("x"))
        except ValueError:
            raise ValueError(f"--buckets: {item!r} is not HEIGHTxWIDTHxFRAMES (e.g. 480x720x49)") from None
        if h <= 0 or w <= 0 or h % spatial_ratio or w % spatial_ratio:
            raise ValueError(f"--buckets: {item!r}: height and width must be positive multiples of {spatial_ratio}")
        if f < 1 or (f - 1) % (2 * temporal_ratio):
            rule = f"frames must be 1 or {2 * temporal_ratio}j+1 ({2 * temporal_ratio + 1}, {4 * temporal_ratio + 1}, ..., 49)"
            if f > 1 and (f - 1) % temporal_ratio == 0:
                # 4k+1 frames encode to k+1 latents; an even count (5 -> 2, 13 -> 4) decodes to 4(k+1) frames, and
                # the sampler and the README's rule take odd counts only
                latents = (f - 1) // temporal_ratio + 1
                rule += f": an odd number of latents ({f} frames would give {latents} latents, decoded as " \
                        f"{temporal_ratio * latents} frames)"
            raise ValueError(f"--buckets: {item!r}: {rule}")
        buckets.append(Bucket(h, w, f))
    if not buckets:
        raise ValueError("--buckets: no bucket given (expected e.g. 480x720x49,256x256x17)")
    if len(set(buckets)) != len(buckets):
        raise ValueError(f"--buckets: duplicate entries in {spec!r}")
    return buckets


def choose_bucket(buckets: Sequence[Bucket], height: int, width: int, frames: int, is_image: bool) -> Bucket | None:
    """The bucket closest in aspect ratio among those the input can fill; ties go to more frames, then more pixels.

    Images take 1-frame buckets when some are configured, otherwise the nearest-aspect resolution with 1 frame.
    Videos take only buckets with 2+ frames they have enough (resampled) frames for; None when none fits.
    """
    def aspect_distance(b: Bucket) -> float:
        return abs(math.log((width / height) / (b.width / b.height)))

    if is_image:
        candidates = [b for b in buckets if b.frames == 1] or [Bucket(b.height, b.width, 1) for b in buckets]
    else:
        candidates = [b for b in buckets if 1 < b.frames <= frames]
    if not candidates:
        return None
    return min(candidates, key=lambda b: (round(aspect_distance(b), 9), -b.frames, -b.height * b.width))


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    fps: float
    height: int  # as displayed (after the file's rotation)
    width: int
    quarter_turns: int = 0  # PyAV: counter-clockwise quarter turns that display the decoded frames upright
    # pixel aspect ratio (anamorphic video: stored pixels wider or narrower than square); height/width above are the
    # displayed size, to which the decoded frames are stretched before the caller's transform
    sample_aspect: float = 1.0
    # presentation time of every frame in seconds from the first (ascending), where the container says; plan_clips
    # selects frames by time when they are off the num_frames / fps grid (variable frame rate)
    timestamps: tuple[float, ...] | None = field(default=None, compare=False, repr=False)


def _vfr_times(info: VideoInfo) -> np.ndarray | None:
    """The frame times of a variable-frame-rate video (some frame more than half a frame off i / fps), else None
    (constant frame rate: frame index arithmetic, exact)."""
    t = info.timestamps
    if t is None or len(t) != info.num_frames or info.num_frames < 2:
        return None
    t = np.asarray(t, dtype=np.float64)
    t = t - t[0]
    if np.any(np.diff(t) <= 0) or np.max(np.abs(t - np.arange(len(t)) / info.fps)) <= 0.5 / info.fps:
        return None
    return t


def _timestamps(times, count: int) -> tuple[float, ...] | None:
    """Sorted presentation times (s) from the first, if there is one per frame."""
    times = sorted(times)
    if len(times) != count or count < 2:
        return None
    return tuple(float(x - times[0]) for x in times)


@dataclass(frozen=True)
class ClipPlan:
    bucket: Bucket
    indices: tuple[int, ...]  # source frame indices, one per output frame
    fps: float | None  # output frame rate (None for images)
    start_s: float | None
    end_s: float | None


def plan_clips(info: VideoInfo, buckets: Sequence[Bucket], target_fps: float | None, clips_per_video: int,
               start_s: float | None = None, end_s: float | None = None) -> list[ClipPlan]:
    """Resample [start_s, end_s) to target_fps, pick a bucket, and cut evenly spaced non-overlapping clips.

    Output frame j of the range shows source frame first + floor(j * src_fps / fps). clips_per_video=0 takes as
    many clips as fit. Raises BadInput when the range is empty or too short for every video bucket.
    """
    if info.num_frames < 1 or info.fps <= 0:
        raise BadInput("unreadable", f"no frames or no frame rate (frames={info.num_frames}, fps={info.fps})")
    fps = target_fps or info.fps
    times = _vfr_times(info)
    if times is not None:
        return _plan_clips_by_time(info, times, buckets, fps, clips_per_video, start_s, end_s)
    first = math.ceil(start_s * info.fps - _EPS) if start_s else 0
    stop = min(info.num_frames, math.floor(end_s * info.fps + _EPS)) if end_s is not None else info.num_frames
    if first >= stop:
        raise BadInput("bad_clip_range", f"clip range [{start_s}, {end_s}) s holds no frame of a "
                                         f"{info.num_frames}-frame video at {info.fps:g} fps")
    step = info.fps / fps  # source frames per output frame
    available = math.floor((stop - first - 1) / step + _EPS) + 1
    bucket, starts = _bucket_and_starts(info, buckets, available, clips_per_video,
                                        f"{available} frames at {fps:g} fps ({stop - first} source frames at "
                                        f"{info.fps:g} fps)")
    plans = []
    for s in starts:
        idx = tuple(min(stop - 1, first + math.floor((s + j) * step + _EPS)) for j in range(bucket.frames))
        plans.append(ClipPlan(bucket, idx, fps, idx[0] / info.fps, (idx[-1] + 1) / info.fps))
    return plans


def _bucket_and_starts(info: VideoInfo, buckets: Sequence[Bucket], available: int, clips_per_video: int,
                       what: str) -> tuple[Bucket, list[int]]:
    """The bucket for `available` output frames and the first output frame of each of its evenly spaced,
    non-overlapping clips (clips_per_video=0: as many as fit); BadInput naming `what` when no video bucket fits."""
    bucket = choose_bucket(buckets, info.height, info.width, available, is_image=False)
    if bucket is None:
        need = min((b.frames for b in buckets if b.frames > 1), default=None)
        raise BadInput("too_few_frames", f"{what}; the smallest video bucket needs {need}")
    fit = available // bucket.frames
    count = fit if clips_per_video <= 0 else min(clips_per_video, fit)
    return bucket, [0] if count == 1 else [round(k * (available - bucket.frames) / (count - 1)) for k in range(count)]


def _plan_clips_by_time(info: VideoInfo, t: np.ndarray, buckets: Sequence[Bucket], fps: float, clips_per_video: int,
                        start_s: float | None, end_s: float | None) -> list[ClipPlan]:
    """plan_clips for a variable frame rate: output frame j of the range, at time t0 + j / fps, shows the last
    source frame shown by then (index arithmetic at the average rate would play slow and fast stretches at the
    wrong speed, and map a [start, end) range onto other frames)."""
    n = info.num_frames
    last = float(t[-1] - t[-2])  # the last frame lasts as long as the one before it
    video_end = float(t[-1]) + last
    first = int(np.searchsorted(t, start_s - _EPS, side="left")) if start_s else 0
    t_stop = min(end_s, video_end) if end_s is not None else video_end
    stop = int(np.searchsorted(t, t_stop - _EPS, side="left"))
    if first >= stop:
        raise BadInput("bad_clip_range", f"clip range [{start_s}, {end_s}) s holds no frame of a {n}-frame video "
                                         f"of {video_end:g} s")
    t0 = float(t[first])
    available = max(1, math.ceil((t_stop - t0) * fps - _EPS))
    bucket, starts = _bucket_and_starts(info, buckets, available, clips_per_video,
                                        f"{available} frames at {fps:g} fps ({stop - first} source frames over "
                                        f"{t_stop - t0:g} s, variable frame rate)")
    plans = []
    for s in starts:
        shown = t0 + (s + np.arange(bucket.frames)) / fps
        idx = np.clip(np.searchsorted(t, shown + _EPS, side="right") - 1, first, stop - 1)
        idx = tuple(int(i) for i in idx)
        end = float(t[idx[-1] + 1]) if idx[-1] + 1 < n else video_end
        plans.append(ClipPlan(bucket, idx, fps, float(t[idx[0]]), end))
    return plans


# ------------------------------------------------------------------------------------------------ decoding
def _check_file(path: Path) -> None:
    if not path.is_file():
        raise BadInput("not_found", f"{path} does not exist or is not a file")
    if path.stat().st_size == 0:
        raise BadInput("empty_file", f"{path} is 0 bytes")


Transform = Callable[[np.ndarray, ClipPlan], object]  # uint8 [T, H, W, 3] clip, its plan -> what is kept


class _TransformError(Exception):
    """An error of the caller's transform: not the decoder's, so no fallback to another decoder."""


def _stream_clips(plans: list[ClipPlan], fetch: Callable[[list[int]], dict[int, np.ndarray]],
                  transform: Transform | None) -> list | None:
    """The plans' clips, each made (and transformed) once its frames are in: plans in the order they complete, each
    fetching only the frames not yet held, in ascending order, so a decoder reads forward (a seek back per clip
    made decord 10x slower on overlapping clips, and mis-read some AVIs); frames no later clip needs are dropped,
    so one clip's frames are held at the source resolution at a time. None when `fetch` runs out (truncated)."""
    order = sorted(range(len(plans)), key=lambda k: max(plans[k].indices))
    floors = [math.inf] * (len(order) + 1)  # the lowest frame any plan from the n-th on needs
    for n in range(len(order) - 1, -1, -1):
        floors[n] = min(floors[n + 1], min(plans[order[n]].indices))
    held, clips = {}, [None] * len(plans)
    for n, k in enumerate(order):
        need = sorted(set(plans[k].indices) - held.keys())
        if need:
            held.update(fetch(need))
            if any(i not in held for i in need):
                return None
        clip = np.stack([held[i] for i in plans[k].indices])
        try:
            clips[k] = transform(clip, plans[k]) if transform else clip
        except Exception as e:
            raise _TransformError() from e
        del clip
        for j in [j for j in held if j < floors[n + 1]]:
            del held[j]
    return clips


def _stream_aspect(stream) -> float:
    """A PyAV video stream's pixel aspect ratio from the container header (1 where it says none)."""
    sar = stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio
    return float(sar) if sar and sar > 0 else 1.0


def _sample_aspect(path: Path) -> float:
    """The file's pixel aspect ratio (1 where it says none or cannot be read); decord does not apply it."""
    import av

    try:
        with av.open(str(path)) as container:
            return _stream_aspect(container.streams.video[0])
    except Exception:
        return 1.0


def _displayed(height: int, width: int, sar: float, turns: int) -> tuple[int, int]:
    """(height, width) as shown, from the decoded frames' (already upright) size: the stored x axis, stretched by the
    pixel aspect ratio, is the shown width, or the shown height after a quarter turn."""
    if sar == 1.0:
        return height, width
    if turns % 2:
        return max(1, round(height * sar)), width
    return height, max(1, round(width * sar))


def _stretched(transform: Transform | None, info: VideoInfo) -> Transform | None:
    """`transform` applied to clips stretched to the displayed size (anamorphic video), or `transform` itself."""
    if info.sample_aspect == 1.0:
        return transform

    def stretch(clip, plan):
        x = torch.as_tensor(np.ascontiguousarray(clip)).permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=(info.height, info.width), mode="bilinear", antialias=True, align_corners=False)
        clip = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return transform(clip, plan) if transform else clip

    return stretch


def _decord_read(path: Path, choose: Callable[[VideoInfo], list[ClipPlan]], transform: Transform | None):
    import decord

    reader = decord.VideoReader(str(path), num_threads=1)
    first = reader[0].asnumpy()
    if first.ndim != 3 or first.shape[2] != 3:
        raise RuntimeError(f"decord returned a frame of shape {first.shape}")  # known 0.6.0 mis-read
    try:
        times = _timestamps(reader.get_frame_timestamp(range(len(reader)))[:, 0].tolist(), len(reader))
    except Exception:  # no usable timestamps: index arithmetic at the average rate
        times = None
    stored = first.shape[:2]  # decord turns frames upright; the pixel aspect ratio it leaves to us
    sar = _sample_aspect(path)
    turns = 0
    if sar != 1.0:  # which way the stored x axis is shown
        import av

        with av.open(str(path)) as container:
            turns = _quarter_turns(container)
    info = VideoInfo(len(reader), float(reader.get_avg_fps()), *_displayed(*stored, sar, turns), timestamps=times,
                     sample_aspect=sar)
    del first
    if info.num_frames < 1 or not info.fps > 0:
        raise RuntimeError(f"decord reports {info.num_frames} frames at {info.fps} fps")  # let PyAV try
    plans = choose(info)

    def fetch(indices):
        batch = reader.get_batch(indices).asnumpy()
        if batch.shape != (len(indices), *stored, 3) or batch.dtype != np.uint8:
            raise RuntimeError(f"decord returned a batch of shape {batch.shape}, expected "
                               f"{(len(indices), *stored, 3)}")
        return dict(zip(indices, batch))

    clips = _stream_clips(plans, fetch, _stretched(transform, info))
    if clips is None:
        raise RuntimeError("decord returned fewer frames than asked for")
    return info, plans, clips


def _upright(frame: np.ndarray, turns: int) -> np.ndarray:
    return np.ascontiguousarray(np.rot90(frame, turns)) if turns else frame


def _quarter_turns(container) -> int:
    """The rotation a player applies to this video (a phone's portrait video is stored landscape with a display
    matrix), in counter-clockwise quarter turns, read from the first frame; decord applies it itself."""
    frame = next(container.decode(video=0), None)
    rotation = getattr(frame, "rotation", 0) or 0  # PyAV >= 14
    return round(rotation / 90) % 4


def _pyav_decode(path: Path, plans: list[ClipPlan], transform: Transform | None,
                 turns: int = 0) -> tuple[list | None, int]:
    """The clips from one pass over the file (see _stream_clips), and how many frames were decoded; (None, frames
    decoded) when the file ends before every clip is complete. Frames are turned upright by `turns`."""
    import av

    wanted = {i for p in plans for i in p.indices}
    with av.open(str(path)) as container:
        frames = enumerate(container.decode(video=0))
        decoded = 0

        def fetch(indices):  # decode forward to the last index, keeping every wanted frame passed on the way
            nonlocal decoded
            got = {}
            for i, frame in frames:
                decoded = i + 1
                if i in wanted:
                    got[i] = _upright(frame.to_ndarray(format="rgb24"), turns)
                if i >= indices[-1]:
                    break
            return got

        clips = _stream_clips(plans, fetch, transform)
    return clips, decoded


def _pyav_info(path: Path) -> VideoInfo:
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise RuntimeError("no video stream (truncated, audio-only or not a video)")
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or stream.base_rate or 0)
        sar = _stream_aspect(stream)
        pts = [p.pts * p.time_base for p in container.demux(stream) if p.size and p.pts is not None]
        count = stream.frames or len(pts)  # header, else packets
        height, width = stream.codec_context.height, stream.codec_context.width
    with av.open(str(path)) as container:
        turns = _quarter_turns(container)
    if turns % 2:
        height, width = width, height
    return VideoInfo(count, fps, *_displayed(height, width, sar, turns), turns, timestamps=_timestamps(pts, count),
                     sample_aspect=sar)


def _pyav_read(path: Path, choose: Callable[[VideoInfo], list[ClipPlan]], transform: Transform | None):
    info = _pyav_info(path)
    plans = choose(info)
    clips, decoded = _pyav_decode(path, plans, _stretched(transform, info), info.quarter_turns)
    if clips is None:  # the header promised more frames than the file holds (truncated)
        info = VideoInfo(decoded, info.fps, info.height, info.width, info.quarter_turns,
                         timestamps=info.timestamps[:decoded] if info.timestamps else None,
                         sample_aspect=info.sample_aspect)
        plans = choose(info)
        clips, _ = _pyav_decode(path, plans, _stretched(transform, info), info.quarter_turns)
        if clips is None:
            raise BadInput("decode_error", f"{path}: only {decoded} frames could be decoded")
    return info, plans, clips


def read_clips(path: str | Path, choose: Callable[[VideoInfo], list[ClipPlan]], backend: str = "auto",
               transform: Transform | None = None):
    """Decode the clips `choose(info)` plans: (info, plans, [one per plan], backend used). Each is the uint8
    [T, H, W, 3] clip, or `transform(clip, plan)` of it, applied as each clip is decoded: then only one clip's
    frames are held at the source resolution at a time (all clips of a long 4K video would not fit in memory)."""
    path = Path(path)
    _check_file(path)
    errors = []
    for name, reader in (("decord", _decord_read), ("pyav", _pyav_read)):
        if backend not in ("auto", name):
            continue
        try:
            info, plans, clips = reader(path, choose, transform)
            return info, plans, clips, name
        except BadInput:
            raise
        except _TransformError as e:
            raise e.__cause__ from None
        except Exception as e:  # decoder errors of every kind: fall back, then report
            errors.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    raise BadInput("unreadable", f"{path}: " + "; ".join(errors))


IMAGE_BACKGROUND = (255, 255, 255)  # what transparent pixels are composited onto


def read_image(path: str | Path) -> np.ndarray:
    """An image as uint8 [1, H, W, 3] RGB, as a viewer shows it: turned upright by its EXIF orientation (phone
    photos are stored sideways), transparent parts composited onto white (dropping the alpha would show whatever
    colour the transparent pixels hold), 16/32-bit greyscale scaled to 8 bits (PIL's RGB conversion clips it)."""
    from PIL import Image, ImageOps

    path = Path(path)
    _check_file(path)
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
                wide = np.asarray(img, dtype=np.float64)
                top = 65535.0 if img.mode.startswith("I;16") or wide.max() > 255 else 255.0
                img = Image.fromarray(np.clip(np.rint(wide * (255.0 / top)), 0, 255).astype(np.uint8), "L")
            elif img.mode == "F":
                img = Image.fromarray(np.clip(np.rint(np.asarray(img) * 255.0), 0, 255).astype(np.uint8), "L")
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")
            if img.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
                rgba = img.convert("RGBA")
                flat = Image.new("RGBA", rgba.size, IMAGE_BACKGROUND + (255,))
                img = Image.alpha_composite(flat, rgba)
            return np.asarray(img.convert("RGB"))[None]
    except Exception as e:
        raise BadInput("unreadable", f"{path}: not a readable image: {type(e).__name__}: {e}") from None


# ------------------------------------------------------------------------------------------------ resize
def resize_center_crop(frames: np.ndarray | torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> uint8 [T, 3, height, width]: scale to cover the target (keeping the aspect ratio,
    antialiased bilinear), then cut the centre. Covering, not padding, so no sample holds black borders."""
    if isinstance(frames, np.ndarray) and not frames.flags.writeable:
        frames = frames.copy()  # decoders may hand out read-only buffers; torch wants writable memory
    x = torch.as_tensor(frames).permute(0, 3, 1, 2)
    h, w = x.shape[-2:]
    scale = max(height / h, width / w)
    size = (max(height, round(h * scale)), max(width, round(w * scale)))
    if size != (h, w):
        x = F.interpolate(x.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
        x = x.round().clamp(0, 255).to(torch.uint8)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    return x[:, :, top:top + height, left:left + width].contiguous()
