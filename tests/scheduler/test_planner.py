"""The baseline planners are pure: every request planned exactly once, within the limits, in the order
and with the waits each peer system uses."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scheduler.cost_model import CostModel
from scheduler.planner import Limits, PolicyConfig, Request, plan

BASELINES = ["token_budget", "fifo", "triton", "sort_slice"]


def tb(lengths, limits):
    return plan([Request(n) for n in lengths], limits, config=PolicyConfig("token_budget")).batches


@given(lengths=st.lists(st.integers(1, 600), max_size=300), tokens=st.integers(1, 2048), requests=st.integers(1, 64),
       policy=st.sampled_from(BASELINES))
def test_every_request_exactly_once_and_limits_hold(lengths, tokens, requests, policy):
    limits = Limits(tokens, requests)
    batches = plan([Request(n) for n in lengths], limits, config=PolicyConfig(policy)).batches
    flat = [i for b in batches for i in b.indices]
    assert sorted(flat) == list(range(len(lengths)))
    if policy != "sort_slice":
        assert flat == list(range(len(lengths)))  # arrival order kept
    for b in batches:
        assert b.tokens == sum(lengths[i] for i in b.indices)
        assert len(b.indices) <= requests
        # Over budget only when a single input is itself bigger than the budget.
        assert b.tokens <= tokens or len(b.indices) == 1


@given(lengths=st.lists(st.integers(1, 100), min_size=1, max_size=100), tokens=st.integers(100, 1000))
def test_greedy_batches_are_maximal(lengths, tokens):
    limits = Limits(tokens, 16)
    batches = tb(lengths, limits)
    for b, nxt in zip(batches, batches[1:]):
        # A batch was closed only because the next input would not fit.
        assert len(b.indices) == 16 or b.tokens + lengths[nxt.indices[0]] > tokens


def test_token_budget_examples():
    assert [b.indices for b in tb([5, 5, 5], Limits(10, 8))] == [(0, 1), (2,)]
    assert [b.indices for b in tb([3, 3, 3], Limits(100, 2))] == [(0, 1), (2,)]
    assert [b.indices for b in tb([50, 1], Limits(10, 8))] == [(0,), (1,)]
    assert tb([], Limits(10, 8)) == []


def test_fifo_waits_for_a_full_batch_up_to_the_delay():
    config = PolicyConfig("fifo", fixed_batch_size=4, max_queue_delay=0.01)
    short = plan([Request(5, arrival=1.0), Request(5, arrival=1.002)], Limits(100, 8), now=1.003, config=config)
    assert short.wait_until == 1.01
    full = plan([Request(5, arrival=1.0)] * 5, Limits(100, 8), now=1.003, config=config)
    assert full.wait_until is None and [len(b.indices) for b in full.batches] == [4, 1]


def test_triton_prefers_the_largest_fillable_size():
    config = PolicyConfig("triton", preferred_batch_sizes=(4, 8), max_queue_delay=0.01)
    p = plan([Request(5)] * 6, Limits(1000, 16), now=0.0, config=config)
    assert [len(b.indices) for b in p.batches] == [4, 2] and p.wait_until is None
    p = plan([Request(5, arrival=2.0)] * 3, Limits(1000, 16), now=2.001, config=config)
    assert p.wait_until == 2.01 and [len(b.indices) for b in p.batches] == [3]


def test_sort_slice_sorts_by_length():
    p = plan([Request(n) for n in (30, 10, 20, 40)], Limits(1000, 2), config=PolicyConfig("sort_slice"))
    assert [b.indices for b in p.batches] == [(1, 2), (0, 3)]


def test_predictions_and_lateness():
    cost = CostModel.linear(0.0, 0.01)
    p = plan([Request(10, deadline=0.05), Request(10, deadline=1.0)], Limits(10, 8), cost, 0.0,
             PolicyConfig("token_budget"))
    assert p.cost == pytest.approx(0.2) and p.late == (0,) and p.infeasible == (0,)


def test_bad_limits_and_policy():
    with pytest.raises(ValueError):
        Limits(0, 1)
    with pytest.raises(ValueError, match="unknown scheduler policy"):
        plan([Request(1)], Limits(1, 1), config=PolicyConfig("magic"))
    with pytest.raises(ValueError, match="needs a cost model"):
        plan([Request(1)], Limits(1, 1), config=PolicyConfig("dp"))
