"""The simulator: every request completes once, latencies are physical, and it is deterministic."""

from __future__ import annotations

import random

from scheduler.cost_model import CostModel
from scheduler.planner import Limits, PolicyConfig
from scheduler.simulator import bursty_arrivals, lengths_uniform, make_trace, simulate

COST = CostModel.linear(0.0127, 0.00025, 4e-7, 0.00024)  # the shape measured on a 2-core CPU
LIMITS = Limits(16384, 64)


def test_every_request_completes_and_latency_covers_service_time():
    trace = make_trace(10.0, 300, lengths_uniform(8, 256), seed=3)
    for name in ("dp", "token_budget", "fifo", "triton", "sort_slice"):
        r = simulate(trace, PolicyConfig(name), LIMITS, COST, slo=2.0)
        assert r.completed == 300
        assert r.p50 >= COST.predict_lengths([8]) * 0.99
        assert r.p99 >= r.p50
        assert 0 <= r.slo_attainment <= 1 and 0 <= r.padding_ratio < 1
        assert r.goodput <= r.throughput


def test_deterministic():
    trace = make_trace(20.0, 200, lengths_uniform(8, 256), seed=5)
    a = simulate(trace, PolicyConfig("dp"), LIMITS, COST, slo=1.0)
    b = simulate(trace, PolicyConfig("dp"), LIMITS, COST, slo=1.0)
    assert a == b


def test_under_overload_dp_keeps_serving_requests_in_time():
    # 1.2x capacity: the baselines let every request go late; dp serves the ones it still can in time first.
    capacity = 64 / COST.predict_lengths([132] * 64)
    trace = make_trace(1.2 * capacity, 600, lengths_uniform(8, 256), seed=1)
    dp = simulate(trace, PolicyConfig("dp"), LIMITS, COST, slo=2.0)
    fifo = simulate(trace, PolicyConfig("fifo"), LIMITS, COST, slo=2.0)
    assert dp.goodput > 1.3 * fifo.goodput
    assert dp.completed == fifo.completed == 600


def test_bursts_arrive_together():
    arrivals = bursty_arrivals(100.0, 64, random.Random(0), burst=16)
    assert len(arrivals) == 64 and len(set(arrivals)) == 4
