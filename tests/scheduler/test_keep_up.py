"""dp's keep_up: under a backlog the next batch is large enough to serve the recent arrival rate."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler.cost_model import CostModel
from scheduler.dp import keep_up_size
from scheduler.planner import Limits, PolicyConfig, Request, plan, recent_rate

COST = CostModel.linear(0.01, 0.001)  # 10 ms a batch, 1 ms a token


def test_the_size_that_keeps_up_with_a_rate():
    lengths = np.full(5, 10.0)  # a batch of n takes 0.01 + 0.01 n seconds: n / that requests a second
    limits = Limits(4096, 64)
    assert keep_up_size(lengths, limits, COST, 40.0) == 1  # 1 / 0.02 = 50 a second already
    assert keep_up_size(lengths, limits, COST, 90.0) == 9  # 9 / 0.1 = 90
    assert keep_up_size(lengths, limits, COST, 100.0) == 64  # never (100 a second is the limit): the largest batch
    assert keep_up_size(lengths, Limits(200, 64), COST, 100.0) == 20  # ... within the token budget


def test_recent_rate_counts_the_last_window():
    arrivals = [0.0, 0.5, 1.0, 1.5, 2.5, 3.0, 9.0]
    assert recent_rate(arrivals, 3.0) == 4 / 2.0  # 1.0 .. 3.0 (9.0 has not arrived)
    assert recent_rate(arrivals, 3.0, window=1.0) == 2 / 1.0
    assert recent_rate([], 1.0) == 0.0


def backlog(now: float = 10.0) -> list[Request]:
    """An urgent pair, six that can wait for it, and twenty already past their deadline: 2.8 s of work against SLOs of
    1 s, a backlog. The pair must run alone to make it (with the six, 0.81 s: late)."""
    urgent = [Request(100, now - 0.75, now + 0.25) for _ in range(2)]
    later = [Request(100, now - 0.05, now + 0.95) for _ in range(6)]
    stale = [Request(100, now - 1.5, now - 0.5) for _ in range(20)]
    return urgent + later + stale


def test_a_backlog_grows_the_next_batch_to_keep_up():
    limits, now = Limits(16384, 64), 10.0
    requests = backlog(now)
    calm = plan(requests, limits, COST, now, PolicyConfig("dp"), arrival_rate=0.0)
    assert sorted(calm.batches[0].indices) == [0, 1] and not set(calm.late) & set(range(8))
    # to serve 40 a second a batch needs n / (0.01 + 0.1 n) >= 40 * 1.1 = 44: never, so the largest batch, but only
    # from the batches of its class (the stale requests still go behind)
    busy = plan(requests, limits, COST, now, PolicyConfig("dp"), arrival_rate=40.0)
    assert sorted(busy.batches[0].indices) == list(range(8))
    assert {0, 1} <= set(busy.late)  # the price: the pair is late
    off = plan(requests, limits, COST, now, PolicyConfig("dp", keep_up=0.0), arrival_rate=40.0)
    assert sorted(off.batches[0].indices) == [0, 1]
    # 5 a second: a batch of one keeps up (1 / 0.11 = 9 a second), so nothing changes
    assert plan(requests, limits, COST, now, PolicyConfig("dp"), arrival_rate=5.0).batches == calm.batches
    # with SLOs of 10 s, 2.8 s of work is no backlog: nothing changes either
    relaxed = [Request(r.length, r.arrival, r.arrival + 10.0) for r in requests]
    assert plan(relaxed, limits, COST, now, PolicyConfig("dp"), arrival_rate=40.0).batches == \
        plan(relaxed, limits, COST, now, PolicyConfig("dp"), arrival_rate=0.0).batches


def test_not_while_requests_of_several_inputs_are_pending():
    limits, now = Limits(16384, 64), 10.0
    requests = backlog(now)
    requests[10] = Request(100, requests[10].arrival, requests[10].deadline, group=7)
    requests[11] = Request(100, requests[11].arrival, requests[11].deadline, group=7)
    with_rate = plan(requests, limits, COST, now, PolicyConfig("dp"), arrival_rate=40.0)
    assert with_rate.batches == plan(requests, limits, COST, now, PolicyConfig("dp"), arrival_rate=0.0).batches


PENDING = st.lists(
    st.builds(Request, length=st.integers(1, 300), arrival=st.floats(0.0, 1.0),
              deadline=st.one_of(st.just(math.inf), st.floats(0.0, 3.0)), priority=st.integers(0, 1)),
    min_size=1, max_size=40)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests=PENDING, cap=st.integers(1, 16), budget=st.integers(64, 2000), now=st.floats(0.5, 2.0),
       rate=st.floats(0.0, 500.0))
def test_every_request_once_within_limits_and_the_worker_plans_the_same_next_batch(requests, cap, budget, now, rate):
    limits = Limits(budget, cap)
    whole = plan(requests, limits, COST, now, PolicyConfig("dp"), arrival_rate=rate)
    assert sorted(i for b in whole.batches for i in b.indices) == list(range(len(requests)))
    for b in whole.batches:
        assert len(b.indices) <= cap and (b.tokens <= budget or len(b.indices) == 1)
    head = plan(requests, limits, COST, now, PolicyConfig("dp"), next_only=True, arrival_rate=rate)
    assert head.batches[0] == whole.batches[0] and head.wait_until == whole.wait_until
