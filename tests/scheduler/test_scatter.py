"""The simulator's batch-time scatter that falls with a batch's length, and a forward's fixed host cost."""

from __future__ import annotations

import math
import statistics

import pytest

from scheduler.cost_model import CostModel
from scheduler.planner import Limits, PolicyConfig
from scheduler.simulator import HostLoad, Scatter, Trace, lengths_uniform, make_trace, simulate

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
