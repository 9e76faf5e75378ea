"""The Redis Streams update consumer against a real redis-server: apply then ack, re-claim, rejects, outages."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest
import redis
import torch

from embeddings.device_cache import DeviceCache
from embeddings.hierarchy import ParameterServer
from embeddings.persistent import PersistentTier
from embeddings.redis_tier import RedisTier
from embeddings.stream import (
    CURRENT_MARGIN_S,
    RejectedUpdate,
    UpdateConsumer,
    decode_update,
    encode_update,
    group_name,
    publish_update,
)
from embeddings.volatile import VolatileTier

pytestmark = pytest.mark.redis
DIM = 4
STREAM = "updates"


def rows(keys, scale=1.0):
    return (np.asarray(keys, dtype=np.float32)[:, None] * scale + np.arange(DIM, dtype=np.float32) / 10).astype(np.float32)


def wait_until(condition, timeout=5.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout} s"
        time.sleep(0.01)


def _replica(path) -> ParameterServer:
    """A parameter server with its own RocksDB copy and caches, holding rows 0..9 of table "t"."""
    server = ParameterServer(PersistentTier(path), VolatileTier(4, 64, "evict_oldest", 0.75),
                             DeviceCache(32, 4, "lru", device="cpu"))
    server.create_table("t", DIM, rows=1000)
    server.update("t", torch.arange(10), torch.from_numpy(rows(range(10))))
    return server


@pytest.fixture
def ps(tmp_path):
    server = _replica(tmp_path / "db")
    yield server
    server.close()


@pytest.fixture
def client(redis_node):
    c = redis.Redis(port=redis_node.port)
    yield c
    c.close()


def consumer(ps, redis_node, **kwargs):
    kwargs = {"consumer": "c1", "block_ms": 50, "claim_idle_ms": 60_000, "backoff_s": 0.02, "max_backoff_s": 0.2, **kwargs}
    return UpdateConsumer(ps, redis_node.url, STREAM, **kwargs)


def pending(client) -> int:
    try:
        return client.xpending(STREAM, "turboserve")["pending"]
    except redis.ResponseError:
        return -1


def vector(ps, key):
    return ps.lookup("t", torch.tensor([key]))[0][0].numpy()


def test_message_format_round_trips():
    fields = encode_update("t", [3, -1], rows([3, 4]))
    assert fields["keys"] == np.array([3, -1], "<i8").tobytes() and len(fields["vectors"]) == 2 * DIM * 4
    table, keys, vectors = decode_update({k.encode(): v for k, v in fields.items()}, {"t": DIM})
    assert table == "t" and keys.tolist() == [3, -1] and np.array_equal(vectors, rows([3, 4]))
    with pytest.raises(RejectedUpdate, match="dim 5"):
        decode_update({k.encode(): v for k, v in fields.items()}, {"t": 5})
    with pytest.raises(RejectedUpdate, match="no table"):
        decode_update({k.encode(): v for k, v in fields.items()}, {"u": DIM})


def test_update_is_visible_within_a_second_and_refreshes_the_device_cache(ps, redis_node, client):
    np.testing.assert_array_equal(vector(ps, 3), rows([3])[0])  # now cached on the device
    assert ps.device_cache.contains("t", torch.tensor([3])).item()
    c = consumer(ps, redis_node)
    c.start()
    try:
        new = rows([3, 42], scale=-5.0)
        sent = time.monotonic()
        publish_update(client, STREAM, "t", [3, 42], new)
        wait_until(lambda: np.array_equal(vector(ps, 3), new[0]), timeout=1.0, what="update visible")
        assert time.monotonic() - sent < 1.0
        np.testing.assert_array_equal(vector(ps, 42), new[1])
        cached, found = ps.device_cache.lookup("t", torch.tensor([3]))
        assert found.item() and np.array_equal(cached[0].numpy(), new[0])  # refreshed in place, not only evicted
        wait_until(lambda: pending(client) == 0, what="XACK")
        assert c.counters()["applied"] == 1 and c.counters()["rows"] == 2
    finally:
        c.stop()
    # acknowledged means in RocksDB: a fresh persistent tier over the same directory has the row
    stored, found = ps.persistent.lookup("t", torch.tensor([42]))
    assert found.item() and np.array_equal(stored[0].numpy(), new[1])


def test_bad_entries_are_rejected_acknowledged_and_kept_aside(ps, redis_node, client):
    c = consumer(ps, redis_node)
    c.start()
    try:
        client.xadd(STREAM, {"table": "t", "keys": b"\x01\x02\x03"})
        client.xadd(STREAM, {"table": "nope", "keys": np.array([1], "<i8").tobytes(), "vectors": rows([1]).tobytes()})
        client.xadd(STREAM, {"table": "t", "keys": np.array([1], "<i8").tobytes(), "vectors": rows([1, 2]).tobytes()})
        publish_update(client, STREAM, "t", [5], rows([5], scale=9.0))  # a good one after them still applies
        wait_until(lambda: c.counters()["rejected"] == 3 and c.counters()["applied"] == 1, what="3 rejects, 1 apply")
        wait_until(lambda: pending(client) == 0, what="all acknowledged")
        reasons = [fields[b"reason"].decode() for _, fields in client.xrange(f"{STREAM}:rejected")]
        assert "missing field(s) vectors" in reasons[0] and "no table 'nope'" in reasons[1] and "need 16" in reasons[2]
        np.testing.assert_array_equal(vector(ps, 5), rows([5], scale=9.0)[0])
    finally:
        c.stop()


def test_pending_entries_of_a_crashed_consumer_are_claimed_at_start(ps, redis_node, client):
    client.xgroup_create(STREAM, "turboserve", id="0", mkstream=True)
    publish_update(client, STREAM, "t", [7], rows([7], scale=3.0))
    publish_update(client, STREAM, "t", [8], rows([8], scale=3.0))
    # a consumer that read both entries and died before acknowledging them
    assert len(client.xreadgroup("turboserve", "dead", {STREAM: ">"}, count=10)[0][1]) == 2
    assert pending(client) == 2
    c = consumer(ps, redis_node, claim_idle_ms=0)
    c.start()
    try:
        wait_until(lambda: pending(client) == 0, what="claimed and acknowledged")
        assert c.counters()["claimed"] == 2 and c.counters()["applied"] == 2
        np.testing.assert_array_equal(vector(ps, 8), rows([8], scale=3.0)[0])
    finally:
        c.stop()


def test_own_pending_entries_are_reapplied_after_a_restart(ps, redis_node, client):
    client.xgroup_create(STREAM, "turboserve", id="0", mkstream=True)
    publish_update(client, STREAM, "t", [6], rows([6], scale=2.0))
    client.xreadgroup("turboserve", "c1", {STREAM: ">"}, count=10)  # read by "c1", which then crashed
    c = consumer(ps, redis_node)  # the same consumer name, restarted; not idle long enough to be claimed
    c.start()
    try:
        wait_until(lambda: pending(client) == 0, what="own pending applied")
        assert c.counters()["claimed"] == 0 and c.counters()["applied"] == 1
        np.testing.assert_array_equal(vector(ps, 6), rows([6], scale=2.0)[0])
    finally:
        c.stop()


def test_a_failed_update_is_not_acknowledged_and_is_retried(ps, redis_node, client, monkeypatch):
    real, calls = ps.update, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(ps, "update", flaky)
    c = consumer(ps, redis_node)
    c.start()
    try:
        publish_update(client, STREAM, "t", [9], rows([9], scale=4.0))
        wait_until(lambda: c.counters()["update_errors"] == 1, what="first attempt failed")
        wait_until(lambda: c.counters()["applied"] == 1 and pending(client) == 0, what="retried and acknowledged")
        np.testing.assert_array_equal(vector(ps, 9), rows([9], scale=4.0)[0])
    finally:
        c.stop()


def test_survives_redis_going_away_and_resumes(ps, redis_node, client):
    c = consumer(ps, redis_node)
    c.start()
    try:
        publish_update(client, STREAM, "t", [1], rows([1], scale=5.0))
        wait_until(lambda: c.counters()["applied"] == 1, what="first update")
        redis_node.stop()
        wait_until(lambda: c.counters()["redis_errors"] >= 2, what="errors counted while Redis is down")
        assert c.alive
        redis_node.start()  # same port, empty: the stream and the group are gone
        client2 = redis.Redis(port=redis_node.port)
        wait_until(lambda: client2.exists(STREAM) == 1, what="group re-created")
        publish_update(client2, STREAM, "t", [2], rows([2], scale=5.0))
        wait_until(lambda: np.array_equal(vector(ps, 2), rows([2], scale=5.0)[0]), what="update after recovery")
        client2.close()
    finally:
        c.stop()
    assert not c.alive


# -- replicas: one group each (fan-out), and publishing what a replica took over HTTP ----------------------


def test_group_name_fills_in_consumer_and_hostname():
    assert group_name("turboserve", "pod-a") == "turboserve"
    assert group_name("turboserve-{consumer}", "pod-a") == "turboserve-pod-a"
    assert group_name("g-{hostname}", "x") == f"g-{socket.gethostname()}"
    with pytest.raises(ValueError, match="only {consumer} and {hostname}"):
        group_name("turboserve-{pod}", "pod-a")
    with pytest.raises(ValueError, match="only {consumer} and {hostname}"):
        group_name("turboserve-{", "pod-a")


@pytest.fixture
def ps2(tmp_path):
    """A second replica: its own RocksDB copy and caches, holding the same rows as `ps`."""
    server = _replica(tmp_path / "db2")
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


def test_publish_trims_the_stream_and_fails_loudly_without_redis(ps, redis_node, client):
    c = consumer(ps, redis_node, maxlen=10)
    for key in range(300):
        c.publish("t", [key % 10], rows([key % 10]))
    assert client.xlen(STREAM) < 300  # approximate trimming: whole macro nodes go
    redis_node.stop()
    with pytest.raises(redis.RedisError):
        c.publish("t", [1], rows([1]))
    c.stop()


def test_an_old_row_a_lagging_replica_put_in_redis_is_settled(tmp_path, redis_node, client):
    """Replica a applies an update; replica b has not yet, and a lookup there fills the shared Redis with the
    old row, which a then caches on a device-cache miss. Settling (settle_s after the apply) undoes both."""
    def replica(name):
        server = ParameterServer(PersistentTier(tmp_path / name), RedisTier(redis_node.url, partitions=4),
                                 DeviceCache(32, 4, "lru", device="cpu"))
        server.create_table("t", DIM, rows=1000)
        server.persistent.update("t", torch.arange(10), torch.from_numpy(rows(range(10))))  # as imported
        return server

    a, b = replica("a"), replica("b")
    # block 300 ms: a stays current (within 0.8 s of its last read) even on a busy host; settling after 1 s
    c = consumer(a, redis_node, consumer="a", group="g-{consumer}", settle_s=1.0, block_ms=300)
    c.start()
    try:
        new, old = rows([7], scale=-2.0)[0], rows([7])[0]
        publish_update(client, STREAM, "t", [7], new[None])
        wait_until(lambda: np.array_equal(a.persistent.lookup("t", torch.tensor([7]))[0][0].numpy(), new), what="a applied")
        applied = time.monotonic()
        np.testing.assert_array_equal(vector(b, 7), old)  # b is behind: its RocksDB's old row goes up into Redis
        np.testing.assert_array_equal(vector(a, 7), old)  # the race: a's device cache misses, Redis answers old
        assert time.monotonic() - applied < 1.0, "too slow to see the race before settling"
        wait_until(lambda: np.array_equal(vector(a, 7), new), timeout=3.0, what="settled on a")
        held, found = b.volatile.lookup("t", torch.tensor([7]))
        assert found.item() and np.array_equal(held[0].numpy(), new)  # and in Redis, for every replica
        assert c.counters()["settled"] == 1
    finally:
        c.stop()
        a.close()
        b.close()


def _shared_replica(tmp_path, redis_node, name):
    """A replica with its own RocksDB (rows 0..9 as imported) and device cache, over the shared Redis."""
    server = ParameterServer(PersistentTier(tmp_path / name), RedisTier(redis_node.url, partitions=4),
                             DeviceCache(32, 4, "lru", device="cpu"))
    server.create_table("t", DIM, rows=1000)
    server.persistent.update("t", torch.arange(10), torch.from_numpy(rows(range(10))))
    return server


def in_redis(server, key):
    held, found = server.volatile.lookup("t", torch.tensor([key]))
    return held[0].numpy() if found.item() else None


def test_a_replica_far_behind_the_stream_never_puts_its_old_row_in_redis(tmp_path, redis_node, client):
    """b's consumer is stopped (b is behind by more than settle_s): a applies an update and settles it; then a
    lookup on b must not fill Redis with b's old row, which a would cache on its next device-cache miss (the
    hole settling alone leaves). b still answers (its own old row, until it catches up); a sees the new row."""
    a, b = _shared_replica(tmp_path, redis_node, "a"), _shared_replica(tmp_path, redis_node, "b")
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


def test_current_follows_the_reads_and_an_idle_stream_stays_current(ps, redis_node, client):
    c = consumer(ps, redis_node, block_ms=100)
    assert not c.current()  # nothing read yet: not known to be current
    c.start()
    try:
        wait_until(c.current, what="current after the first read")
        samples = []
        for _ in range(30):  # an idle stream: every read times out, each one renews it
            samples.append(c.current())
            time.sleep(0.02)
        assert all(samples)
        c.stop()
        time.sleep(0.1 + CURRENT_MARGIN_S + 0.05)  # block_ms + CURRENT_MARGIN_S after the last read: no longer known
        assert not c.current()
    finally:
        c.stop()
