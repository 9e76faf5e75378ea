"""Device cache: tier semantics, batch edge cases, and LRU/LFU against a plain-Python set-associative model."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from embeddings.device_cache import DeviceCache, set_of
from embeddings.tier import TableSpec

G = 0x9E3779B97F4A7C15
MIN = -(1 << 63)


def ref_set(key: int, num_sets: int) -> int:
    """The cache's hash in plain Python integers (an independent check of the int64 wrap-around)."""
    return (((key * G) % (1 << 64)) >> 32 & 0xFFFFFFFF) % num_sets


class RefCache:
    """Set-associative cache, one key at a time, with the same batch rules as DeviceCache."""

    def __init__(self, num_sets: int, ways: int, policy: str) -> None:
        self.sets = [[None] * ways for _ in range(num_sets)]  # slot: [key, last, freq] or None
        self.num_sets, self.ways, self.policy, self.tick = num_sets, ways, policy, 0

    def _slot(self, key):
        for way, slot in enumerate(self.sets[ref_set(key, self.num_sets)]):
            if slot is not None and slot[0] == key:
                return way, slot
        return None, None

    def lookup(self, keys):
        self.tick += 1
        found, touched = [], set()
        for key in keys:
            _, slot = self._slot(key)
            found.append(slot is not None)
            if slot is not None and key not in touched:
                touched.add(key)
                slot[1] = self.tick
                slot[2] += 1
        return found

    def insert(self, keys):
        self.tick += 1
        order = list(dict.fromkeys(keys))  # unique, first occurrence order
        protected, new = set(), {}
        for key in order:
            way, slot = self._slot(key)
            if slot is not None:
                slot[1] = self.tick
                slot[2] += 1
                protected.add((ref_set(key, self.num_sets), way))
            elif not (self.num_sets == 1 and key == MIN):  # the single-set empty marker
                new.setdefault(ref_set(key, self.num_sets), []).append(key)
        for s, keys_in_set in new.items():
            def victim_rank(way, s=s):
                slot = self.sets[s][way]
                if (s, way) in protected:
                    return (2, 0, 0, way)
                if slot is None:
                    return (0, 0, 0, way)
                primary = min(slot[2], (1 << 22) - 1) if self.policy == "lfu" else 0
                return (1, primary, slot[1], way)
            victims = sorted(range(self.ways), key=victim_rank)
            room = self.ways - sum((s, w) in protected for w in range(self.ways))
            for rank, key in enumerate(keys_in_set[:room]):
                self.sets[s][victims[rank]] = [key, self.tick, 1]

    def keys(self):
        return sorted(slot[0] for row in self.sets for slot in row if slot is not None)


def make(capacity=8, ways=4, policy="lru", dim=3, default=None):
    cache = DeviceCache(capacity, ways, policy, device="cpu")
    cache.create_table(TableSpec("t", dim, default))
    return cache


def rows(keys, dim=3):
    """A distinct, checkable vector per key: [key, key + 0.5, ...]."""
    k = torch.as_tensor(keys, dtype=torch.float32)[:, None]
    return k + 0.5 * torch.arange(dim, dtype=torch.float32)


def test_hash_matches_python_integers():
    keys = torch.tensor([0, 1, 2, -1, -(1 << 63), (1 << 63) - 1, 123456789012345])
    assert set_of(keys, 97).tolist() == [ref_set(k, 97) for k in keys.tolist()]


def test_sequential_keys_spread_over_sets():
    counts = torch.bincount(set_of(torch.arange(4096), 256), minlength=256)
    assert counts.max() <= 32 and counts.min() >= 4  # 16 on average; a modulo hash of a bad multiplier would pile up


def test_insert_lookup_update_evict_and_defaults():
    cache = make(capacity=64, ways=8, default=torch.tensor([7.0, 8.0, 9.0]))
    cache.insert("t", torch.tensor([1, 2, 3]), rows([1, 2, 3]))
    vectors, found = cache.lookup("t", torch.tensor([3, 4, 1, 3]))
    assert found.tolist() == [True, False, True, True]
    assert torch.equal(vectors, torch.stack([rows([3])[0], torch.tensor([7.0, 8.0, 9.0]), rows([1])[0], rows([3])[0]]))
    assert cache.update("t", torch.tensor([2, 5]), torch.ones(2, 3)) == 1  # 5 is not cached: not added
    vectors, found = cache.lookup("t", torch.tensor([2, 5]))
    assert found.tolist() == [True, False] and torch.equal(vectors[0], torch.ones(3))
    assert cache.evict("t", torch.tensor([2, 2, 9])) == 1
    assert cache.cached_keys("t").tolist() == [1, 3]
    assert cache.counters()["hits"] == 4 and cache.counters()["misses"] == 2


def test_duplicate_keys_in_an_insert_batch_keep_the_last_vector():
    cache = make(capacity=64, ways=8)
    cache.insert("t", torch.tensor([5, 6, 5, 5]), torch.tensor([[1.0] * 3, [2.0] * 3, [3.0] * 3, [4.0] * 3]))
    assert cache.cached_keys("t").tolist() == [5, 6]
    vectors, _ = cache.lookup("t", torch.tensor([5]))
    assert vectors[0].tolist() == [4.0] * 3


def test_many_new_keys_in_one_set_fill_it_and_the_earliest_win():
    cache = make(capacity=8, ways=4)  # 2 sets
    same_set = [k for k in range(1000) if ref_set(k, 2) == 0][:7]
    cache.insert("t", torch.tensor(same_set), rows(same_set))
    assert cache.cached_keys("t").tolist() == sorted(same_set[:4])
    vectors, found = cache.lookup("t", torch.tensor(same_set[:4]))
    assert found.all() and torch.equal(vectors, rows(same_set[:4]))


def test_refreshed_keys_are_not_evicted_by_their_own_batch():
    cache = make(capacity=4, ways=4, policy="lfu")  # one set
    cache.insert("t", torch.tensor([1, 2, 3, 4]), rows([1, 2, 3, 4]))
    cache.lookup("t", torch.tensor([1, 2, 3]))  # 4 is now the least used
    cache.insert("t", torch.tensor([4, 10]), rows([4, 10]))  # 4 refreshed: 10 must evict another
    assert 4 in cache.cached_keys("t").tolist() and 10 in cache.cached_keys("t").tolist()


def test_memory_bytes_is_the_sum_of_tensor_sizes_and_the_formula():
    for policy in ("lru", "lfu"):
        cache = DeviceCache(0.1, 16, policy, device="cpu")
        cache.create_table(TableSpec("a", 64, rows=10_000))  # 1000 rows -> 63 sets of 16 = 1008 slots
        cache.create_table(TableSpec("b", 8, rows=100))  # 10 rows -> 1 set = 16 slots
        expected = DeviceCache.bytes_per_table(63, 16, 64, policy) + DeviceCache.bytes_per_table(1, 16, 8, policy)
        assert cache.memory_bytes == expected
        per_slot = 4 * 64 + 16 + (8 if policy == "lfu" else 0)
        assert DeviceCache.bytes_per_table(63, 16, 64, policy) == 1008 * per_slot + 8 * 63 + 4 * 64


@pytest.mark.parametrize("capacity,ways", [(4, 4), (64, 4)])
def test_empty_slot_markers_are_never_found(capacity, ways):
    cache = make(capacity=capacity, ways=ways)
    probe = torch.cat([torch.arange(-300, 300), torch.tensor([MIN, MIN + 1, -MIN - 1])])
    assert not cache.lookup("t", probe)[1].any()
    cache.insert("t", torch.tensor([0, MIN, 1]), rows([0, MIN, 1]))
    found = cache.lookup("t", probe)[1]
    assert set(probe[found].tolist()) == ({0, 1} if capacity == 4 else {0, MIN, 1})


def test_fractional_capacity_needs_the_table_rows():
    with pytest.raises(ValueError, match="rows"):
        DeviceCache(0.2, device="cpu").create_table(TableSpec("t", 4))


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_eviction_order_in_a_set(policy):
    cache = make(capacity=4, ways=4, policy=policy)  # one set
    cache.insert("t", torch.tensor([1, 2, 3, 4]), rows([1, 2, 3, 4]))
    cache.lookup("t", torch.tensor([1]))
    cache.lookup("t", torch.tensor([1]))
    cache.lookup("t", torch.tensor([2]))
    cache.lookup("t", torch.tensor([3]))
    cache.insert("t", torch.tensor([9]), rows([9]))
    # lru evicts 4 (unused since insertion); lfu too (one use). Then: lru evicts 1? no: least recent is 1.
    assert 4 not in cache.cached_keys("t").tolist()
    cache.insert("t", torch.tensor([10]), rows([10]))
    gone = {1, 2, 3, 9} - set(cache.cached_keys("t").tolist())
    assert gone == ({1} if policy == "lru" else {9})  # lfu: 9 has 1 use, 2 and 3 have 2, 1 has 3


ops = st.lists(
    st.tuples(st.sampled_from(["lookup", "insert"]),
              st.lists(st.one_of(st.integers(-20, 40), st.just(MIN)), min_size=1, max_size=12)),
    min_size=1, max_size=30)


@settings(max_examples=150, deadline=None)
@given(ops=ops, ways=st.sampled_from([1, 2, 4, 16]), num_sets=st.sampled_from([1, 2, 3]), policy=st.sampled_from(["lru", "lfu"]))
def test_matches_the_reference_model(ops, ways, num_sets, policy):
    cache = make(capacity=ways * num_sets, ways=ways, policy=policy)
    ref = RefCache(num_sets, ways, policy)
    for op, keys in ops:
        if op == "lookup":
            vectors, found = cache.lookup("t", torch.tensor(keys))
            assert found.tolist() == ref.lookup(keys)
            hit = torch.tensor(keys)[found]
            assert torch.equal(vectors[found], rows(hit.tolist()))
            assert torch.equal(vectors[~found], torch.zeros(int((~found).sum()), 3))
        else:
            cache.insert("t", torch.tensor(keys), rows(keys))
            ref.insert(keys)
        assert cache.cached_keys("t").tolist() == ref.keys()
