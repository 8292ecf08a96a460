"""Training timestep sampling, with CogVideoX's "explicit uniform sampling".

With explicit uniform sampling, data-parallel rank i of N draws t only from its own interval
[floor(i*T/N), floor((i+1)*T/N)), so the N ranks of one optimizer step together always span the whole range of
noise levels instead of N independent uniform draws that may cluster. Integer boundaries make this exact for
every N >= 1: the intervals are disjoint, their union is [0, T), and their lengths differ by at most one.

N > T (more data-parallel ranks than timesteps): some intervals would be empty. Each such rank shares the
one-timestep interval {floor(i*T/N)} with a neighbour instead of failing, so every timestep is still covered by
floor(N/T) or ceil(N/T) ranks per step: as even as integers allow. (The original switches the feature off for
N <= 8 and asserts on sizes that do not divide T; here nothing is switched off silently.)

How the trainer uses it (cogvx_ds/train/trainer.py, `Trainer._draws`): the interval is stratified per sample of
the global batch (``explicit_uniform_interval(j, global_batch, T)`` for global sample index j), so DP rank i,
which holds a contiguous block of the global batch, draws from its own part of [0, T) and the global batch covers
it evenly, for any number of DP ranks and any micro-batch or accumulation. Each sample's t, noise, posterior eps
and caption-dropout draw come from ``sampling_generator(train.seed, step, j)``: keyed by the global sample index,
never by a rank, so the tensor- and sequence-parallel peers that hold the same sample draw the same values, and
keyed by the step, so a resumed run draws exactly what the uninterrupted run drew, with no generator state to
checkpoint. Under sequence parallelism every SP rank draws the noise for the full sample and keeps its own slice,
so the shards fit together into one consistent noise tensor.
"""

from __future__ import annotations

import hashlib

import torch


def explicit_uniform_interval(dp_rank: int, dp_world_size: int, num_train_timesteps: int) -> tuple[int, int]:
    """The half-open interval [lo, hi) of timesteps that data-parallel rank ``dp_rank`` of ``dp_world_size`` draws.

    hi > lo always; see the module docstring for N > T, where ranks share one-timestep intervals.
    """
    if dp_world_size < 1:
        raise ValueError(f"dp_world_size must be >= 1, got {dp_world_size}")
    if not 0 <= dp_rank < dp_world_size:
        raise ValueError(f"dp_rank must be in [0, {dp_world_size}), got {dp_rank}")
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    lo = dp_rank * num_train_timesteps // dp_world_size
    hi = (dp_rank + 1) * num_train_timesteps // dp_world_size
    return lo, max(hi, lo + 1)


def sampling_seed(seed: int, step: int, stream: int, micro_step: int = 0) -> int:
    """A well-mixed 63-bit seed from (seed, step, stream, micro_step); a hash, so nearby inputs give unrelated
    streams. The trainer's stream is the global sample index (micro_step 0); a per-rank scheme would pass the DP
    rank and the gradient-accumulation index."""
    key = f"cogvx_ds-timesteps:{int(seed)}:{int(step)}:{int(stream)}:{int(micro_step)}"
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sampling_generator(seed: int, step: int, stream: int, micro_step: int = 0) -> torch.Generator:
    """The CPU generator of one draw stream (the trainer: one per global sample; see the module docstring)."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(sampling_seed(seed, step, stream, micro_step))
    return generator
