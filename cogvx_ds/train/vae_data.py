"""Synthetic moving-shapes videos for VAE tests and the CPU demo, generated in-process.

Sample i of a stream is a pure function of (seed, i), so the data position is a single integer and a resumed
run sees exactly the clips it would have seen.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

log = logging.getLogger("cogvx_ds.train_vae")

# Named palettes (RGB in [0, 1]): few, distinct colours, as in captioned demo data ("a red circle moves left").
COLOURS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.3, 0.95), "yellow": (0.95, 0.9, 0.1),
           "magenta": (0.9, 0.2, 0.85), "cyan": (0.1, 0.85, 0.9), "white": (0.95, 0.95, 0.95)}
COLOURS = list(COLOURS.values())
# Dark, mid-gray and white backgrounds: a VAE never shown a background encodes it out of distribution (its
# posterior variance explodes), so the palette covers what data_tools.make_synthetic draws too.
BACKGROUNDS = [(0.0, 0.0, 0.0), (0.05, 0.05, 0.05), (0.25, 0.25, 0.3), (0.1, 0.15, 0.3), (0.3, 0.2, 0.1),
               (0.5, 0.5, 0.5), (1.0, 1.0, 1.0), (0.85, 0.85, 0.8)]


def moving_shapes(num_frames: int, height: int, width: int, seed: int, max_shapes: int = 3) -> torch.Tensor:
    """One clip [3, T, H, W] in [-1, 1]: coloured circles/squares moving linearly over a flat background."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    background = BACKGROUNDS[int(torch.randint(len(BACKGROUNDS), (1,), generator=g))]
    video = torch.tensor(background).view(3, 1, 1, 1).expand(3, num_frames, height, width).clone()
    ys = torch.arange(height, dtype=torch.float32).view(1, height, 1)
    xs = torch.arange(width, dtype=torch.float32).view(1, 1, width)
    t = torch.arange(num_frames, dtype=torch.float32).view(num_frames, 1, 1)
    n = int(torch.randint(1, max_shapes + 1, (1,), generator=g))
    for _ in range(n):
        size = (0.12 + 0.15 * rand(1).item()) * min(height, width)
        cy, cx = rand(1).item() * height, rand(1).item() * width
        vy, vx = (rand(2) * 2 - 1).tolist()
        speed = 0.04 * min(height, width)
        py, px = cy + vy * speed * t, cx + vx * speed * t  # [T, 1, 1]
        if rand(1).item() < 0.5:  # circle
            mask = (ys - py) ** 2 + (xs - px) ** 2 <= size**2
        else:  # square
            mask = ((ys - py).abs() <= size) & ((xs - px).abs() <= size)
        colour = torch.tensor(COLOURS[int(torch.randint(len(COLOURS), (1,), generator=g))])
        video = torch.where(mask.unsqueeze(0), colour.view(3, 1, 1, 1), video)
    return video * 2 - 1


class MovingShapesStream:
    """Deterministic batches; `position` (next global sample index) is the whole resumable state.

    With several data-parallel ranks, rank r takes samples [position + r*B, position + (r+1)*B) of each step.
    """

    def __init__(self, batch_size: int, num_frames: int, height: int, width: int, seed: int = 0, position: int = 0,
                 rank: int = 0, world: int = 1):
        self.batch_size, self.num_frames, self.height, self.width = batch_size, num_frames, height, width
        self.seed, self.position, self.rank, self.world = seed, position, rank, world

    def next_batch(self) -> torch.Tensor:
        first = self.position + self.rank * self.batch_size
        clips = [
            moving_shapes(self.num_frames, self.height, self.width, seed=self.seed * 1_000_003 + i)
            for i in range(first, first + self.batch_size)
        ]
        self.position += self.batch_size * self.world
        return torch.stack(clips)


class VideoFileStream:
    """Clips from real video files (a folder, a .jsonl/.csv manifest or a videos.txt list, as data_tools reads
    them): `frames` consecutive frames at a random start, scaled to cover height x width and centre-cropped.

    Sample i is a pure function of (seed, i), like MovingShapesStream, so `position` is the whole resumable
    state. Unreadable or too-short files are skipped, counted in `skipped` (path -> reason) and logged once;
    images are left out (the VAE trains on clips).

    `cache_mb` > 0 keeps whole decoded videos (already scaled and cropped, uint8) in memory, least recently used
    first out, up to that many MiB: a small dataset (the demo's 500 clips are 14 MiB at 32x32) is decoded once
    instead of at every draw. Samples are the same with and without the cache: decoding is deterministic and the
    window start is drawn from the frame count either way. 0 decodes only the drawn window every time.
    """

    def __init__(self, source: str, batch_size: int, num_frames: int, height: int, width: int, seed: int = 0,
                 position: int = 0, rank: int = 0, world: int = 1, cache_mb: float = 0.0):
        from data_tools.encode_latents import load_inputs

        path = Path(source)
        # Captions are not used: a videos.txt needs no prompts.txt (the list stands in for its own), and a
        # missing caption is no reason to leave a video out.
        items = load_inputs(path, prompts=path if path.suffix == ".txt" else None)
        usable = [it for it in items if it.error is None or it.error[0] == "missing_caption"]
        self.files = [it.path for it in usable if it.path is not None and not it.is_image]
        if not self.files:
            raise ValueError(f"data: {source} lists no video files (images are not used for VAE training)")
        self.batch_size, self.num_frames, self.height, self.width = batch_size, num_frames, height, width
        self.seed, self.position, self.rank, self.world = seed, position, rank, world
        self.skipped: dict[str, str] = {}
        self.cache_bytes = int(cache_mb * 2**20)
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()  # path -> uint8 [T, 3, H, W], whole video
        self._cached_bytes = 0

    def _fit(self, clip, _plan) -> torch.Tensor:
        from data_tools.video_decode import resize_center_crop

        return resize_center_crop(clip, self.height, self.width)

    def _whole_video(self, path) -> torch.Tensor:
        """The whole decoded video, scaled and cropped (uint8 [T, 3, H, W]), from the cache or the file."""
        from data_tools.video_decode import Bucket, ClipPlan, read_clips

        key = str(path)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        bucket = Bucket(self.height, self.width, self.num_frames)
        _, _, clips, _ = read_clips(path, lambda info: [ClipPlan(bucket, tuple(range(info.num_frames)), info.fps,
                                                                 0.0, info.num_frames / info.fps)],
                                    transform=self._fit)
        video = clips[0]
        if video.numel() <= self.cache_bytes:
            self._cache[key] = video
            self._cached_bytes += video.numel()
            while self._cached_bytes > self.cache_bytes:
                self._cached_bytes -= self._cache.popitem(last=False)[1].numel()
        return video

    def clip(self, index: int) -> torch.Tensor:
        """Sample `index`: [3, T, H, W] in [-1, 1]. Draws again (same generator) past unusable files."""
        from data_tools.video_decode import BadInput, Bucket, ClipPlan, read_clips

        rng = np.random.default_rng([self.seed, index])
        bucket, n = Bucket(self.height, self.width, self.num_frames), self.num_frames

        for _ in range(100):
            # Two draws per attempt, whatever happens next: the window start is a fraction of the room the file
            # has, so a decoder that asks for the window again (a fallback reader, a truncated file's retry), a file
            # skipped earlier in this process, or the cache, never shifts the draws of later attempts (resumed runs
            # know nothing of this process's skips and must draw the same).
            path, u = self.files[int(rng.integers(len(self.files)))], rng.random()
            if str(path) in self.skipped:
                continue

            def window(info, u=u):  # n consecutive frames at a random start
                if info.num_frames < n:
                    raise BadInput("too_few_frames", f"{info.num_frames} frames, need {n}")
                start = min(int(u * (info.num_frames - n + 1)), info.num_frames - n)
                return [ClipPlan(bucket, tuple(range(start, start + n)), info.fps, start / info.fps,
                                 (start + n) / info.fps)]

            try:
                if self.cache_bytes > 0:
                    video = self._whole_video(path)
                    plan = window(SimpleNamespace(num_frames=video.shape[0], fps=1.0))[0]
                    frames = video[plan.indices[0]:plan.indices[-1] + 1]
                else:
                    frames = read_clips(path, window, transform=self._fit)[2][0]  # uint8 [T, 3, H, W]
            except BadInput as e:
                self.skipped[str(path)] = str(e)
                log.warning("VAE data: skipping %s (%s)", path, e)
                continue
            return frames.permute(1, 0, 2, 3).float() / 127.5 - 1.0
        raise ValueError(f"data: 100 draws in a row found no readable video of >= {self.num_frames} frames "
                         f"({len(self.skipped)} of {len(self.files)} files skipped so far)")

    def next_batch(self) -> torch.Tensor:
        first = self.position + self.rank * self.batch_size
        batch = torch.stack([self.clip(i) for i in range(first, first + self.batch_size)])
        self.position += self.batch_size * self.world
        return batch
