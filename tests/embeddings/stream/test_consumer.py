"""The Redis Streams update consumer against a real redis-server: apply then ack, re-claim, rejects, outages."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest
import redis
import torch

from embeddings.stream import CURRENT_MARGIN_S
from embeddings.stream_format import RejectedUpdate, decode_update, encode_update, group_name, publish_update
from tests.embeddings.stream.support import DIM, STREAM, consumer, left_pending, pending, rows, running, vector, wait_until

pytestmark = pytest.mark.redis


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
    with running(ps, redis_node) as c:
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
    # acknowledged means in RocksDB: a fresh persistent tier over the same directory has the row
    stored, found = ps.persistent.lookup("t", torch.tensor([42]))
    assert found.item() and np.array_equal(stored[0].numpy(), new[1])


def test_bad_entries_are_rejected_acknowledged_and_kept_aside(ps, redis_node, client):
    with running(ps, redis_node) as c:
        client.xadd(STREAM, {"table": "t", "keys": b"\x01\x02\x03"})
        client.xadd(STREAM, {"table": "nope", "keys": np.array([1], "<i8").tobytes(), "vectors": rows([1]).tobytes()})
        client.xadd(STREAM, {"table": "t", "keys": np.array([1], "<i8").tobytes(), "vectors": rows([1, 2]).tobytes()})
        publish_update(client, STREAM, "t", [5], rows([5], scale=9.0))  # a good one after them still applies
        wait_until(lambda: c.counters()["rejected"] == 3 and c.counters()["applied"] == 1, what="3 rejects, 1 apply")
        wait_until(lambda: pending(client) == 0, what="all acknowledged")
        reasons = [fields[b"turboserve:reason"].decode() for _, fields in client.xrange(f"{STREAM}:rejected")]
        assert "missing field(s) vectors" in reasons[0] and "no table 'nope'" in reasons[1] and "need 16" in reasons[2]
        np.testing.assert_array_equal(vector(ps, 5), rows([5], scale=9.0)[0])


def test_a_large_entry_is_written_in_slices_of_max_keys(ps, redis_node, client, monkeypatch):
    """Each write holds the lookups' lock: an entry (or a read of entries) of more keys than max_keys is written in
    slices of max_keys, the lock let go between them, every row applied."""
    sizes = []
    update = ps.update
    monkeypatch.setattr(ps, "update", lambda table, keys, vectors: sizes.append(keys.numel()) or update(table, keys, vectors))
    with running(ps, redis_node, max_keys=8) as c:
        publish_update(client, STREAM, "t", list(range(20)), rows(range(20), scale=2.0))
        wait_until(lambda: c.counters()["applied"] == 1 and pending(client) == 0, what="applied")
    assert sizes == [8, 8, 4]
    for k in (0, 8, 19):
        np.testing.assert_array_equal(vector(ps, k), rows([k], scale=2.0)[0])


def test_a_dead_letter_keeps_the_entrys_own_fields(ps, redis_node, client):
    with running(ps, redis_node) as c:
        bad = client.xadd(STREAM, {"table": "nope", "keys": b"", "vectors": b"", "reason": "trainer's", "id": "7"})
        wait_until(lambda: c.counters()["rejected"] == 1, what="1 reject")
        (_, dead), = client.xrange(f"{STREAM}:rejected")
        assert "no table 'nope'" in dead[b"turboserve:reason"].decode()
        assert dead[b"turboserve:id"] == bad and dead[b"reason"] == b"trainer's" and dead[b"id"] == b"7"


def test_the_dead_letter_stream_is_capped(ps, redis_node, client, monkeypatch):
    monkeypatch.setattr("embeddings.stream.REJECTED_MAXLEN", 10)
    with running(ps, redis_node) as c:
        for _ in range(300):
            client.xadd(STREAM, {"table": "nope"})
        wait_until(lambda: c.counters()["rejected"] == 300, what="300 rejects")
        assert client.xlen(f"{STREAM}:rejected") < 300  # approximate trimming: whole macro nodes go


def test_pending_entries_of_a_crashed_consumer_are_claimed_at_start(ps, redis_node, client):
    # a consumer that read both entries and died before acknowledging them
    assert left_pending(client, "dead", [7, 8], scale=3.0) == 2
    assert pending(client) == 2
    with running(ps, redis_node, claim_idle_ms=0) as c:
        wait_until(lambda: pending(client) == 0, what="claimed and acknowledged")
        assert c.counters()["claimed"] == 2 and c.counters()["applied"] == 2
        np.testing.assert_array_equal(vector(ps, 8), rows([8], scale=3.0)[0])


def test_own_pending_entries_are_reapplied_after_a_restart(ps, redis_node, client):
    left_pending(client, "c1", [6], scale=2.0)  # read by "c1", which then crashed
    with running(ps, redis_node) as c:  # the same consumer name, restarted; not idle long enough to be claimed
        wait_until(lambda: pending(client) == 0, what="own pending applied")
        assert c.counters()["claimed"] == 0 and c.counters()["applied"] == 1
        np.testing.assert_array_equal(vector(ps, 6), rows([6], scale=2.0)[0])


def test_a_failed_update_is_not_acknowledged_and_is_retried(ps, redis_node, client, monkeypatch):
    real, calls = ps.update, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(ps, "update", flaky)
    with running(ps, redis_node) as c:
        publish_update(client, STREAM, "t", [9], rows([9], scale=4.0))
        wait_until(lambda: c.counters()["update_errors"] == 1, what="first attempt failed")
        wait_until(lambda: c.counters()["applied"] == 1 and pending(client) == 0, what="retried and acknowledged")
        np.testing.assert_array_equal(vector(ps, 9), rows([9], scale=4.0)[0])


def test_survives_redis_going_away_and_resumes(ps, redis_node, client):
    with running(ps, redis_node) as c:
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


def test_publish_trims_the_stream_and_fails_loudly_without_redis(ps, redis_node, client):
    c = consumer(ps, redis_node, maxlen=10)
    for key in range(300):
        c.publish("t", [key % 10], rows([key % 10]))
    assert client.xlen(STREAM) < 300  # approximate trimming: whole macro nodes go
    redis_node.stop()
    with pytest.raises(redis.RedisError):
        c.publish("t", [1], rows([1]))
    c.stop()


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


def test_a_claimed_entry_older_than_an_applied_one_leaves_the_newer_value(ps, redis_node, client):
    """Entry E1 (key 5 = x1) left pending by a dead consumer; this one applies E2 (key 5 = x2), then claims E1:
    key 5 stays x2, the stream's last value (E1 was applied over it, for good)."""
    assert left_pending(client, "old-pod", [5], scale=1.0) == 1  # E1
    with running(ps, redis_node, claim_idle_ms=300) as c:
        publish_update(client, STREAM, "t", [5], rows([5], scale=2.0))  # E2, after E1 in the stream
        wait_until(lambda: c.counters()["claimed"] == 1 and pending(client) == 0, what="E1 claimed and acknowledged")
        np.testing.assert_array_equal(vector(ps, 5), rows([5], scale=2.0)[0])
        assert c.counters()["rows_superseded"] == 1


def test_own_published_updates_replayed_after_newer_local_writes_never_go_back(ps, redis_node, client):
    """HTTP updates are written here, then published; the consumer replays them in stream order. A replayed older
    entry must not write over a newer local value (reads went 40, 34, 35, ...)."""
    with running(ps, redis_node) as c:
        for i in range(1, 41):
            c.order.hold("t", [3])
            ps.update("t", torch.tensor([3]), torch.from_numpy(rows([3], scale=float(i))))
            c.publish("t", [3], rows([3], scale=float(i)))
        seen = []
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and pending(client) != 0 or len(seen) < 50:
            seen.append(float(vector(ps, 3)[0]) / 3)
            time.sleep(0.005)
        assert all(v == 40.0 for v in seen), sorted(set(seen))
        wait_until(lambda: c.counters()["applied"] == 40, what="every entry replayed")
        np.testing.assert_array_equal(vector(ps, 3), rows([3], scale=40.0)[0])


def test_a_read_is_written_as_one_update_per_table_last_row_winning(ps, redis_node, client, monkeypatch):
    """40 entries of two tables waiting in the stream: one read, one synced update per table (not one per entry, which
    drained at ~300 entries/s), each key ending on the row of its last entry, every entry acknowledged."""
    ps.create_table("u", DIM, rows=100)
    real, calls = ps.update, []

    def counted(table, *args, **kwargs):
        calls.append(table)
        return real(table, *args, **kwargs)

    monkeypatch.setattr(ps, "update", counted)
    client.xgroup_create(STREAM, "turboserve", id="0", mkstream=True)
    for i in range(40):
        publish_update(client, STREAM, "t" if i % 2 else "u", [i % 4], rows([i % 4], scale=float(i)))
    with running(ps, redis_node, batch=64) as c:
        wait_until(lambda: c.counters()["applied"] == 40 and pending(client) == 0, what="40 entries applied")
        assert sorted(calls) == ["t", "u"] and c.counters()["rows"] == 40
        for key, last in ((1, 37), (3, 39)):
            np.testing.assert_array_equal(vector(ps, key), rows([key], scale=float(last))[0])
        for key, last in ((0, 36), (2, 38)):
            np.testing.assert_array_equal(ps.lookup("u", torch.tensor([key]))[0][0].numpy(), rows([key], scale=float(last))[0])
