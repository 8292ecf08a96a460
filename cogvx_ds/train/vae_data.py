"""Synthetic moving-shapes videos for VAE tests and the CPU demo, generated in-process.

Sample i of a stream is a pure function of (seed, i), so the data position is a single integer and a resumed
run sees exactly the clips it would have seen.
"""

from __future__ import annotations

import torch

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
