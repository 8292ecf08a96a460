"""Explicit uniform timestep sampling: intervals, coverage for any N, determinism shared by TP/SP peers."""

import math

import pytest
import torch

from cogvx_ds.diffusion import explicit_uniform_interval, sample_timesteps, sampling_generator, sampling_seed

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


@pytest.mark.parametrize("n", [1, 3, 7, 8, 1001])
def test_drawn_timesteps_stay_in_interval_and_fill_it(n):
    for rank in sorted({0, n // 2, n - 1}):
        lo, hi = explicit_uniform_interval(rank, n, T)
        g = torch.Generator().manual_seed(rank)
        t = sample_timesteps(4000, T, generator=g, dp_rank=rank, dp_world_size=n)
        assert t.dtype == torch.int64 and t.shape == (4000,)
        assert int(t.min()) >= lo and int(t.max()) < hi
        if hi - lo <= 200:  # 4000 draws hit every value of a small interval
            assert set(t.tolist()) == set(range(lo, hi))


def test_one_step_across_ranks_spans_the_whole_range():
    n = 8
    ts = [
        sample_timesteps(1, T, generator=sampling_generator(0, 5, r), dp_rank=r, dp_world_size=n).item()
        for r in range(n)
    ]
    # Exactly one draw per eighth of [0, T): the evenness that gives the smoother loss.
    assert sorted(t * n // T for t in ts) == list(range(n))


def test_switched_off_is_uniform_over_full_range():
    g = torch.Generator().manual_seed(1)
    t = sample_timesteps(100_000, T, generator=g, dp_rank=3, dp_world_size=8, explicit_uniform=False)
    assert int(t.min()) == 0 and int(t.max()) == T - 1
    counts = torch.bincount(t // 100, minlength=10).double()
    # Each tenth holds 10% +- 0.6% (about 6 standard deviations of a binomial with n=1e5).
    assert bool(((counts / 100_000 - 0.1).abs() < 0.006).all())


def test_peers_share_t_and_noise_and_streams_differ_otherwise():
    def draw(seed, step, dp_rank, micro_step=0):
        g = sampling_generator(seed, step, dp_rank, micro_step)
        t = sample_timesteps(2, T, generator=g, dp_rank=dp_rank, dp_world_size=4)
        return t, torch.randn(2, 3, 5, generator=g)

    # TP/SP peers of a sample have the same (seed, step, dp_rank), whatever their global rank: identical draws.
    t_a, n_a = draw(7, 10, 2)
    t_b, n_b = draw(7, 10, 2)
    assert torch.equal(t_a, t_b) and torch.equal(n_a, n_b)
    # Any other step, DP rank, micro-step or seed gives another stream.
    others = [draw(7, 11, 2), draw(7, 10, 3), draw(7, 10, 2, micro_step=1), draw(8, 10, 2)]
    assert all(not torch.equal(n_a, n) for _, n in others)
    assert sampling_seed(7, 10, 2) == sampling_seed(7, 10, 2) < 2**63


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="dp_world_size"):
        explicit_uniform_interval(0, 0, T)
    with pytest.raises(ValueError, match="dp_rank"):
        explicit_uniform_interval(4, 4, T)
    with pytest.raises(ValueError, match="num_train_timesteps"):
        explicit_uniform_interval(0, 1, 0)
