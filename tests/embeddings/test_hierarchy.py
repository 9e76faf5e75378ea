"""ParameterServer: the lookup path, upward inserts, defaults, updates across tiers, high-hit-rate mode, metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest

from configs.settings import EmbeddingSettings
from embeddings.device_cache import DeviceCache
from embeddings.factory import build_parameter_server
from embeddings.hierarchy import ParameterServer, ServerLookup
from embeddings.metrics import EmbeddingCollector
from embeddings.persistent import PersistentTier
from embeddings.volatile import VolatileTier

DIM = 4
DEFAULT = torch.full((DIM,), -1.0)


def rows(keys, scale=1.0):
    return torch.as_tensor(keys, dtype=torch.float32)[:, None] * scale + torch.arange(DIM, dtype=torch.float32) / 10


@pytest.fixture
def ps(tmp_path):
    server = ParameterServer(PersistentTier(tmp_path / "db", sync=False), VolatileTier(4, 64, "evict_oldest", 0.75),
                             DeviceCache(32, 4, "lru", device="cpu"))
    server.create_table("t", DIM, DEFAULT, rows=1000)
    server.update("t", torch.arange(100), rows(range(100)))
    yield server
    server.close()


def test_lookup_goes_down_the_tiers_and_inserts_upward(ps):
    vectors, found = ps.lookup("t", torch.tensor([3, 5, 3, 500]))
    assert found.tolist() == [True, True, True, False]
    assert torch.equal(vectors, torch.stack([rows([3])[0], rows([5])[0], rows([3])[0], DEFAULT]))
    stats = ps.stats()
    assert stats["device"]["misses"] == 3 and stats["volatile"]["misses"] == 3 and stats["persistent"]["hits"] == 2
    assert stats["server"] == dict(stats["server"], keys=4, unique_keys=3, defaults_missing=1)
    assert ps.volatile.keys("t").tolist() == [3, 5] and ps.device_cache.cached_keys("t").tolist() == [3, 5]
    vectors, found = ps.lookup("t", torch.tensor([5, 3]))
    assert found.all() and torch.equal(vectors, rows([5, 3]))
    assert ps.stats()["device"]["hits"] == 2 and ps.stats()["persistent"]["hits"] == 2  # answered by the cache


def test_volatile_hits_fill_the_device_cache(ps):
    ps.lookup("t", torch.tensor([7]))
    ps.device_cache.clear("t")
    vectors, found = ps.lookup("t", torch.tensor([7]))
    assert found.all() and torch.equal(vectors, rows([7]))
    assert ps.stats()["volatile"]["hits"] == 1 and ps.device_cache.cached_keys("t").tolist() == [7]


def _tier_value(tier, key):
    vectors, found = tier.lookup("t", torch.tensor([key]))
    return vectors[0] if bool(found[0]) else None


@pytest.mark.parametrize("refresh", [True, False])
def test_updates_are_seen_at_once_in_every_tier(tmp_path, refresh):
    server = ParameterServer(PersistentTier(tmp_path / "db"), VolatileTier(4, 64), DeviceCache(32, 4, device="cpu"),
                             refresh_on_update=refresh)
    server.create_table("t", DIM, DEFAULT)
    server.update("t", torch.arange(10), rows(range(10)))
    server.lookup("t", torch.arange(10))  # every tier holds 0..9
    server.update("t", torch.tensor([4, 4, 20]), torch.stack([rows([4], 2)[0], rows([4], 3)[0], rows([20])[0]]))
    vectors, found = server.lookup("t", torch.tensor([4, 20]))
    assert found.all() and torch.equal(vectors, torch.stack([rows([4], 3)[0], rows([20])[0]]))
    assert torch.equal(_tier_value(server.persistent, 4), rows([4], 3)[0])
    assert torch.equal(_tier_value(server.volatile, 4), rows([4], 3)[0])
    cached = _tier_value(server.device_cache, 4)
    assert torch.equal(cached, rows([4], 3)[0])  # refreshed, or evicted then fetched again by the lookup
    server.close()


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_random_updates_and_lookups_match_a_dict(tmp_path, policy):
    """Small tiers (many evictions in both caches): every lookup answers the latest update or the default."""
    server = ParameterServer(PersistentTier(tmp_path / "db", sync=False), VolatileTier(2, 12, "evict_random", 0.5),
                             DeviceCache(8, 2, policy, device="cpu"))
    server.create_table("t", DIM, DEFAULT)
    model: dict[int, torch.Tensor] = {}
    rng = np.random.default_rng(7)
    for step in range(300):
        keys = rng.integers(0, 60, size=int(rng.integers(1, 10)))
        if rng.random() < 0.3:
            vectors = torch.from_numpy(rng.standard_normal((keys.size, DIM)).astype(np.float32))
            server.update("t", torch.from_numpy(keys), vectors)
            model.update(zip(keys.tolist(), vectors))
        else:
            vectors, found = server.lookup("t", torch.from_numpy(keys))
            for key, vector, hit in zip(keys.tolist(), vectors, found.tolist()):
                assert hit == (key in model), step
                assert torch.equal(vector, model.get(key, DEFAULT)), step
    server.close()


def test_delete_removes_rows_from_every_tier(ps):
    ps.lookup("t", torch.tensor([1, 2]))
    ps.delete("t", torch.tensor([1]))
    vectors, found = ps.lookup("t", torch.tensor([1, 2]))
    assert found.tolist() == [False, True] and torch.equal(vectors[0], DEFAULT)


def test_high_hit_rate_mode_serves_defaults_and_fetches_in_the_background(tmp_path):
    server = ParameterServer(PersistentTier(tmp_path / "db", sync=False), VolatileTier(4, 1000),
                             DeviceCache(256, 8, device="cpu"), async_defaults=True, hit_rate_threshold=0.9)
    server.create_table("t", DIM, DEFAULT)
    server.update("t", torch.arange(200), rows(range(200)))
    vectors, found = server.lookup("t", torch.arange(20))  # cold cache: hit rate 0, fetched now
    assert found.all() and torch.equal(vectors, rows(range(20)))
    batch = torch.cat([torch.arange(19), torch.tensor([150])])  # 19 of 20 hits: 0.95 > 0.9
    vectors, found = server.lookup("t", batch)
    assert found.tolist() == [True] * 19 + [False] and torch.equal(vectors[-1], DEFAULT)
    assert server.stats()["server"]["defaults_async"] == 1
    device_before = server.stats()["device"]
    server.drain()
    assert server.stats()["server"]["background_fetched"] == 1
    assert server.stats()["device"] == dict(device_before, evictions=server.stats()["device"]["evictions"])
    vectors, found = server.lookup("t", batch)
    assert found.all() and torch.equal(vectors, rows(batch.tolist()))
    # below the threshold the misses are fetched at once
    _, found = server.lookup("t", torch.arange(100, 120))
    assert found.all() and server.stats()["server"]["defaults_async"] == 1
    server.close()


def test_async_defaults_is_off_by_default(ps):
    ps.lookup("t", torch.arange(10))
    _, found = ps.lookup("t", torch.cat([torch.arange(10), torch.tensor([50])]))
    assert found.all() and ps.stats()["server"]["defaults_async"] == 0


def test_tables_come_back_after_a_restart(tmp_path):
    first = ParameterServer(PersistentTier(tmp_path / "db"), VolatileTier(), DeviceCache(16, 4, device="cpu"))
    first.create_table("t", DIM, DEFAULT)
    first.update("t", torch.tensor([1]), rows([1]))
    first.close()
    second = ParameterServer(PersistentTier(tmp_path / "db"), VolatileTier(), DeviceCache(16, 4, device="cpu"))
    vectors, found = second.lookup("t", torch.tensor([1, 2]))
    assert found.tolist() == [True, False] and torch.equal(vectors, torch.stack([rows([1])[0], DEFAULT]))
    second.close()


def test_metrics_export_counters_per_tier(ps):
    ps.lookup("t", torch.tensor([1, 2, 999]))
    ps.lookup("t", torch.tensor([1]))
    registry = CollectorRegistry()
    registry.register(EmbeddingCollector(ps))
    text = generate_latest(registry).decode()
    assert 'turboserve_embedding_cache_hits_total{tier="device"} 1.0' in text
    assert 'turboserve_embedding_cache_misses_total{tier="device"} 3.0' in text
    assert 'turboserve_embedding_cache_hits_total{tier="persistent"} 2.0' in text
    assert 'turboserve_embedding_defaults_total{reason="missing"} 1.0' in text
    assert f"turboserve_embedding_device_cache_bytes {float(ps.device_cache.memory_bytes)}" in text


def test_factory_builds_from_settings(tmp_path):
    settings = EmbeddingSettings(enabled=True, path=str(tmp_path / "db"), cache_fraction=0.5, cache_ways=4,
                                 cache_policy="lfu", partitions=2, partition_capacity=8, cache_device="cpu")
    server = build_parameter_server(settings)
    server.create_table("t", DIM, rows=64)
    assert isinstance(server.volatile, VolatileTier) and server.device_cache.policy == "lfu"
    assert server.device_cache.memory_bytes == DeviceCache.bytes_per_table(8, 4, DIM, "lfu")  # 32 rows in sets of 4
    server.close()


def _two_table_server(path):
    server = ParameterServer(PersistentTier(path, sync=False), VolatileTier(4, 16, "evict_oldest", 0.75),
                             DeviceCache(8, 4, "lru", device="cpu"))
    for name, scale in (("a", 1.0), ("b", -2.0)):
        server.create_table(name, DIM, DEFAULT, rows=1000)
        server.update(name, torch.arange(60), rows(range(60), scale))
    return server


def test_lookup_many_equals_lookup_per_table(tmp_path):
    many, single = _two_table_server(tmp_path / "many"), _two_table_server(tmp_path / "single")
    rng = np.random.default_rng(0)
    try:
        for _ in range(30):  # small caches: evictions in every tier, and misses answered by the default
            requests = {t: torch.from_numpy(rng.integers(0, 80, int(rng.integers(0, 25)))) for t in ("a", "b")}
            got = many.lookup_many(requests)
            assert list(got) == ["a", "b"]
            for table, keys in requests.items():
                vectors, found = single.lookup(table, keys)
                assert torch.equal(got[table][0], vectors) and torch.equal(got[table][1], found)
        assert many.stats() == single.stats()
        assert many.device_cache.cached_keys("a").tolist() == single.device_cache.cached_keys("a").tolist()
        assert many.volatile.keys("b").tolist() == single.volatile.keys("b").tolist()
    finally:
        many.close()
        single.close()


def test_lookup_many_checks_every_table_first(ps):
    with pytest.raises(KeyError):
        ps.lookup_many({"t": torch.tensor([1, 2]), "nope": torch.tensor([1])})
    assert ps.stats()["server"]["keys"] == 0 and ps.stats()["device"]["misses"] == 0


def test_lookup_distinct_and_the_dlrms_lookup(ps):
    got = ps.lookup_distinct({"t": torch.tensor([9, 3, 9, 700])})
    uniq, vectors, found = got["t"]
    assert uniq.tolist() == [3, 9, 700] and found.tolist() == [True, True, False]
    assert torch.equal(vectors, torch.stack([rows([3])[0], rows([9])[0], DEFAULT]))
    assert ps.stats()["server"] == dict(ps.stats()["server"], keys=4, unique_keys=3, defaults_missing=1)
    rows_of = ServerLookup(ps)
    got = rows_of.many({"t": torch.tensor([700, 3, 5])}, asked={"t": 7})  # keys the DLRM de-duplicated, in its order
    assert torch.equal(got["t"], torch.stack([DEFAULT, rows([3])[0], rows([5])[0]]))
    assert ps.stats()["server"] == dict(ps.stats()["server"], keys=11, unique_keys=6, defaults_missing=2)
    assert torch.equal(rows_of("t", torch.tensor([5, 5])), rows([5, 5]))  # one table: a lookup


def test_preload_fills_the_volatile_tier_so_lookups_skip_rocksdb(ps):
    assert ps.preload(0.05) == {"t": 50}  # 5% of the table's 1,000 rows, in key order
    assert ps.volatile.keys("t").tolist() == list(range(50))
    assert ps.preload(1.0) == {"t": 100}  # every stored row (the table's recorded 1,000 are not all there)
    assert ps.stats()["server"]["volatile_preloaded"] == 150
    vectors, found = ps.lookup("t", torch.tensor([3, 40, 99]))
    assert found.all() and torch.equal(vectors, rows([3, 40, 99]))
    assert ps.stats()["persistent"]["hits"] + ps.stats()["persistent"]["misses"] == 0  # not asked
    with pytest.raises(ValueError, match="fraction"):
        ps.preload(1.5)


def test_preload_stops_at_the_volatile_tiers_target_fill(tmp_path):
    ps = ParameterServer(PersistentTier(tmp_path / "db", sync=False), VolatileTier(2, 20, "evict_oldest", 0.75), None)
    ps.create_table("t", DIM, rows=100)
    ps.update("t", torch.arange(100), rows(range(100)))
    assert ps.preload(1.0) == {"t": 30}  # 2 partitions x 20 rows x 0.75: a fuller load would evict its own rows
    assert ps.volatile.keys("t").tolist() == list(range(30)) and ps.volatile.counters()["evictions"] == 0


def test_preload_reads_in_chunks_and_sees_updates_made_between_them(tmp_path):
    ps = ParameterServer(PersistentTier(tmp_path / "db", sync=False), VolatileTier(2, 1000), None)
    ps.create_table("u", DIM)  # no recorded size: fraction 1 loads every stored row
    keys = torch.tensor([-(2**63), -5, 0, 9, 2**62, 2**63 - 1])
    ps.update("u", keys, rows(keys.double().clamp(-1e3, 1e3)))
    seen = []

    def progress(n):
        seen.append(n)
        if len(seen) == 1:  # an update between two chunks: a row of the first and one of the second
            ps.update("u", torch.tensor([-5, 2**62]), torch.zeros(2, DIM))

    assert ps.preload(1.0, chunk=3, progress=progress) == {"u": 6} and seen == [3, 3]
    assert ps.volatile.keys("u").tolist() == sorted(keys.tolist())
    held, found = ps.volatile.lookup("u", torch.tensor([-5, 2**62, 9]))
    assert found.all() and held[:2].abs().sum() == 0 and torch.equal(held[2], rows([9])[0])


def test_a_replica_behind_a_shared_tier_does_not_preload(ps):
    ps.shared_current = lambda: False
    assert ps.preload(1.0) == {} and ps.volatile.keys("t").size == 0
