"""Explicit uniform timestep sampling: intervals, coverage for any N, and the trainer's draws (Trainer._draws):
stratified over the global batch, keyed by (seed, step, global sample index) so that any rank layout draws the
same values, and the caption-dropout rate."""

import bisect
import math
from types import SimpleNamespace

import pytest
import torch

from cogvx_ds.diffusion import explicit_uniform_interval, sampling_seed
from cogvx_ds.train.trainer import Trainer

T = 1000
WORLD_SIZES = [1, 2, 3, 7, 8, 64, 999, 1000, 1001, 3000]


@pytest.mark.parametrize("n", WORLD_SIZES)
def test_intervals_in_range_and_cover_evenly(n):
    intervals = [explicit_uniform_interval(i, n, T) for i in range(n)]
    assert all(0 <= lo < hi <= T for lo, hi in intervals)
    coverage = torch.zeros(T, dtype=torch.int64)
    for lo, hi in intervals:
        coverage[lo:hi] += 1
    if n <= T:
        # Disjoint, adjacent, union exactly [0, T), lengths within one of each other.
        assert intervals[0][0] == 0 and intervals[-1][1] == T
        assert all(a[1] == b[0] for a, b in zip(intervals, intervals[1:]))
        assert bool((coverage == 1).all())
        lengths = [hi - lo for lo, hi in intervals]
        assert max(lengths) - min(lengths) <= 1
    else:
        # More ranks than timesteps: one-timestep intervals, shared as evenly as integers allow.
        assert all(hi - lo == 1 for lo, hi in intervals)
        assert int(coverage.min()) == n // T and int(coverage.max()) == math.ceil(n / T)


def _drawer(global_batch: int, explicit: bool = True, caption_dropout: float = 0.1, seed: int = 0):
    """The trainer's own draw function on a stand-in holding only what it reads: draws(step, first_index, b) ->
    (t, noise, eps, drop) for global samples first_index .. first_index + b - 1."""
    cfg = SimpleNamespace(train=SimpleNamespace(seed=seed),
                          diffusion=SimpleNamespace(explicit_uniform_sampling=explicit, caption_dropout=caption_dropout))
    fake = SimpleNamespace(schedule=SimpleNamespace(num_train_timesteps=T), global_batch=global_batch, cfg=cfg)
    return lambda step, first_index, b, shape=(2, 3): Trainer._draws(fake, step, first_index, shape, b)


@pytest.mark.parametrize("n", [1, 3, 7, 8, 1001])
def test_drawn_timesteps_stay_in_interval_and_fill_it(n):
    """Global sample j of a global batch of n draws from explicit_uniform_interval(j, n, T), step after step."""
    draws = _drawer(n)
    for j in sorted({0, n // 2, n - 1}):
        lo, hi = explicit_uniform_interval(j, n, T)
        t = torch.cat([draws(step, j, 1)[0] for step in range(2000)])
        assert t.dtype == torch.int64
        assert int(t.min()) >= lo and int(t.max()) < hi
        if hi - lo <= 200:  # 2000 draws hit every value of an interval this small (seeded: the same draws each run)
            assert set(t.tolist()) == set(range(lo, hi))


@pytest.mark.parametrize("dp,micro,accum", [(8, 1, 1), (2, 4, 1), (2, 2, 2), (3, 1, 3)])
def test_one_step_spans_the_whole_range_and_each_dp_rank_its_own_part(dp, micro, accum):
    """One optimizer step: DP rank r takes its contiguous block of the global batch, micro-batch by micro-batch (as
    RankLoader hands them out); its t stay in [r T/dp, (r+1) T/dp) and the whole batch has one t per 1/N of [0, T)."""
    n = dp * micro * accum
    draws = _drawer(n)
    for step in range(20):
        everything = []
        for rank in range(dp):
            lo, hi = explicit_uniform_interval(rank, dp, T)
            first = rank * micro * accum
            t = torch.cat([draws(step, first + m * micro, micro)[0] for m in range(accum)])
            assert int(t.min()) >= lo and int(t.max()) < hi
            everything += t.tolist()
        # exactly one draw in each of the N intervals that tile [0, T): the evenness that gives the smoother loss
        starts = [explicit_uniform_interval(j, n, T)[0] for j in range(n)]
        assert sorted(bisect.bisect_right(starts, x) - 1 for x in everything) == list(range(n))


def test_switched_off_is_uniform_over_full_range():
    draws = _drawer(8, explicit=False)
    t = torch.cat([draws(step, 0, 8)[0] for step in range(5000)])  # 40,000 draws
    assert int(t.min()) == 0 and int(t.max()) == T - 1
    counts = torch.bincount(t // 100, minlength=10).double()
    # each tenth holds 10% +- 1% (about 6.7 standard deviations of a binomial with n=4e4)
    assert bool(((counts / t.numel() - 0.1).abs() < 0.01).all())
    # while explicit sampling keeps sample 0 of 8 in the first eighth
    assert int(torch.cat([_drawer(8)(step, 0, 1)[0] for step in range(200)]).max()) < T // 8


def test_draws_depend_on_the_sample_not_on_the_rank_layout():
    """The same global sample draws the same (t, noise, eps, drop) whether it sits in a micro-batch of 8 or of 2
    (any DP size, accumulation or TP/SP peer); another step, sample or seed draws other values."""
    draws = _drawer(8)
    whole = draws(10, 0, 8)
    parts = [draws(10, first, 2) for first in range(0, 8, 2)]
    for i, name in enumerate(["t", "noise", "eps", "drop"]):
        assert torch.equal(whole[i], torch.cat([p[i] for p in parts])), name
    t, noise, eps, _ = draws(10, 3, 1)
    assert not torch.equal(noise, eps)  # two draws, not one reused
    others = [draws(11, 3, 1), draws(10, 4, 1), _drawer(8, seed=1)(10, 3, 1)]
    assert all(not torch.equal(noise, o[1]) for o in others)
    assert 0 <= sampling_seed(7, 10, 2) < 2**63 and sampling_seed(7, 10, 2) != sampling_seed(7, 10, 3)


def test_caption_dropout_rate():
    draws = _drawer(8, caption_dropout=0.1)
    drop = torch.cat([draws(step, 0, 8)[3] for step in range(2500)])  # 20,000 draws
    assert drop.dtype == torch.bool
    assert abs(drop.double().mean().item() - 0.1) < 0.0127  # 6 standard deviations
    assert not _drawer(8, caption_dropout=0.0)(0, 0, 8)[3].any()
    assert _drawer(8, caption_dropout=1.0)(0, 0, 8)[3].all()


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="dp_world_size"):
        explicit_uniform_interval(0, 0, T)
    with pytest.raises(ValueError, match="dp_rank"):
        explicit_uniform_interval(4, 4, T)
    with pytest.raises(ValueError, match="num_train_timesteps"):
        explicit_uniform_interval(0, 1, 0)
