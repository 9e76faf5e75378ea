"""The simulator's batch-time scatter that falls with a batch's length, and a forward's fixed host cost."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from scheduler.cost_model import CostModel
from scheduler.planner import Limits, PolicyConfig
from scheduler.simulator import HostLoad, Scatter, Spells, Trace, lengths_uniform, make_trace, simulate

COST = CostModel.linear(0.0127, 0.00025, 4e-7, 0.00024)
LIMITS = Limits(16384, 64)


def test_sigma_falls_with_the_batch_length_to_the_floor():
    s = Scatter(0.06, 0.012)
    assert s.sigma(0.01) == pytest.approx(math.sqrt(0.06 ** 2 + 0.012 ** 2 / 0.01))
    assert s.sigma(0.01) > s.sigma(0.1) > s.sigma(1.0) > s.sigma(100.0) > 0.06
    assert s.sigma(1e6) == pytest.approx(0.06, rel=1e-6)
    assert Scatter(0.1).sigma(0.001) == 0.1 and not Scatter() and Scatter(0.0, 0.01)


def test_a_floor_alone_is_the_old_constant_noise():
    trace = make_trace(20.0, 300, lengths_uniform(8, 256), seed=4)
    for name in ("dp", "fifo"):
        old = simulate(trace, PolicyConfig(name), LIMITS, COST, 1.0, refine=True, noise=0.15, seed=3)
        new = simulate(trace, PolicyConfig(name), LIMITS, COST, 1.0, refine=True, noise=Scatter(0.15), seed=3)
        assert old == new


def lone_latencies(host: HostLoad | None, noise, lengths: list[int], seed: int = 0) -> list[float]:
    """Each length alone in a trace of one request (its own noise seed): its latency is its batch's time."""
    return [simulate(Trace([0.0], [n]), PolicyConfig("dp"), LIMITS, COST, 100.0, host=host, noise=noise, seed=seed + i).p50
            for i, n in enumerate(lengths)]


def test_a_forward_fixed_cost_is_added_to_every_batch():
    lengths = [8, 64, 256]
    base = lone_latencies(None, 0.0, lengths)
    more = lone_latencies(HostLoad(per_forward=0.004), 0.0, lengths)
    assert base == pytest.approx([COST.predict_lengths([n]) for n in lengths])
    assert [b - a for a, b in zip(base, more)] == pytest.approx([0.004] * 3)


def test_short_batches_scatter_more_than_long_ones():
    scatter = Scatter(0.02, 0.01)
    short = [math.log(t / COST.predict_lengths([8])) for t in lone_latencies(None, scatter, [8] * 300)]
    model_long = COST.predict_lengths([256] * 40)
    trace_long = []
    for seed in range(300):
        r = simulate(Trace([0.0] * 40, [256] * 40), PolicyConfig("fifo", fixed_batch_size=64), LIMITS, COST, 100.0,
                     noise=scatter, seed=seed)
        trace_long.append(math.log(r.p50 / model_long))
    assert statistics.stdev(short) == pytest.approx(scatter.sigma(COST.predict_lengths([8])), rel=0.15)
    assert statistics.stdev(trace_long) == pytest.approx(scatter.sigma(model_long), rel=0.15)
    assert statistics.stdev(short) > 1.5 * statistics.stdev(trace_long)


def test_a_machine_that_slows_down_mid_trace_takes_longer_from_then_on():
    trace = Trace([0.0, 1.0, 10.0], [64, 64, 64])  # each alone; p50 is the second, p99 the third
    alone = COST.predict_lengths([64])
    r = simulate(trace, PolicyConfig("dp"), LIMITS, COST, 100.0, speed_at=lambda t: 1.0 if t < 5.0 else 2.0)
    steady = simulate(trace, PolicyConfig("dp"), LIMITS, COST, 100.0)
    assert steady.p50 == pytest.approx(alone) and steady.p99 == pytest.approx(alone)
    assert r.p50 == pytest.approx(alone) and r.p99 == pytest.approx(2 * alone)


def spell_logs(spells: Spells, times, seed: int) -> np.ndarray:
    path = spells.path(seed)
    return np.array([math.log(path(t)) for t in times])


def test_spells_have_their_sd_and_correlation_time():
    """One Ornstein-Uhlenbeck process: log factor sd sigma, correlation exp(-lag / tau) between two times."""
    spells = Spells((0.1,), (0.5,))
    times = np.arange(0, 2000.0, 0.05)
    logs = np.concatenate([spell_logs(spells, times, seed) for seed in range(3)])
    assert np.std(logs) == pytest.approx(0.1, rel=0.1)
    x = spell_logs(spells, times, 7)
    for lag_steps, expected in ((10, math.exp(-1.0)), (40, math.exp(-4.0))):  # 0.5 s and 2 s apart
        assert np.corrcoef(x[:-lag_steps], x[lag_steps:])[0, 1] == pytest.approx(expected, abs=0.05)
    assert np.array_equal(spell_logs(spells, times[:50], 3), spell_logs(spells, times[:50], 3))
    assert not np.array_equal(spell_logs(spells, times[:50], 3), spell_logs(spells, times[:50], 4))


def test_spells_validate_and_none_is_falsy():
    assert not Spells() and not Spells((0.0,), (1.0,)) and Spells((0.1,), (1.0,))
    assert Spells((0.03, 0.04), (0.2, 5.0)).variance() == pytest.approx(0.0025)
    assert Scatter(spells=Spells((0.1,), (1.0,))) and not Scatter()
    for sigma, tau in (((0.1,), ()), ((0.1,), (0.0,)), ((-0.1,), (1.0,))):
        with pytest.raises(ValueError):
            Spells(sigma, tau)


def test_batches_close_in_time_overrun_together_under_spells():
    """Lone requests 50 ms apart for 20 s: under a spell much longer than the trace every batch runs at about the
    same factor (p99 / p50 near 1 within a seed, the factor moving between seeds); drawn batch by batch with the same
    sd, they spread within a seed."""
    trace = Trace([0.05 * i for i in range(400)], [64] * 400)
    alone = COST.predict_lengths([64])
    fifo = PolicyConfig("fifo", fixed_batch_size=1, max_queue_delay=0.0)
    slow = [simulate(trace, fifo, LIMITS, COST, 100.0, noise=Scatter(spells=Spells((0.2,), (1e5,))), seed=s)
            for s in range(20)]
    apart = [simulate(trace, fifo, LIMITS, COST, 100.0, noise=Scatter(0.2), seed=s) for s in range(20)]
    assert all(r.completed == r.batches == 400 for r in slow + apart)
    assert max(r.p99 / r.p50 for r in slow) < 1.03 < 1.3 < min(r.p99 / r.p50 for r in apart)
    assert statistics.stdev(math.log(r.p50 / alone) for r in slow) == pytest.approx(0.2, rel=0.4)
    assert statistics.stdev(math.log(r.p50 / alone) for r in apart) < 0.05


def test_a_seed_gives_one_path_whenever_it_is_asked():
    """Policies that start batches at different times see the same spells on a seed (paired comparisons)."""
    spells = Spells((0.1, 0.05), (0.3, 10.0))
    early, late = spells.path(4), spells.path(4)
    forwards = [early(t) for t in (0.0, 0.5, 1.0, 7.25, 30.0)]
    assert [late(t) for t in (30.0, 7.25, 1.0, 0.5, 0.0)] == forwards[::-1]
    assert late(7.25 + 0.004) == late(7.25)  # held over a step
