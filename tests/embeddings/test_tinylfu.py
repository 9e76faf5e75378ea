"""TinyLFU: the frequency sketch, and the device cache's tinylfu policy (capacity, rows, victims, admission)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from embeddings.cache_pool import set_of
from embeddings.device_cache import DeviceCache
from embeddings.sketch import FrequencySketch
from embeddings.tier import TableSpec


def rows(keys, dim=2):
    return torch.as_tensor(keys, dtype=torch.float32)[:, None] + torch.arange(dim, dtype=torch.float32) / 4


@settings(max_examples=60, deadline=None)
@given(keys=st.lists(st.integers(-(1 << 40), 1 << 40), min_size=1, max_size=60), conservative=st.booleans())
def test_sketch_never_undercounts_before_halving(keys, conservative):
    sketch = FrequencySketch(16, sample_factor=1000, conservative=conservative)
    for k in keys:  # one key a call: with conservative update repeats within a call count once
        sketch.add(torch.tensor([k]))
    uniq, counts = torch.unique(torch.tensor(keys), return_counts=True)
    assert (sketch.estimate(uniq) >= counts).all()


def test_sketch_counts_exactly_without_collisions_and_halves():
    sketch = FrequencySketch(64, sample_factor=1)  # 64 counters a row; halve after 64 adds
    keys = torch.arange(10)
    for _ in range(3):
        sketch.add(keys)
    assert sketch.estimate(keys).tolist() == [3] * 10  # exact: no key has all 4 counters shared
    for _ in range(4):
        sketch.add(keys)  # the 7th round reaches 70 adds: every counter halved, 7 -> 3
    assert sketch.estimate(keys).tolist() == [3] * 10
    assert sketch.added == 35 and sketch.nbytes == 4 * 64 * 4


def make(capacity=8, ways=4):
    cache = DeviceCache(capacity, ways, "tinylfu", device="cpu")
    cache.create_table(TableSpec("t", 2))
    return cache


def test_admission_keeps_a_one_off_key_out_of_a_set_of_frequent_ones():
    cache = make(capacity=4, ways=4)  # one set
    frequent = torch.tensor([1, 2, 3, 4])
    for _ in range(5):
        _, found = cache.lookup("t", frequent)
        cache.insert("t", frequent[~found], rows(frequent[~found].tolist()))
    assert cache.cached_keys("t").tolist() == [1, 2, 3, 4]
    _, found = cache.lookup("t", torch.tensor([99]))  # seen once
    assert not found.any()
    cache.insert("t", torch.tensor([99]), rows([99]))
    assert cache.cached_keys("t").tolist() == [1, 2, 3, 4]  # refused: 1 use against 5
    for _ in range(6):  # once it is used more often than the weakest resident, it gets in
        cache.lookup("t", torch.tensor([99]))
    cache.insert("t", torch.tensor([99]), rows([99]))
    assert 99 in cache.cached_keys("t").tolist() and cache.cached_keys("t").numel() == 4
    vectors, found = cache.lookup("t", torch.tensor([99]))
    assert found.all() and torch.equal(vectors, rows([99]))


def test_victim_is_the_least_recent_resident_and_admission_compares_with_it():
    cache = make(capacity=4, ways=4)
    cache.insert("t", torch.tensor([1, 2, 3, 4]), rows([1, 2, 3, 4]))  # empty slots: admitted without counts
    for k, uses in ((2, 1), (1, 5), (3, 4), (4, 3)):  # 2 is the least recently used, with 1 use
        for _ in range(uses):
            cache.lookup("t", torch.tensor([k]))
    cache.lookup("t", torch.tensor([50]))
    cache.insert("t", torch.tensor([50]), rows([50]))  # 1 use against the victim's 1: refused
    assert cache.cached_keys("t").tolist() == [1, 2, 3, 4]
    cache.lookup("t", torch.tensor([50]))
    cache.insert("t", torch.tensor([50]), rows([50]))  # 2 uses against 1: takes key 2's slot
    assert cache.cached_keys("t").tolist() == [1, 3, 4, 50]


def test_new_keys_of_a_set_compete_by_frequency():
    cache = make(capacity=2, ways=2)  # one set, two slots
    for k, uses in ((7, 1), (8, 4), (9, 2)):
        for _ in range(uses):
            cache.lookup("t", torch.tensor([k]))
    cache.insert("t", torch.tensor([7, 8, 9]), rows([7, 8, 9]))  # batch order 7, 8, 9; frequency order 8, 9, 7
    assert cache.cached_keys("t").tolist() == [8, 9]


ops = st.lists(st.tuples(st.sampled_from(["lookup", "insert"]), st.lists(st.integers(-20, 40), min_size=1, max_size=12)),
               min_size=1, max_size=30)


@settings(max_examples=100, deadline=None)
@given(ops=ops, ways=st.sampled_from([1, 2, 4]), num_sets=st.sampled_from([1, 2, 3]))
def test_capacity_and_rows_hold_under_any_sequence(ops, ways, num_sets):
    cache = make(capacity=ways * num_sets, ways=ways)
    inserted: dict[int, torch.Tensor] = {}
    for op, keys in ops:
        k = torch.tensor(keys)
        if op == "lookup":
            vectors, found = cache.lookup("t", k)
            assert torch.equal(vectors[found], rows(k[found].tolist()))  # a hit is the row inserted last for the key
            assert torch.equal(vectors[~found], torch.zeros(int((~found).sum()), 2))
        else:
            before = set(cache.cached_keys("t").tolist())
            cache.insert("t", k, rows(keys))
            inserted.update({key: rows([key])[0] for key in keys})
            cached = cache.cached_keys("t")
            assert set(cached.tolist()) >= before & set(keys)  # a cached key of the batch stays (refreshed)
            # at most `ways` keys a set, and only keys ever inserted
            assert torch.bincount(set_of(cached, num_sets), minlength=num_sets).max() <= ways
            assert set(cached.tolist()) <= set(inserted)
            # a set with free slots takes every new key of the batch that maps to it
            free = {s: ways - int((set_of(torch.tensor(sorted(before)), num_sets) == s).sum()) if before else ways
                    for s in range(num_sets)}
            for s in range(num_sets):
                new = [key for key in dict.fromkeys(keys) if key not in before and int(set_of(torch.tensor([key]), num_sets)) == s]
                if len(new) <= free[s]:
                    assert set(new) <= set(cached.tolist())
