"""The planner is pure: every request planned exactly once, in order, within the limits."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scheduler.planner import Limits, plan


@given(lengths=st.lists(st.integers(1, 600), max_size=300), tokens=st.integers(1, 2048), requests=st.integers(1, 64))
def test_every_request_exactly_once_and_limits_hold(lengths, tokens, requests):
    limits = Limits(tokens, requests)
    batches = plan(lengths, limits)
    flat = [i for b in batches for i in b.indices]
    assert flat == list(range(len(lengths)))  # each once, arrival order kept
    for b in batches:
        assert b.tokens == sum(lengths[i] for i in b.indices)
        assert len(b.indices) <= requests
        # Over budget only when a single input is itself bigger than the budget.
        assert b.tokens <= tokens or len(b.indices) == 1


@given(lengths=st.lists(st.integers(1, 100), min_size=1, max_size=100), tokens=st.integers(100, 1000))
def test_greedy_batches_are_maximal(lengths, tokens):
    limits = Limits(tokens, 16)
    batches = plan(lengths, limits)
    for b, nxt in zip(batches, batches[1:]):
        # A batch was closed only because the next input would not fit.
        assert len(b.indices) == 16 or b.tokens + lengths[nxt.indices[0]] > tokens


def test_examples():
    assert [b.indices for b in plan([5, 5, 5], Limits(10, 8))] == [(0, 1), (2,)]
    assert [b.indices for b in plan([3, 3, 3], Limits(100, 2))] == [(0, 1), (2,)]
    assert [b.indices for b in plan([50, 1], Limits(10, 8))] == [(0,), (1,)]
    assert plan([], Limits(10, 8)) == []


def test_bad_limits_and_policy():
    with pytest.raises(ValueError):
        Limits(0, 1)
    with pytest.raises(ValueError, match="unknown scheduler policy"):
        plan([1], Limits(1, 1), "magic")
