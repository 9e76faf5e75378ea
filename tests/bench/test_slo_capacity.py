"""bench/simulate.slo_capacity: the bisection both the simulation and the live benchmark use."""

import random

from bench.simulate import slo_capacity
from scheduler.cost_model import CostModel
from scheduler.planner import Limits, PolicyConfig
from scheduler.simulator import Trace, poisson_arrivals, simulate

COST = CostModel.linear(0.01, 0.0005, 0.0, 0.0002)
LIMITS = Limits(4096, 32)
LENGTHS = [random.Random(3).randint(8, 128) for _ in range(400)]
UNIT = 50.0  # requests/s at load 1


def trace_at(load: float) -> Trace:
    return Trace(poisson_arrivals(load * UNIT, len(LENGTHS), random.Random(7)), LENGTHS)


def within(load: float, config: PolicyConfig, slo: float) -> bool:
    trace = trace_at(load)
    r = simulate(trace, config, LIMITS, COST, slo)
    offered = len(trace.arrivals) / (trace.arrivals[-1] - trace.arrivals[0])
    return r.p99 <= slo and r.throughput >= 0.97 * offered


def test_the_capacity_holds_the_slo_and_the_next_step_up_does_not():
    slo, steps = 0.5, 8
    for name in ("dp", "fifo"):
        config = PolicyConfig(name, max_queue_delay=0.005, max_wait=0.005)
        load = slo_capacity(trace_at, config, LIMITS, COST, slo, steps)
        assert 0 < load < 2
        assert within(load, config, slo)
        assert not within(load + 2 / 2**steps, config, slo)
