"""Per-key order against a real redis-server: an entry read while a key is held waits for the hold's own entry id
(never skipped for good), and a stream that starts over with lower ids is applied, not taken as superseded."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest
import redis
import torch

from embeddings.key_order import KeyOrder, entry_order
from embeddings.stream_format import publish_update
from tests.embeddings.stream.support import STREAM, pending, rows, running, vector, wait_until

pytestmark = pytest.mark.redis


def group(client) -> dict:
    """The consumer's group ({} until the consumer has made it: an entry XADDed first makes the stream)."""
    groups = client.xinfo_groups(STREAM) if client.exists(STREAM) else []
    return groups[0] if groups else {}


def test_an_entry_read_while_its_key_is_held_waits_for_the_publishing(ps, redis_node, client):
    """An HTTP update of key 3 is written here and XADDed (P); a trainer's entry E for key 3 lands right after P,
    and the consumer reads both before `publish` has recorded P's id. E is newer than P: once P's id is known, E
    must apply, as on every other replica (it used to be skipped as superseded and acknowledged, for good)."""
    with running(ps, redis_node) as c:
        wait_until(lambda: client.exists(STREAM) == 1, what="group created")
        http, trainer = rows([3], scale=11.0), rows([3], scale=-7.0)
        c.order.hold("t", [3])  # what the HTTP route does before writing
        ps.update("t", torch.tensor([3]), torch.from_numpy(http))
        p = publish_update(client, STREAM, "t", [3], http)  # `publish`'s XADD ...
        e = publish_update(client, STREAM, "t", [3], trainer)
        # the consumer stops at the first entry with the held key, or (as it used to) reads both and skips them
        wait_until(lambda: c.counters().get("held_waits") or (group(client).get("last-delivered-id") == e and pending(client) == 0),
                   what="the held key met")
        assert pending(client) >= 1  # not acknowledged while the key is held
        c.order.note("t", [3], entry_order(p), published=True)  # ... and `publish` records P's id
        wait_until(lambda: group(client).get("last-delivered-id") == e and pending(client) == 0,
                   what="both applied once the hold ended")
        np.testing.assert_array_equal(vector(ps, 3), trainer[0])
        assert c.counters()["applied"] == 2


def test_a_failed_publish_releases_its_hold_and_entries_apply(ps, redis_node, client):
    """`publish` ends the hold when its XADD fails (the route's client may be gone by then: a cancelled request's
    publish goes on in its thread), so the entries waiting on the key apply."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]  # nothing listens there once closed
    with running(ps, redis_node) as c:
        c.order.hold("t", [4])
        publish_update(client, STREAM, "t", [4], rows([4], scale=3.0))  # another writer's entry for the key
        wait_until(lambda: c.counters()["held_waits"] > 0, what="entry waiting on the hold")
        c._publisher = redis.Redis(port=dead_port, socket_connect_timeout=0.5)
        with pytest.raises(redis.ConnectionError):
            c.publish("t", [4], rows([4], scale=8.0))
        wait_until(lambda: pending(client) == 0, what="applied after the failed publish")
        np.testing.assert_array_equal(vector(ps, 4), rows([4], scale=3.0)[0])


def test_a_hold_never_published_stops_the_stream_only_for_hold_timeout_s(ps, redis_node, client):
    with running(ps, redis_node) as c:
        c.order.hold_timeout_s = 0.3
        c.order.hold("t", [5])  # its publisher is gone: never noted, never released
        entry = publish_update(client, STREAM, "t", [5], rows([5], scale=2.0))
        wait_until(lambda: group(client).get("last-delivered-id") == entry and pending(client) == 0,
                   what="applied once the hold timed out")
        np.testing.assert_array_equal(vector(ps, 5), rows([5], scale=2.0)[0])


def test_a_stream_started_over_with_lower_ids_is_applied(ps, redis_node, client):
    """The stream is deleted and added again with ids below those applied (a Redis whose clock is behind): the
    group is created again, and the orders remembered from the old stream no longer count."""
    now_ms = int(time.time() * 1000)
    with running(ps, redis_node) as c:
        publish_update(client, STREAM, "t", [6], rows([6], scale=1.5))
        wait_until(lambda: pending(client) == 0 and c.counters()["applied"] == 1, what="first entry applied")
        client.delete(STREAM)
        client.xadd(STREAM, {"table": "t", "keys": np.array([6], "<i8").tobytes(),
                             "vectors": rows([6], scale=-4.0).tobytes()}, id=f"{now_ms - 5000}-0")
        wait_until(lambda: c.counters()["applied"] == 2, what="the new stream's entry handled")
        np.testing.assert_array_equal(vector(ps, 6), rows([6], scale=-4.0)[0])
        assert c.counters()["rows_superseded"] == 0


def test_holds_are_counted_per_writer():
    """Two HTTP updates of one key at once: the first one's publishing leaves the key held for the second."""
    order = KeyOrder(60)
    order.hold("t", [1])
    order.hold("t", [1])
    order.note("t", [1], (10, 0), published=True)
    assert order.held("t", np.array([1]))
    order.note("t", [1], (11, 0), published=True)
    assert not order.held("t", np.array([1]))
    assert order.superseded("t", np.array([1]), (10, 5)).tolist() == [True]
    order.reset()
    assert order.superseded("t", np.array([1]), (10, 5)).tolist() == [False]


def test_a_key_held_without_pause_still_times_out():
    """Overlapping HTTP updates of one hot key never bring its holders to 0: the hold's age is its first holder's,
    so hold_timeout_s still bounds how long the stream waits on it."""
    order = KeyOrder(60, hold_timeout_s=0.2)
    order.hold("t", [1])
    for _ in range(4):
        time.sleep(0.1)
        order.hold("t", [1])  # another update of the key before the last one's publishing
    assert not order.held("t", np.array([1]))
