"""plan(next_only=True), what the worker and the simulator call: the same next batch and wait as the whole plan."""

from __future__ import annotations

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler.cost_model import CostModel
from scheduler.planner import Limits, PolicyConfig, Request, plan

PENDING = st.lists(
    st.builds(Request, length=st.integers(1, 300), arrival=st.floats(0.0, 1.0),
              deadline=st.one_of(st.just(math.inf), st.floats(0.0, 3.0)), priority=st.integers(0, 1),
              group=st.sampled_from([-1, -1, 0, 1])),
    min_size=1, max_size=40)
COSTS = st.builds(CostModel.linear, per_batch=st.floats(0.0, 0.05), per_token=st.floats(1e-6, 1e-3),
                  per_sq_token=st.floats(0.0, 1e-5), per_sequence=st.floats(0.0, 1e-2))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests=PENDING, cost=COSTS, cap=st.integers(1, 16), budget=st.integers(64, 2000), now=st.floats(0.0, 2.0),
       max_wait=st.sampled_from([0.0, 0.01]), grace=st.sampled_from([0.0, 4.0]))
def test_the_next_batch_and_the_wait_are_the_whole_plans(requests, cost, cap, budget, now, max_wait, grace):
    limits = Limits(budget, cap)
    config = PolicyConfig("dp", max_wait=max_wait, late_grace=grace)
    whole = plan(requests, limits, cost, now, config)
    head = plan(requests, limits, cost, now, config, next_only=True)
    assert head.batches[0] == whole.batches[0]
    assert head.wait_until == whole.wait_until
    assert {i for b in head.batches for i in b.indices} <= set(range(len(requests)))
    assert head.batches == whole.batches[:len(head.batches)]  # the first class's batches, as the whole plan runs them


def test_under_overload_only_the_first_class_is_planned():
    cost = CostModel.linear(0.01, 0.001)
    fresh = [Request(50, 10.0, 10.5) for _ in range(3)]
    hopeless = [Request(100, 8.0, 8.5) for _ in range(30)]  # past their deadline at 10.0: they go behind
    requests = fresh + hopeless
    whole = plan(requests, Limits(4096, 8), cost, 10.0)
    head = plan(requests, Limits(4096, 8), cost, 10.0, next_only=True)
    assert sorted(head.batches[0].indices) == [0, 1, 2] == sorted(whole.batches[0].indices)
    assert sum(len(b.indices) for b in head.batches) == 3 < len(requests)
    assert len(whole.late) == 30 and head.late == ()  # what it holds: the fresh batch, in time
    for policy in ("fifo", "triton", "token_budget", "sort_slice"):  # the baselines plan everything either way
        config = PolicyConfig(policy)
        assert plan(requests, Limits(4096, 8), cost, 10.0, config, next_only=True) == \
            plan(requests, Limits(4096, 8), cost, 10.0, config)
