"""kernels/attention_groups.py: CPU attention in padded groups of sequences agrees with one call a sequence, and
the grouping is the cheapest cut of the sorted lengths."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels.attention as attention
from kernels.attention_groups import CALL_OVERHEAD, plan_groups, varlen_attention_grouped


def offsets(lengths: list[int]) -> list[int]:
    return [0, *itertools.accumulate(lengths)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_groups_agree_with_one_call_a_sequence(causal, dtype, tol):
    rng = random.Random(4)
    torch.manual_seed(4)
    # short queries that share calls, long texts that keep their own, repeats, and a CUDA graph's empty slot
    lengths = [rng.randint(1, 40) for _ in range(30)] + [rng.randint(150, 300) for _ in range(4)] + [16, 16, 0, 1]
    rng.shuffle(lengths)
    cu = offsets(lengths)
    assert any(len(g.seqs) > 1 for g in plan_groups(tuple(lengths)))  # the padded path is exercised
    assert any(len(g.seqs) == 1 for g in plan_groups(tuple(lengths)))  # and the single one
    q, k, v = (torch.randn(cu[-1], 6, 16, dtype=dtype) for _ in range(3))
    out = torch.full((cu[-1], 96), float("nan"), dtype=dtype)  # poisoned: every real row must be written
    got = varlen_attention_grouped(q, k, v, cu, out=out, causal=causal)
    want = attention.varlen_attention_reference(q.float(), k.float(), v.float(), cu, causal=causal)
    assert got.data_ptr() == out.data_ptr()
    assert not got.isnan().any()
    assert (got.float() - want).abs().max().item() <= tol


def test_the_cpu_dispatcher_takes_the_groups():
    torch.manual_seed(0)
    lengths = [5, 9, 7, 3]
    cu = offsets(lengths)
    q, k, v = (torch.randn(cu[-1], 2, 8) for _ in range(3))
    got = attention.varlen_attention(q, k, v, cu)
    assert len(plan_groups(tuple(lengths))) == 1  # one call for the four
    torch.testing.assert_close(got, attention.varlen_attention_reference(q, k, v, cu), atol=1e-6, rtol=1e-5)


def brute_force(lengths: list[int], overhead: float, longest_shared: int) -> float:
    """The cheapest split of the sorted lengths into consecutive groups, over every split."""
    ordered = sorted(n for n in lengths if n > 0)
    if not ordered:
        return 0.0
    best = float("inf")
    for cuts in itertools.product((False, True), repeat=max(len(ordered) - 1, 0)):
        total, start = 0.0, 0
        for end in [i + 1 for i, c in enumerate(cuts) if c] + [len(ordered)]:
            shared_too_long = end - start > 1 and ordered[end - 1] > longest_shared
            total += float("inf") if shared_too_long else overhead + (end - start) * ordered[end - 1] ** 2
            start = end
        best = min(best, total)
    return best


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 300), max_size=9), st.sampled_from([0.0, 100.0, float(CALL_OVERHEAD), 1e6]),
       st.sampled_from([64, 1000]))
def test_plan_is_the_cheapest_cut_and_covers_every_sequence_once(lengths, overhead, longest_shared):
    groups = plan_groups(tuple(lengths), overhead, longest_shared)
    covered = sorted(s for g in groups for s in g.seqs)
    assert covered == [i for i, n in enumerate(lengths) if n > 0]
    for g in groups:
        assert g.longest == max(lengths[s] for s in g.seqs)
        assert len(g.seqs) == 1 or g.longest <= longest_shared
    cost = sum(overhead + len(g.seqs) * g.longest ** 2 for g in groups)
    assert cost == pytest.approx(brute_force(lengths, overhead, longest_shared))


def test_long_sequences_keep_their_own_call_and_short_ones_share():
    groups = plan_groups((300, 12, 14, 290, 16, 10), CALL_OVERHEAD, longest_shared=1000)
    assert [g.longest for g in groups] == [16, 290, 300]  # 290 and 300 would waste more padding than a call costs
    assert [g.longest for g in plan_groups((60, 62, 64, 66, 68), CALL_OVERHEAD)] == [64, 66, 68]  # none past 64 share
    assert sorted(groups[0].seqs) == [1, 2, 4, 5]
