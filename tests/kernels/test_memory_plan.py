"""The lifetime planner (pure): valid placements, the lower bound, chunk reuse."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.memory_plan import ALIGN, MemoryPlan, align, check_plan, lower_bound, plan_memory


@st.composite
def tensor_sets(draw):
    n = draw(st.integers(0, 40))
    sizes = draw(st.lists(st.integers(1, 5 << 20), min_size=n, max_size=n))
    first = draw(st.lists(st.integers(0, 60), min_size=n, max_size=n))
    spans = draw(st.lists(st.integers(0, 20), min_size=n, max_size=n))
    chunks = draw(st.lists(st.integers(1, 8 << 20), max_size=3))
    return sizes, first, [f + s for f, s in zip(first, spans)], chunks


@settings(max_examples=300, deadline=None)
@given(tensor_sets(), st.sampled_from([1 << 20, 2 << 20]), st.sampled_from([1.0, 1.2, 2.0]))
def test_no_two_live_tensors_share_bytes(case, min_chunk, growth):
    sizes, first, last, chunks = case
    plan = plan_memory(sizes, first, last, chunks, min_chunk, growth)
    check_plan(plan, first, last)  # raises on any overlap or overflow
    assert len(plan.chunk) == len(sizes) and all(s >= x for s, x in zip(plan.sizes, sizes))
    assert plan.chunk_sizes[:len(chunks)] == chunks
    # Nothing beats the peak of live bytes; chunks the plan asked for are the only new ones.
    assert plan.peak_bytes >= lower_bound(plan.sizes, first, last)
    assert sorted(plan.new_chunks) == list(range(len(chunks), len(plan.chunk_sizes)))
    assert all(plan.offset[i] % ALIGN == 0 for i in range(len(sizes)))


def test_check_plan_catches_overlap_and_overflow():
    plan = MemoryPlan([0, 0], [0, 256], [512, 512], [1024], [], frozenset({0}))
    with pytest.raises(ValueError, match="overlap"):
        check_plan(plan, [0, 1], [2, 3])  # alive together at ops 1-2, bytes 256-512 shared
    check_plan(plan, [0, 3], [2, 4])  # never alive together: sharing is fine
    with pytest.raises(ValueError, match="leaves chunk"):
        check_plan(MemoryPlan([0], [768], [512], [1024], [], frozenset({0})), [0], [0])


def test_lower_bound_is_peak_of_live_bytes():
    assert lower_bound([], [], []) == 0
    # a: ops 0-2 (100), b: 1-1 (50), c: 2-4 (70), d: 3-3 (10) -> peak at op 2: a + c = 170
    assert lower_bound([100, 50, 70, 10], [0, 1, 2, 3], [2, 1, 4, 3]) == 170


def test_chain_reuses_memory():
    # A chain of equal tensors, each alive for two ops: two slots suffice (the lower bound).
    n, size = 50, 1 << 20
    plan = plan_memory([size] * n, list(range(n)), [i + 1 for i in range(n)], min_chunk=1, growth=2.0)
    check_plan(plan, list(range(n)), [i + 1 for i in range(n)])
    assert plan.peak_bytes == 2 * size == lower_bound([size] * n, range(n), [i + 1 for i in range(n)])
    assert len(plan.chunk_sizes) == 1


def test_existing_chunks_are_used_before_new_ones():
    plan = plan_memory([1000, 2000], [0, 0], [1, 1], chunks=[8192])
    assert plan.new_chunks == [] and plan.used_chunks == {0}
    # Too big for the existing chunk: one new chunk of growth × size (at least min_chunk).
    plan = plan_memory([10_000], [0], [0], chunks=[8192], min_chunk=4096, growth=1.5)
    assert plan.new_chunks == [1] and plan.chunk_sizes[1] == align(1.5 * align(10_000))
    plan = plan_memory([100], [0], [0], chunks=[], min_chunk=2 << 20)
    assert plan.chunk_sizes == [2 << 20]


def test_largest_chunk_first():
    # Both chunks fit; the larger one is preferred so small old chunks fall idle.
    plan = plan_memory([1000], [0], [0], chunks=[4096, 65536])
    assert plan.chunk == [1]


def test_mismatched_inputs_refused():
    with pytest.raises(ValueError, match="one entry per tensor"):
        plan_memory([1, 2], [0], [0, 1])
