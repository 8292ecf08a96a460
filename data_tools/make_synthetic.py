"""Captioned moving-shapes videos and still images, deterministic from a seed, with held-out attribute combinations.

Every sample shows one shape (circle, square, triangle) of one colour on a plain background; videos move it left,
right, up or down, or keep it still. Captions say exactly that: "a red circle moving left on a black background",
"a blue square staying still on a white background", and for images "a green triangle on a gray background".

Held-out split: a seeded fraction of the attribute combinations over ``--heldout-keys`` (default shape, color,
motion) is kept out of training entirely, while every single attribute value still occurs in training. Sampling
prompts from the held-out split then tests composition ("a yellow triangle moving up" when training saw yellow
things, triangles and upward motion, but never together). Images have no motion, so with motion among the keys
no image can show a held-out combination and all images are training data.

Everything is importable: ``render_clip`` and ``render_image`` draw a sample to a uint8 array without writing
files, ``render_split`` draws many (the same ones ``generate`` writes), and ``classify_clip`` reads colour,
shape, motion and background back from frames (for tests and for scoring generated videos).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cogvx_ds.utils import out_dir_problem

SHAPES = ("circle", "square", "triangle")
# Colours whose luma differs from every background by at least ~25 levels: yuv420p keeps chroma at half
# resolution, so a shape that differs from the background in chroma only blurs away in small mp4s.
COLORS = {
    "red": (220, 30, 30),
    "green": (20, 150, 40),
    "blue": (40, 70, 230),
    "yellow": (235, 215, 30),
    "magenta": (190, 30, 190),
    "cyan": (30, 205, 215),
}
MOTIONS = ("left", "right", "up", "down", "still")
BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128)}
ATTRIBUTE_VALUES = {"shape": SHAPES, "color": tuple(COLORS), "motion": MOTIONS, "background": tuple(BACKGROUNDS)}
DEFAULT_HELDOUT_KEYS = ("shape", "color", "motion")

# Geometry, as fractions of the shorter frame side: radius range, distance travelled over a clip, and the
# scale of each shape relative to the radius (chosen so the three look about equally big).
RADIUS_RANGE = (0.15, 0.2)
TRAVEL = 0.3
SQUARE_HALF_SIDE = 0.85
TRIANGLE_CIRCUMRADIUS = 1.4
MIN_SIDE = 16
_DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}


def caption(shape: str, color: str, motion: str | None, background: str) -> str:
    """The caption of a sample; ``motion=None`` is a still image."""
    if motion is None:
        return f"a {color} {shape} on a {background} background"
    if motion == "still":
        return f"a {color} {shape} staying still on a {background} background"
    return f"a {color} {shape} moving {motion} on a {background} background"


@dataclass(frozen=True)
class ClipSpec:
    """What one sample shows, independent of its pixel size.

    ``radius`` is a fraction of the shorter side; ``start_u``/``start_v`` in [0, 1] place the start inside the
    region where the whole path stays in the frame (0 = leftmost/topmost possible start).
    """

    shape: str
    color: str
    motion: str | None
    background: str
    radius: float = 0.15
    start_u: float = 0.5
    start_v: float = 0.5
    travel: float = TRAVEL  # distance moved over the clip, as a fraction of the shorter side

    def __post_init__(self):
        for key in ("shape", "color", "background"):
            if getattr(self, key) not in ATTRIBUTE_VALUES[key]:
                raise ValueError(f"{key} must be one of {ATTRIBUTE_VALUES[key]}, got {getattr(self, key)!r}")
        if self.motion is not None and self.motion not in MOTIONS:
            raise ValueError(f"motion must be one of {MOTIONS} or None (image), got {self.motion!r}")

    @property
    def caption(self) -> str:
        return caption(self.shape, self.color, self.motion, self.background)

    def attributes(self) -> dict:
        return {"shape": self.shape, "color": self.color, "motion": self.motion, "background": self.background}


def random_spec(rng: np.random.Generator, shape: str, color: str, motion: str | None, background: str,
                radius_range: tuple[float, float] = RADIUS_RANGE, travel: float = TRAVEL) -> ClipSpec:
    """A spec with the given attributes and random size and start position."""
    return ClipSpec(
        shape, color, motion, background, float(rng.uniform(*radius_range)), float(rng.random()), float(rng.random()),
        travel,
    )


def check_geometry(radius_range: tuple[float, float], travel: float) -> None:
    """Radii and travel (fractions of the shorter side) for which every shape's whole path stays in the frame."""
    lo, hi = radius_range
    if not 0 < lo <= hi:
        raise ValueError(f"radius range must satisfy 0 < min <= max, got {lo},{hi}")
    if travel < 0:
        raise ValueError(f"travel must be >= 0, got {travel}")
    if 2 * TRIANGLE_CIRCUMRADIUS * hi + travel > 1:
        raise ValueError(f"radius max {hi} and travel {travel} do not fit in the frame: need "
                         f"2 * {TRIANGLE_CIRCUMRADIUS} * radius + travel <= 1 (the triangle's extent plus its path)")


def _centres(spec: ClipSpec, num_frames: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-frame shape centres (x [T], y [T]) in pixels and the radius in pixels."""
    side = min(height, width)
    radius = spec.radius * side
    margin = TRIANGLE_CIRCUMRADIUS * radius + 1.0  # the largest extent of any shape, plus one pixel of blur
    dx, dy = _DIRECTIONS[spec.motion or "still"]
    travel = spec.travel * side if num_frames > 1 else 0.0
    # Start anywhere the whole path stays inside the frame.
    x_lo, x_hi = margin + travel * max(-dx, 0), width - margin - travel * max(dx, 0)
    y_lo, y_hi = margin + travel * max(-dy, 0), height - margin - travel * max(dy, 0)
    x0 = x_lo + spec.start_u * max(x_hi - x_lo, 0.0)
    y0 = y_lo + spec.start_v * max(y_hi - y_lo, 0.0)
    progress = np.linspace(0.0, 1.0, num_frames) if num_frames > 1 else np.zeros(1)
    return x0 + dx * travel * progress, y0 + dy * travel * progress, radius


def _signed_distance(shape: str, px: np.ndarray, py: np.ndarray, radius: float) -> np.ndarray:
    """Signed distance in pixels (negative inside) from pixel centres relative to the shape's centre."""
    if shape == "circle":
        return np.hypot(px, py) - radius
    if shape == "square":
        return np.maximum(np.abs(px), np.abs(py)) - SQUARE_HALF_SIDE * radius
    # Equilateral triangle pointing up (image y grows downwards), centred on its centroid: inside all three
    # edge half-planes, each at the inradius (half the circumradius) from the centre.
    circumradius = TRIANGLE_CIRCUMRADIUS * radius
    sin30, cos30 = 0.5, math.sqrt(3.0) / 2.0
    edges = np.stack([py, cos30 * px - sin30 * py, -cos30 * px - sin30 * py])
    return edges.max(axis=0) - circumradius / 2.0


def render_clip(spec: ClipSpec, num_frames: int = 9, height: int = 32, width: int = 32) -> np.ndarray:
    """Draw a sample as uint8 RGB frames [num_frames, height, width, 3] (edges anti-aliased over one pixel)."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if min(height, width) < MIN_SIDE:
        raise ValueError(f"height and width must be >= {MIN_SIDE} for the shapes to fit, got {height}x{width}")
    xs, ys, radius = _centres(spec, num_frames, height, width)
    colour = np.array(COLORS[spec.color], dtype=np.float32)
    background = np.array(BACKGROUNDS[spec.background], dtype=np.float32)
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    frames[:] = background.astype(np.uint8)
    reach = TRIANGLE_CIRCUMRADIUS * radius + 2.0  # every shape, with its one-pixel edge ramp, fits in this box
    for k in range(num_frames):
        # Only the box around the shape needs drawing: large frames render much faster.
        x0, x1 = max(int(xs[k] - reach), 0), min(int(xs[k] + reach) + 1, width)
        y0, y1 = max(int(ys[k] - reach), 0), min(int(ys[k] + reach) + 1, height)
        grid_y, grid_x = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5  # pixel centres
        distance = _signed_distance(spec.shape, grid_x - xs[k], grid_y - ys[k], radius)
        coverage = np.clip(0.5 - distance, 0.0, 1.0)[..., None]
        frames[k, y0:y1, x0:x1] = np.rint(background + coverage * (colour - background)).astype(np.uint8)
    return frames


def render_image(spec: ClipSpec, height: int = 32, width: int = 32) -> np.ndarray:
    """Draw a still image as uint8 RGB [height, width, 3]."""
    return render_clip(spec, 1, height, width)[0]


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    distances = [np.abs(rgb - np.array(palette[n], dtype=np.float32)).sum() for n in names]
    return names[int(np.argmin(distances))]


def _shape_of(coverage: np.ndarray) -> str | None:
    """Shape from one frame's soft coverage [H, W] (0 = background, 1 = shape colour), by template matching.

    Each candidate is drawn with the same area and centroid as the coverage; the closest one wins. Comparing
    whole soft masks is robust to the blur of small frames and of yuv420p chroma, unlike corner or edge tests.
    """
    area = float(coverage.sum())
    if area < 1.0:
        return None
    grid_y, grid_x = np.mgrid[0 : coverage.shape[0], 0 : coverage.shape[1]].astype(np.float32) + 0.5
    px = grid_x - (coverage * grid_x).sum() / area
    py = grid_y - (coverage * grid_y).sum() / area
    # Radius (in _signed_distance's units) that gives each shape this area.
    radius = {
        "circle": math.sqrt(area / math.pi),
        "square": math.sqrt(area) / (2 * SQUARE_HALF_SIDE),
        "triangle": math.sqrt(area / (3 * math.sqrt(3) / 4)) / TRIANGLE_CIRCUMRADIUS,
    }
    errors = {
        shape: float(np.square(np.clip(0.5 - _signed_distance(shape, px, py, r), 0, 1) - coverage).sum())
        for shape, r in radius.items()
    }
    return min(errors, key=errors.get)


def classify_clip(frames: np.ndarray) -> dict:
    """Read background, colour, shape and motion back from uint8 frames [T, H, W, 3] (or one image [H, W, 3]).

    Simple on purpose (used to score generated samples): the background is the median border colour, the shape
    is every pixel far from it, its colour the median of those pixels, its kind read from its coverage (see
    _shape_of; majority over frames), and the motion the coverage centroid's displacement from the first to the
    last frame (less than a tenth of the shorter side: still). Returns None for what cannot be read.
    """
    frames = np.asarray(frames, dtype=np.float32)
    if frames.ndim == 3:
        frames = frames[None]
    border = np.concatenate([frames[:, 0], frames[:, -1], frames[:, :, 0], frames[:, :, -1]], axis=1).reshape(-1, 3)
    bg_rgb = np.median(border, axis=0)
    result = {"background": _nearest(bg_rgb, BACKGROUNDS), "color": None, "shape": None, "motion": None}
    solid = np.abs(frames - bg_rgb).sum(-1) > 120  # a clear difference in colour, not edge blur or codec noise
    if solid.sum() == 0:
        return result
    fg_rgb = np.median(frames[solid], axis=0)
    result["color"] = _nearest(fg_rgb, COLORS)
    # Soft coverage: each pixel's position between the background and the shape colour.
    direction = fg_rgb - bg_rgb
    coverage = np.clip(((frames - bg_rgb) @ direction) / float(direction @ direction), 0.0, 1.0)
    shapes = [s for s in (_shape_of(c) for c in coverage) if s is not None]
    result["shape"] = max(set(shapes), key=shapes.count) if shapes else None  # majority over frames
    mass = coverage.sum(axis=(1, 2))
    if frames.shape[0] > 1 and mass[0] > 0 and mass[-1] > 0:
        grid_y, grid_x = np.mgrid[0 : frames.shape[1], 0 : frames.shape[2]]
        dx = (coverage[-1] * grid_x).sum() / mass[-1] - (coverage[0] * grid_x).sum() / mass[0]
        dy = (coverage[-1] * grid_y).sum() / mass[-1] - (coverage[0] * grid_y).sum() / mass[0]
        if math.hypot(dx, dy) < 0.1 * min(frames.shape[1:3]):
            result["motion"] = "still"
        elif abs(dx) >= abs(dy):
            result["motion"] = "right" if dx > 0 else "left"
        else:
            result["motion"] = "down" if dy > 0 else "up"
    return result


def split_combinations(
    seed: int = 0, heldout_fraction: float = 0.2, keys: Sequence[str] = DEFAULT_HELDOUT_KEYS
) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    """(train, held-out) combinations of the attributes ``keys``, disjoint, with every single value in train."""
    unknown = [k for k in keys if k not in ATTRIBUTE_VALUES]
    if unknown or not keys or len(set(keys)) != len(keys):
        raise ValueError(f"heldout keys must be distinct names from {list(ATTRIBUTE_VALUES)}, got {list(keys)}")
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    combos = list(itertools.product(*(ATTRIBUTE_VALUES[k] for k in keys)))
    count = max(1, round(heldout_fraction * len(combos))) if heldout_fraction > 0 else 0
    rng = np.random.default_rng([seed, 7])
    for _ in range(1000):  # redraw until no attribute value is held out completely
        chosen = set(rng.choice(len(combos), size=count, replace=False).tolist())
        train = [c for i, c in enumerate(combos) if i not in chosen]
        if all({c[j] for c in train} == set(ATTRIBUTE_VALUES[k]) for j, k in enumerate(keys)):
            return train, [c for i, c in enumerate(combos) if i in chosen]
    raise ValueError(
        f"cannot hold out {count} of {len(combos)} combinations of {list(keys)} and keep every value in train"
    )


def _pick(rng: np.random.Generator, key: str) -> str:
    values = ATTRIBUTE_VALUES[key]
    return values[int(rng.integers(len(values)))]


def plan_samples(
    num_videos: int,
    num_images: int,
    num_heldout: int,
    num_heldout_images: int = 0,
    seed: int = 0,
    heldout_fraction: float = 0.2,
    heldout_keys: Sequence[str] = DEFAULT_HELDOUT_KEYS,
    radius_range: tuple[float, float] = RADIUS_RANGE,
    travel: float = TRAVEL,
) -> list[tuple[str, str, ClipSpec]]:
    """(split, kind, spec) for every sample, in output order. Sample i of a (split, kind) depends only on the seed
    and i, so asking for more samples keeps the first ones unchanged; combinations are cycled for balance."""
    keys = tuple(heldout_keys)
    train_combos, heldout_combos = split_combinations(seed, heldout_fraction, keys)
    images_can_be_heldout = "motion" not in keys
    if num_heldout_images and not images_can_be_heldout:
        raise ValueError("--num-heldout-images needs --heldout-keys without 'motion' (images have no motion)")
    if (num_heldout or num_heldout_images) and not heldout_combos:
        raise ValueError("held-out samples requested but --heldout-fraction is 0")
    heldout_set = set(heldout_combos)
    plan = []
    for stream, (split, kind, count, combos) in enumerate(
        (
            ("train", "video", num_videos, train_combos),
            ("train", "image", num_images, train_combos),
            ("heldout", "video", num_heldout, heldout_combos),
            ("heldout", "image", num_heldout_images, heldout_combos),
        )
    ):
        # One random stream per (split, kind) and one per sample: independent of how many samples are asked for.
        order = np.random.default_rng([seed, stream]).permutation(len(combos))
        for i in range(count):
            rng = np.random.default_rng([seed, stream, i])
            attrs = {k: _pick(rng, k) for k in ATTRIBUTE_VALUES}
            if kind == "video" or images_can_be_heldout:
                attrs.update(zip(keys, combos[order[i % len(combos)]]))
            if kind == "image":
                attrs["motion"] = None
            in_heldout = all(attrs[k] is not None for k in keys) and tuple(attrs[k] for k in keys) in heldout_set
            if in_heldout != (split == "heldout"):  # cannot happen by construction; never write a leaking split
                raise RuntimeError(f"{split} sample {i} has attributes {attrs} of the other split")
            plan.append(
                (split, kind, random_spec(rng, attrs["shape"], attrs["color"], attrs["motion"], attrs["background"],
                                          radius_range, travel))
            )
    return plan


def render_split(
    count: int,
    split: str = "train",
    kind: str = "video",
    frames: int = 9,
    height: int = 32,
    width: int = 32,
    seed: int = 0,
    heldout_fraction: float = 0.2,
    heldout_keys: Sequence[str] = DEFAULT_HELDOUT_KEYS,
) -> tuple[np.ndarray, list[str], list[dict]]:
    """In memory, no files: (clips uint8 [count, T, H, W, 3], captions, attributes) of one split and kind.

    The same samples ``generate`` writes with these arguments (images come back with T = 1).
    """
    if split not in ("train", "heldout") or kind not in ("video", "image"):
        raise ValueError(f"split must be 'train' or 'heldout' and kind 'video' or 'image', got {split!r}, {kind!r}")
    counts = {("train", "video"): 0, ("train", "image"): 0, ("heldout", "video"): 0, ("heldout", "image"): 0}
    counts[(split, kind)] = count
    plan = plan_samples(*counts.values(), seed=seed, heldout_fraction=heldout_fraction, heldout_keys=heldout_keys)
    num_frames = frames if kind == "video" else 1
    clips = (
        np.stack([render_clip(spec, num_frames, height, width) for _, _, spec in plan])
        if plan
        else (np.zeros((0, num_frames, height, width, 3), np.uint8))
    )
    return clips, [spec.caption for _, _, spec in plan], [spec.attributes() for _, _, spec in plan]


def _write_image(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    options = {"quality": 95} if path.suffix == ".jpg" else {}
    Image.fromarray(image).save(path, **options)


def generate(
    out_dir: str | Path,
    num_videos: int = 200,
    num_images: int = 100,
    num_heldout: int = 20,
    num_heldout_images: int = 0,
    frames: int = 9,
    height: int = 32,
    width: int = 32,
    fps: float = 8.0,
    seed: int = 0,
    heldout_fraction: float = 0.2,
    heldout_keys: Sequence[str] = DEFAULT_HELDOUT_KEYS,
    image_format: str = "png",
    progress: bool = True,
    radius_range: tuple[float, float] = RADIUS_RANGE,
    travel: float = TRAVEL,
) -> list[dict]:
    """Render and write the dataset; returns the manifest records (also written to <out_dir>/manifest.jsonl)."""
    from tqdm import tqdm

    from data_tools._video_io import write_mp4

    if frames < 1 or (frames - 1) % 4:
        raise ValueError(f"frames must be 4k+1 (1, 5, 9, ..., 49) for the causal VAE, got {frames}")
    if height % 2 or width % 2 or min(height, width) < MIN_SIDE:
        raise ValueError(f"height and width must be even and >= {MIN_SIDE} (mp4 is yuv420p), got {height}x{width}")
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    check_geometry(radius_range, travel)
    plan = plan_samples(num_videos, num_images, num_heldout, num_heldout_images, seed, heldout_fraction, heldout_keys,
                        radius_range, travel)
    out = Path(out_dir)
    records, counters = [], {}
    for split, kind, spec in tqdm(plan, desc="make_synthetic", unit="sample", disable=not progress):
        index = counters[(split, kind)] = counters.get((split, kind), -1) + 1
        folder = out / f"{kind}s" / split
        folder.mkdir(parents=True, exist_ok=True)
        if kind == "video":
            path = folder / f"{index:06d}.mp4"
            write_mp4(path, render_clip(spec, frames, height, width), fps)
        else:
            path = folder / f"{index:06d}.{image_format}"
            _write_image(path, render_image(spec, height, width))
        records.append(
            {
                "path": path.relative_to(out).as_posix(),
                "caption": spec.caption,
                "split": split,
                "kind": kind,
                "attributes": spec.attributes(),
                "frames": frames if kind == "video" else 1,
                "height": height,
                "width": width,
                "fps": fps if kind == "video" else None,
                "render": {k: v for k, v in asdict(spec).items() if k in ("radius", "start_u", "start_v", "travel")},
            }
        )
    _write_lists(out, records, seed, heldout_fraction, heldout_keys)
    return records


def _write_lists(
    out: Path, records: list[dict], seed: int, heldout_fraction: float, heldout_keys: Sequence[str]
) -> None:
    """manifest.jsonl (all), videos.txt + prompts.txt (train), heldout_*.txt, and info.json."""
    with open(out / "manifest.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    for prefix, split in (("", "train"), ("heldout_", "heldout")):
        chosen = [r for r in records if r["split"] == split]
        (out / f"{prefix}videos.txt").write_text("".join(r["path"] + "\n" for r in chosen))
        (out / f"{prefix}prompts.txt").write_text("".join(r["caption"] + "\n" for r in chosen))
    train, heldout = split_combinations(seed, heldout_fraction, tuple(heldout_keys))
    info = {
        "seed": seed,
        "heldout_keys": list(heldout_keys),
        "heldout_combinations": [list(c) for c in heldout],
        "num_train_combinations": len(train),
        "counts": {s: sum(r["split"] == s for r in records) for s in ("train", "heldout")},
    }
    (out / "info.json").write_text(json.dumps(info, indent=2) + "\n")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.make_synthetic",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\nEverything is importable")[0],
        epilog="""output (all paths relative to the --out folder):
  videos/train/NNNNNN.mp4, images/train/NNNNNN.png   training samples
  videos/heldout/NNNNNN.mp4                          samples of held-out combinations (evaluation only)
  manifest.jsonl   one JSON object per sample: path, caption, split (train|heldout), kind (video|image),
                   attributes {shape, color, motion (null for images), background}, frames, height, width,
                   fps, render {radius, start_u, start_v, travel}
  videos.txt + prompts.txt                 the training split (videos and images), one path / caption per
                                           line, aligned
  heldout_videos.txt + heldout_prompts.txt the held-out split (prompts for sampling and scoring)
  info.json        seed, held-out keys and combinations, counts

attribute values:
  shape:      """
        + ", ".join(SHAPES)
        + """
  color:      """
        + ", ".join(COLORS)
        + """
  motion:     """
        + ", ".join(MOTIONS)
        + """
  background: """
        + ", ".join(BACKGROUNDS)
        + """

The same arguments always produce the same files on a given machine (videos are H.264 yuv420p, encoded
single-threaded with x264's macroblock tree off, which otherwise made about 1 file in 200 differ).

example:
  python -m data_tools.make_synthetic --out runs/synthetic --num-videos 400 --num-images 200 \\
      --num-heldout 32 --frames 9 --height 32 --width 32 --fps 8 --seed 0
""",
    )
    parser.add_argument("--out", required=True, help="output folder (created; existing files are overwritten)")
    parser.add_argument("--num-videos", type=int, default=200, help="training videos (default 200)")
    parser.add_argument(
        "--num-images", type=int, default=100, help="training still images, 1-frame samples (default 100)"
    )
    parser.add_argument("--num-heldout", type=int, default=20, help="videos of held-out combinations (default 20)")
    parser.add_argument(
        "--num-heldout-images",
        type=int,
        default=0,
        help="images of held-out combinations; only when --heldout-keys has no 'motion' (default 0)",
    )
    parser.add_argument("--frames", type=int, default=9, help="frames per video, must be 4k+1 (default 9)")
    parser.add_argument(
        "--height", type=int, default=32, help=f"frame height in pixels, even and >= {MIN_SIDE} (default 32)"
    )
    parser.add_argument(
        "--width", type=int, default=32, help=f"frame width in pixels, even and >= {MIN_SIDE} (default 32)"
    )
    parser.add_argument("--fps", type=float, default=8.0, help="video frame rate (default 8)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for the held-out split, attributes, sizes and positions (default 0)"
    )
    parser.add_argument(
        "--heldout-fraction",
        type=float,
        default=0.2,
        help="fraction of attribute combinations held out of training (default 0.2)",
    )
    parser.add_argument(
        "--heldout-keys",
        default=",".join(DEFAULT_HELDOUT_KEYS),
        help="comma-separated attributes whose combinations are held out (default shape,color,motion)",
    )
    parser.add_argument(
        "--image-format", choices=("png", "jpg"), default="png", help="still image format (default png)"
    )
    parser.add_argument(
        "--radius",
        default=f"{RADIUS_RANGE[0]},{RADIUS_RANGE[1]}",
        help="shape radius range MIN,MAX as fractions of the shorter side (default %(default)s); a tiny model "
        "learns larger shapes faster",
    )
    parser.add_argument(
        "--travel", type=float, default=TRAVEL,
        help="distance a moving shape covers over the clip, fraction of the shorter side (default %(default)s)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def _radius_range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise SystemExit(f"make_synthetic: --radius must be MIN,MAX (two numbers), got {text!r}") from None
    return lo, hi


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for name in ("num_videos", "num_images", "num_heldout", "num_heldout_images"):
        if getattr(args, name) < 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    problem = out_dir_problem(args.out, "--out")
    if problem:
        raise SystemExit(f"make_synthetic: {problem}")
    try:
        records = generate(
            args.out,
            args.num_videos,
            args.num_images,
            args.num_heldout,
            args.num_heldout_images,
            args.frames,
            args.height,
            args.width,
            args.fps,
            args.seed,
            args.heldout_fraction,
            [k.strip() for k in args.heldout_keys.split(",") if k.strip()],
            args.image_format,
            not args.no_progress,
            _radius_range(args.radius),
            args.travel,
        )
    except ValueError as err:
        raise SystemExit(f"make_synthetic: {err}") from None
    counts = {s: sum(r["split"] == s for r in records) for s in ("train", "heldout")}
    print(
        f"wrote {len(records)} samples ({counts['train']} train, {counts['heldout']} held-out) to {args.out}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
