"""The multi-table path: DeviceCache / VolatileTier / ParameterServer `lookup_many` and `insert_many` over several
tables answer exactly what one call per table answers (rows, found, defaults, evictions, counters)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from embeddings.device_cache import DeviceCache
from embeddings.hierarchy import ParameterServer
from embeddings.persistent import PersistentTier
from embeddings.tier import TableSpec
from embeddings.volatile import VolatileTier

MIN = -(1 << 63)
# name, dim, cached rows (sets of 4 ways: "one" has a single set, where -2^63 marks empty slots), default
TABLES = (("a", 3, 8, 0.0), ("b", 3, 12, -1.0), ("one", 3, 4, 5.0), ("wide", 5, 8, 2.0))


def rows(keys, dim, scale=1.0):
    """A distinct, checkable vector per key."""
    return torch.as_tensor(keys, dtype=torch.float32)[:, None] * scale + torch.arange(dim, dtype=torch.float32) / 8


def make_cache(policy: str) -> DeviceCache:
    cache = DeviceCache(8, 4, policy, device="cpu")
    for name, dim, cap, default in TABLES:
        cache.create_table(TableSpec(name, dim, torch.full((dim,), default), rows=cap))
    return cache


def test_tables_of_one_dim_share_a_pool_and_keep_their_capacity():
    cache = DeviceCache(0.5, 4, "lru", device="cpu")
    for name, n in (("a", 64), ("b", 8), ("c", 3)):
        cache.create_table(TableSpec(name, 3, rows=n))
    assert [cache.slots(t) for t in "abc"] == [32, 4, 4]  # 32 rows / 4 rows / 2 rows -> whole sets of 4
    cache.insert_many({t: (torch.arange(100), torch.zeros(100, 3)) for t in "abc"})
    assert [cache.cached_keys(t).numel() for t in "abc"] == [cache.slots(t) for t in "abc"]
    assert cache.memory_bytes == sum(DeviceCache.bytes_per_table(s, 4, 3, "lru") for s in (8, 1, 1))


keys_st = st.lists(st.one_of(st.integers(-10, 30), st.just(MIN)), max_size=10)
op_st = st.tuples(st.sampled_from(["lookup", "insert", "update", "evict"]),
                  st.fixed_dictionaries({}, optional={name: keys_st for name, *_ in TABLES}))


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(op_st, min_size=1, max_size=25), policy=st.sampled_from(["lru", "lfu"]))
def test_device_cache_many_equals_one_call_per_table(ops, policy):
    many, single = make_cache(policy), make_cache(policy)
    dims = {name: dim for name, dim, *_ in TABLES}
    for op, request in ops:
        batch = {t: torch.tensor(k, dtype=torch.int64) for t, k in request.items()}
        if op == "lookup":
            got = many.lookup_many(batch)
            assert list(got) == list(batch)
            for t, keys in batch.items():
                vectors, found = single.lookup(t, keys)
                assert torch.equal(got[t][1], found) and torch.equal(got[t][0], vectors)
        elif op == "insert":
            many.insert_many({t: (k, rows(k.tolist(), dims[t], 2.0)) for t, k in batch.items()})
            for t, k in batch.items():
                single.insert(t, k, rows(k.tolist(), dims[t], 2.0))
        else:  # single-table calls on both (the grouped cache must keep its regions apart)
            for t, k in batch.items():
                if op == "update":
                    assert many.update(t, k, rows(k.tolist(), dims[t], 3.0)) == single.update(t, k, rows(k.tolist(), dims[t], 3.0))
                else:
                    assert many.evict(t, k) == single.evict(t, k)
        for name, *_ in TABLES:
            assert torch.equal(many.cached_keys(name), single.cached_keys(name)), name
    assert many.counters() == single.counters()


def test_device_lookup_many_answers_each_tables_default():
    cache = make_cache("lru")
    cache.insert_many({"a": (torch.tensor([1]), rows([1], 3)), "wide": (torch.tensor([1]), rows([1], 5))})
    got = cache.lookup_many({"a": torch.tensor([1, 2]), "b": torch.tensor([1]), "one": torch.tensor([7]),
                             "wide": torch.tensor([2, 1])})
    assert torch.equal(got["a"][0], torch.stack([rows([1], 3)[0], torch.zeros(3)]))
    assert torch.equal(got["b"][0], torch.full((1, 3), -1.0)) and torch.equal(got["one"][0], torch.full((1, 3), 5.0))
    assert torch.equal(got["wide"][0], torch.stack([torch.full((5,), 2.0), rows([1], 5)[0]]))
    assert [got[t][1].tolist() for t in ("a", "b", "one", "wide")] == [[True, False], [False], [False], [False, True]]
    assert cache.counters()["hits"] == 2 and cache.counters()["misses"] == 4


@pytest.mark.parametrize("tables", [TABLES, TABLES[:3]], ids=["mixed dims", "one dim"])
def test_volatile_lookup_many_equals_lookup_per_table(tables):
    def make():
        tier = VolatileTier(4, 64)
        for name, dim, _, default in tables:
            tier.create_table(TableSpec(name, dim, torch.full((dim,), default)))
            tier.insert(name, torch.arange(0, 40, 2), rows(range(0, 40, 2), dim, len(name)))
        return tier

    many, single = make(), make()
    rng = np.random.default_rng(1)
    for _ in range(20):
        batch = {name: torch.from_numpy(rng.integers(-5, 45, int(rng.integers(0, 30)))) for name, *_ in tables[::-1]}
        got = many.lookup_many(batch)
        assert list(got) == list(batch)
        for t, k in batch.items():
            vectors, found = single.lookup(t, k)
            assert torch.equal(got[t][0], vectors) and torch.equal(got[t][1], found)
    assert many.counters() == single.counters()
    many.insert_many({t: (torch.arange(300), torch.zeros(300, d)) for t, d, *_ in tables})
    assert all(max(many.fill(t)) <= 64 for t, *_ in tables)  # each table's partitions keep their capacity


def _server(path, policy="lru", volatile=True, tables=TABLES):
    server = ParameterServer(PersistentTier(path, sync=False), VolatileTier(2, 8, "evict_oldest", 0.75) if volatile else None,
                             DeviceCache(8, 4, policy, device="cpu"))
    for name, dim, cap, default in tables:
        server.create_table(name, dim, torch.full((dim,), default), rows=cap)
        server.update(name, torch.arange(0, 50, 3), rows(range(0, 50, 3), dim, len(name)))
    return server


@pytest.mark.parametrize("policy,volatile,tables", [("lru", True, TABLES), ("lfu", True, TABLES), ("lru", False, TABLES),
                                                    ("lru", True, TABLES[:3])], ids=["lru", "lfu", "no volatile", "one dim"])
def test_parameter_server_many_equals_one_lookup_per_table(tmp_path, policy, volatile, tables):
    """Misses, defaults (keys no tier holds), updates between lookups, evictions in the device and volatile tiers."""
    many, single = _server(tmp_path / "many", policy, volatile, tables), _server(tmp_path / "single", policy, volatile, tables)
    rng = np.random.default_rng(2)
    dims = {name: dim for name, dim, *_ in tables}
    try:
        for step in range(40):
            batch = {name: torch.from_numpy(rng.integers(-3, 60, int(rng.integers(0, 20)))) for name, *_ in tables}
            got = many.lookup_many(batch)
            for t, keys in batch.items():
                vectors, found = single.lookup(t, keys)
                assert torch.equal(got[t][1], found), (step, t)
                assert torch.equal(got[t][0], vectors), (step, t)
            if step % 5 == 4:  # an update: every tier must answer the new rows afterwards
                t = tables[step % len(tables)][0]
                keys = torch.from_numpy(rng.integers(0, 60, 6))
                for server in (many, single):
                    server.update(t, keys, rows(keys.tolist(), dims[t], -7.0))
        after = many.lookup_many({t: torch.arange(-3, 60) for t, *_ in tables})
        for t, *_ in tables:
            assert torch.equal(after[t][0], single.lookup(t, torch.arange(-3, 60))[0])
        assert many.stats() == single.stats()
        assert many.stats()["server"]["defaults_missing"] > 0 and many.stats()["device"]["evictions"] > 0
    finally:
        many.close()
        single.close()


@pytest.mark.redis
def test_redis_lookup_many_and_insert_many_equal_one_call_per_table(redis_node):
    """One pipeline for every table answers what one pipeline per table answers (two key prefixes on one node)."""
    from embeddings.redis_tier import RedisTier

    def make(prefix):
        tier = RedisTier(redis_node.url, partitions=3, capacity_per_partition=6, overflow_policy="evict_oldest",
                         target_fill=0.5, prefix=prefix, timeout_s=2.0)
        for name, dim, _, default in TABLES:
            tier.create_table(TableSpec(name, dim, torch.full((dim,), default)))
        return tier

    many, single = make("many:"), make("single:")
    dims = {name: dim for name, dim, *_ in TABLES}
    rng = np.random.default_rng(3)
    try:
        for step in range(12):
            batch = {t: torch.from_numpy(rng.integers(0, 25, int(rng.integers(0, 12)))) for t, *_ in TABLES}
            if step % 2:
                got = many.lookup_many(batch)
                for t, k in batch.items():
                    vectors, found = single.lookup(t, k)
                    assert torch.equal(got[t][0], vectors) and torch.equal(got[t][1], found), (step, t)
            else:  # duplicates: the last vector wins; partitions over capacity are trimmed in both
                many.insert_many({t: (k, rows(k.tolist(), dims[t], step + 1)) for t, k in batch.items()})
                for t, k in batch.items():
                    single.insert(t, k, rows(k.tolist(), dims[t], step + 1))
        for t, *_ in TABLES:
            assert many.fill(t) == single.fill(t) and max(many.fill(t)) <= 6
        assert many.counters() == single.counters() and many.counters()["hits"] > 0
    finally:
        many.close()
        single.close()


def test_moved_together_keeps_shapes_values_and_order():
    from embeddings.tier import moved_together  # noqa: PLC0415

    tensors = [torch.arange(6).view(2, 3), torch.rand(4, 2), torch.tensor([True, False]), torch.arange(3), torch.rand(1, 5)]
    out = moved_together(tensors, torch.device("cpu"))
    assert all(a is b for a, b in zip(out, tensors))  # already there: nothing copied
    meta = moved_together(tensors, torch.device("meta"))  # another device: one copy per dtype, split back
    assert [(t.shape, t.dtype, t.device.type) for t in meta] == [(t.shape, t.dtype, "meta") for t in tensors]
    back = moved_together(out + [tensors[0]], torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(back, out + [tensors[0]]))
