"""Trace generation (power law, hashing, seeding) and the cache hit-rate references, Belady's against brute force."""

from __future__ import annotations

import time
from functools import cache
from itertools import combinations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.cache_bounds import belady_hits, dedup_batches, lfu_hits, lru_hits, next_use
from bench.cache_trace import (
    CRITEO_KAGGLE_CARDINALITIES,
    KeyHash,
    criteo_cardinalities,
    make_trace,
    sample_keys,
    zipf_ranks,
)


def brute_force_hits(keys: list[int], capacity: int, batch_size: int, bypass: bool) -> int:
    """Most hits over every choice of what to keep after every batch (exhaustive; tiny traces only)."""
    batches = [tuple(dict.fromkeys(keys[i:i + batch_size])) for i in range(0, len(keys), batch_size)]

    @cache
    def best(b: int, state: frozenset) -> int:
        if b == len(batches):
            return 0
        batch = set(batches[b])
        pool = sorted(state | batch)
        options = []
        for size in range(min(capacity, len(pool)) + 1):
            for kept in map(frozenset, combinations(pool, size)):
                # Demand paging: the batch enters the cache (as much of it as fits); else anything may stay out.
                if bypass or (batch <= kept if len(batch) <= capacity else kept <= batch):
                    options.append(kept)
        return len(batch & state) + max(best(b + 1, kept) for kept in options)

    return best(0, frozenset())


# --- tables and keys ------------------------------------------------------------------------------------------

def test_criteo_cardinalities():
    full = criteo_cardinalities()
    assert full.shape == (26,) and full.sum() == 33_762_577 and full.max() == 10_131_227
    small = criteo_cardinalities(0.01)
    assert small.max() == 101_312 and small.min() == 1 and list(small[:2]) == [15, 6]
    assert tuple(criteo_cardinalities(1.0)) == CRITEO_KAGGLE_CARDINALITIES
    with pytest.raises(ValueError):
        criteo_cardinalities(0)


@pytest.mark.parametrize("alpha", [0.9, 1.0, 1.05, 1.2])
def test_zipf_ranks_follow_the_exact_law(alpha):
    n, draws = 30, 300_000
    ranks = zipf_ranks(n, alpha, draws, np.random.default_rng(7))
    assert ranks.dtype == np.int64 and ranks.min() >= 0 and ranks.max() < n
    p = np.arange(1, n + 1, dtype=float) ** -alpha
    p /= p.sum()
    expected = draws * p
    chi2 = (((np.bincount(ranks, minlength=n) - expected) ** 2) / expected).sum()
    assert chi2 < 60, chi2  # 29 degrees of freedom: P(chi2 > 60) < 0.001


def test_zipf_edges():
    rng = np.random.default_rng(0)
    assert np.array_equal(zipf_ranks(1, 1.05, 100, rng), np.zeros(100, dtype=np.int64))
    uniform = zipf_ranks(10, 0.0, 100_000, rng)
    assert np.abs(np.bincount(uniform, minlength=10) / 100_000 - 0.1).max() < 0.01
    assert zipf_ranks(5, 1.2, 0, rng).size == 0
    with pytest.raises(ValueError):
        zipf_ranks(0, 1.0, 5, rng)


@pytest.mark.parametrize("alpha", [0.9, 1.05, 1.2])
def test_frequencies_fall_with_rank_as_the_power_law(alpha):
    n, draws = 2_000_000, 2_000_000
    keys = sample_keys(n, alpha, draws, seed=3)
    ranks = KeyHash(n, 3).inverse(keys)  # undo the hash to find each key's popularity rank
    counts = np.bincount(ranks, minlength=n)[:300]
    slope = np.polyfit(np.log(np.arange(1, 301)), np.log(counts), 1)[0]
    assert abs(slope + alpha) < 0.03, slope
    assert np.all(counts[:5][:-1] > counts[:5][1:])  # the head is strictly ordered


@pytest.mark.parametrize("alpha", [0.9, 1.05, 1.2])
def test_hashing_moves_the_hot_keys(alpha):
    n = 100_000
    counts = np.bincount(sample_keys(n, alpha, 200_000, seed=5), minlength=n)
    hottest = np.argsort(counts)[::-1][:10]
    assert hottest[0] != 0 and hottest[0] == KeyHash(n, 5)(np.array([0]))[0]
    assert hottest.max() > n // 10  # scattered, not packed at the start of the table


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 17, 1000, 4097, 65536])
def test_key_hash_is_a_bijection(n):
    h = KeyHash(n, seed=9)
    x = np.arange(n)
    y = h(x)
    assert np.array_equal(np.sort(y), x) and np.array_equal(h.inverse(y), x)
    if n > 100:
        assert not np.array_equal(y, KeyHash(n, seed=10)(x))
        assert (y == x).mean() < 0.05
    with pytest.raises(ValueError):
        h(np.array([n]))


def test_traces_are_seeded():
    cards = criteo_cardinalities(0.001)
    a = make_trace(cards, batches=20, batch_size=16, alpha=1.05, seed=1, hotness=2)
    b = make_trace(cards, batches=20, batch_size=16, alpha=1.05, seed=1, hotness=2)
    c = make_trace(cards, batches=20, batch_size=16, alpha=1.05, seed=2, hotness=2)
    assert a.per_batch == 32 and len(a.keys) == 26 and all(k.shape == (640,) for k in a.keys)
    assert all(np.array_equal(x, y) for x, y in zip(a.keys, b.keys))
    assert not all(np.array_equal(x, y) for x, y in zip(a.keys, c.keys))
    assert all(k.min() >= 0 and k.max() < n for k, n in zip(a.keys, cards))
    combined = a.combined().reshape(20, 26, 32)
    for t in range(26):
        assert np.array_equal(combined[:, t].ravel() - a.offsets[t], a.keys[t])
    uniform = make_trace(cards, batches=2, batch_size=8, alpha=0.0, seed=1)
    assert uniform.keys[2].max() < cards[2]


# --- de-duplication and next use ------------------------------------------------------------------------------

def test_dedup_batches():
    keys = np.array([5, 3, 5, 5, 1, 1, 2])
    stream, offsets = dedup_batches(keys, batch_size=3)
    assert stream.tolist() == [5, 3, 5, 1, 2] and offsets.tolist() == [0, 2, 4, 5]
    stream, offsets = dedup_batches(keys, offsets=np.array([0, 0, 4, 7]))
    assert stream.tolist() == [5, 3, 1, 2] and offsets.tolist() == [0, 0, 2, 4]
    with pytest.raises(ValueError):
        dedup_batches(keys, offsets=np.array([0, 5, 4, 7]))
    assert next_use(np.array([4, 2, 4, 4, 2, 9])).tolist() == [2, 4, 3, 9, 10, 11]


# --- hit rates ------------------------------------------------------------------------------------------------

def test_reference_policies_on_hand_checked_traces():
    trace = np.array([1, 1, 2, 3, 1])
    assert lru_hits(trace, 2).hits == 1  # 3 evicts 1, the least recent
    assert lfu_hits(trace, 2).hits == 2  # 3 evicts 2, the least used
    assert belady_hits(trace, 2).hits == 2
    assert belady_hits(np.array([1, 2, 1]), 1).hits == 0  # demand paging must take 2 in
    assert belady_hits(np.array([1, 2, 1]), 1, bypass=True).hits == 1


def test_batches_are_looked_up_before_any_insertion():
    # C=1, batches [a] [b a] [b]: the batch finds a before b replaces it. Belady's on the flat de-duplicated
    # stream a b a b scores less than batched LRU here, so the batched optimum is the bound to compare with.
    keys, offsets = np.array([1, 2, 1, 2]), np.array([0, 1, 3, 4])
    assert lru_hits(keys, 1, offsets=offsets).hits == 2
    assert lfu_hits(keys, 1, offsets=offsets).hits == 2
    assert belady_hits(keys, 1, offsets=offsets).hits == 2
    assert belady_hits(keys, 1, bypass=True).hits == 1


traces = st.lists(st.integers(0, 9), max_size=80)


@settings(max_examples=300, deadline=None)
@given(traces, st.integers(0, 6), st.integers(1, 5))
def test_belady_bounds_lru_and_lfu(keys, capacity, batch_size):
    keys = np.array(keys, dtype=np.int64)
    opt = belady_hits(keys, capacity, batch_size=batch_size)
    free = belady_hits(keys, capacity, batch_size=batch_size, bypass=True)
    lru = lru_hits(keys, capacity, batch_size=batch_size)
    lfu = lfu_hits(keys, capacity, batch_size=batch_size)
    assert opt.lookups == lru.lookups == lfu.lookups == free.lookups
    assert free.hits >= opt.hits >= max(lru.hits, lfu.hits)
    assert free.hits <= opt.lookups - len(set(keys.tolist()))  # every key's first lookup misses


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 5), max_size=10), st.integers(1, 3), st.integers(1, 3), st.booleans())
def test_belady_equals_brute_force(keys, capacity, batch_size, bypass):
    ours = belady_hits(np.array(keys, dtype=np.int64), capacity, batch_size=batch_size, bypass=bypass)
    assert ours.hits == brute_force_hits(keys, capacity, batch_size, bypass)


@pytest.mark.slow
def test_belady_is_fast_on_a_million_accesses():
    keys = sample_keys(1_000_000, 1.05, 1_000_000, seed=0)
    started = time.perf_counter()
    opt = belady_hits(keys, 20_000)
    assert time.perf_counter() - started < 20  # ~1 s on one core; generous for a loaded machine
    assert opt.hit_rate > lru_hits(keys[:200_000], 20_000).hit_rate * 0.9
