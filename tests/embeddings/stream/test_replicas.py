"""Replicas applying one update stream, each with its own RocksDB copy and device cache: every update on
every replica in stream order, and a shared Redis tier that never keeps a row older than what the replicas
applied (settling; a replica behind the stream does not write it)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from embeddings.device_cache import DeviceCache
from embeddings.hierarchy import ParameterServer
from embeddings.persistent import PersistentTier
from embeddings.redis_tier import RedisTier
from embeddings.stream_format import publish_update
from tests.embeddings.stream.support import DIM, STREAM, consumer, replica_server, rows, vector, wait_until

pytestmark = pytest.mark.redis


@pytest.fixture
def ps2(tmp_path):
    """A second replica: its own RocksDB copy and caches, holding the same rows as `ps`."""
    server = replica_server(tmp_path / "db2")
    yield server
    server.close()


def test_replicas_in_their_own_groups_each_apply_every_update(ps, ps2, redis_node, client):
    for replica in (ps, ps2):
        np.testing.assert_array_equal(vector(replica, 4), rows([4])[0])  # cached on both devices
    a = consumer(ps, redis_node, consumer="replica-a", group="turboserve-{consumer}")
    b = consumer(ps2, redis_node, consumer="replica-b", group="turboserve-{consumer}")
    assert (a.group, b.group) == ("turboserve-replica-a", "turboserve-replica-b")
    a.start()
    b.start()
    try:
        new = rows([4], scale=-3.0)
        publish_update(client, STREAM, "t", [4], new)  # a trainer's update
        for replica in (ps, ps2):
            wait_until(lambda replica=replica: np.array_equal(vector(replica, 4), new[0]), timeout=1.0, what="both replicas")
        # what replica a took over HTTP (written there first), published for b
        ps.update("t", torch.tensor([5]), torch.from_numpy(rows([5], scale=7.0)))
        entry = a.publish("t", [5], rows([5], scale=7.0))
        wait_until(lambda: np.array_equal(vector(ps2, 5), rows([5], scale=7.0)[0]), timeout=1.0, what="published update on b")
        assert {g["name"].decode() for g in client.xinfo_groups(STREAM)} == {"turboserve-replica-a", "turboserve-replica-b"}
        wait_until(lambda: all(g["pending"] == 0 and g["last-delivered-id"] == entry for g in client.xinfo_groups(STREAM)),
                   what="both groups acknowledged")
        assert all(g["last-delivered-id"] == entry for g in client.xinfo_groups(STREAM))
        # each replica applied both entries (a re-applies its own: stream order decides on every replica)
        wait_until(lambda: a.counters()["applied"] == 2 and b.counters()["applied"] == 2, what="2 applies each")
        assert a.counters()["published"] == 1 and b.counters()["published"] == 0
    finally:
        a.stop()
        b.stop()


def test_every_replica_ends_on_the_last_value_in_stream_order(ps, ps2, redis_node, client):
    """Two replicas take conflicting HTTP updates of one key at once: each writes its own first, then both
    apply the stream in order, so both end on the value published last."""
    a = consumer(ps, redis_node, consumer="replica-a", group="turboserve-{consumer}")
    b = consumer(ps2, redis_node, consumer="replica-b", group="turboserve-{consumer}")
    a.start()
    b.start()
    try:
        for round_ in range(20):
            va, vb = rows([6], scale=100.0 + round_), rows([6], scale=-100.0 - round_)
            ps.update("t", torch.tensor([6]), torch.from_numpy(va))
            ps2.update("t", torch.tensor([6]), torch.from_numpy(vb))
            first, second = (a, va), (b, vb)
            if round_ % 2:
                first, second = second, first
            first[0].publish("t", [6], first[1])
            last = second[0].publish("t", [6], second[1])
            want = second[1][0]

            def settled(last=last):
                return all(g["last-delivered-id"] == last and g["pending"] == 0 for g in client.xinfo_groups(STREAM))

            wait_until(settled, timeout=2.0, what="both groups past the last entry")
            for replica in (ps, ps2):
                np.testing.assert_array_equal(vector(replica, 6), want)
                stored, _ = replica.persistent.lookup("t", torch.tensor([6]))
                np.testing.assert_array_equal(stored[0].numpy(), want)
    finally:
        a.stop()
        b.stop()


def shared_replica(tmp_path, redis_node, name):
    """A replica with its own RocksDB (rows 0..9 as imported) and device cache, over the shared Redis."""
    server = ParameterServer(PersistentTier(tmp_path / name), RedisTier(redis_node.url, partitions=4),
                             DeviceCache(32, 4, "lru", device="cpu"))
    server.create_table("t", DIM, rows=1000)
    server.persistent.update("t", torch.arange(10), torch.from_numpy(rows(range(10))))
    return server


def in_redis(server, key):
    held, found = server.volatile.lookup("t", torch.tensor([key]))
    return held[0].numpy() if found.item() else None


def test_an_old_row_a_lagging_replica_put_in_redis_is_settled(tmp_path, redis_node, client):
    """Replica a applies an update; replica b has not yet, and a lookup there fills the shared Redis with the
    old row, which a then caches on a device-cache miss. Settling (settle_s after the apply) undoes both."""
    a, b = shared_replica(tmp_path, redis_node, "a"), shared_replica(tmp_path, redis_node, "b")
    # block 300 ms: a stays current (within 0.8 s of its last read) even on a busy host; settling after 1 s
    c = consumer(a, redis_node, consumer="a", group="g-{consumer}", settle_s=1.0, block_ms=300)
    c.start()
    try:
        new, old = rows([7], scale=-2.0)[0], rows([7])[0]
        publish_update(client, STREAM, "t", [7], new[None])
        # applied: every tier written (RocksDB alone is not enough: a's Redis write would race b's fill below)
        wait_until(lambda: c.counters()["applied"] == 1, what="a applied")
        applied = time.monotonic()
        np.testing.assert_array_equal(vector(b, 7), old)  # b is behind: its RocksDB's old row goes up into Redis
        np.testing.assert_array_equal(vector(a, 7), old)  # the race: a's device cache misses, Redis answers old
        assert time.monotonic() - applied < 1.0, "too slow to see the race before settling"
        wait_until(lambda: np.array_equal(vector(a, 7), new), timeout=3.0, what="settled on a")
        np.testing.assert_array_equal(in_redis(b, 7), new)  # and in Redis, for every replica
        assert c.counters()["settled"] == 1
    finally:
        c.stop()
        a.close()
        b.close()


def test_a_replica_far_behind_the_stream_never_puts_its_old_row_in_redis(tmp_path, redis_node, client):
    """b's consumer is stopped (b is behind by more than settle_s): a applies an update and settles it; then a
    lookup on b must not fill Redis with b's old row, which a would cache on its next device-cache miss (the
    hole settling alone leaves). b still answers (its own old row, until it catches up); a sees the new row."""
    a, b = shared_replica(tmp_path, redis_node, "a"), shared_replica(tmp_path, redis_node, "b")
    ca = consumer(a, redis_node, consumer="a", group="g-{consumer}", settle_s=1.0, block_ms=300)
    cb = consumer(b, redis_node, consumer="b", group="g-{consumer}", settle_s=1.0, block_ms=300)  # never started: behind
    ca.start()
    try:
        new, old = rows([7], scale=-2.0)[0], rows([7])[0]
        publish_update(client, STREAM, "t", [7], new[None])
        wait_until(lambda: ca.counters()["settled"] == 1, what="a applied and settled the update")
        assert ca.current() and not cb.current()
        np.testing.assert_array_equal(vector(b, 7), old)  # b answers from its own RocksDB...
        assert in_redis(b, 7) is None  # ...but keeps the row out of the shared tier
        assert b.stats()["server"]["volatile_fills_skipped"] == 1
        a.device_cache.clear("t")
        np.testing.assert_array_equal(vector(a, 7), new)  # a: miss, Redis has nothing, its RocksDB: new
        np.testing.assert_array_equal(in_redis(a, 7), new)  # and a, current, fills Redis
        # b's own (late) update of an older value, while it is behind: evicted from Redis, not written
        b.update("t", torch.tensor([7]), torch.from_numpy(old[None]))
        assert in_redis(a, 7) is None
        # Once b's consumer runs and catches up, b is current and fills Redis again.
        cb.start()
        wait_until(cb.current, what="b caught up")
        wait_until(lambda: np.array_equal(b.persistent.lookup("t", torch.tensor([7]))[0][0].numpy(), new), what="b applied")
        b.device_cache.clear("t")
        np.testing.assert_array_equal(vector(b, 7), new)
        np.testing.assert_array_equal(in_redis(b, 7), new)
    finally:
        ca.stop()
        cb.stop()
        a.close()
        b.close()
