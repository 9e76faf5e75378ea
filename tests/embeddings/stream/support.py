"""Helpers of the update-stream tests: rows, a replica, a consumer with test-speed timings."""

from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np
import redis
import torch

from embeddings.device_cache import DeviceCache
from embeddings.hierarchy import ParameterServer
from embeddings.persistent import PersistentTier
from embeddings.stream import UpdateConsumer
from embeddings.stream_format import publish_update
from embeddings.volatile import VolatileTier

DIM = 4
STREAM = "updates"


def rows(keys, scale=1.0):
    return (np.asarray(keys, dtype=np.float32)[:, None] * scale + np.arange(DIM, dtype=np.float32) / 10).astype(np.float32)


def wait_until(condition, timeout=5.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout} s"
        time.sleep(0.01)


def replica_server(path) -> ParameterServer:
    """A parameter server with its own RocksDB copy and caches, holding rows 0..9 of table "t"."""
    server = ParameterServer(PersistentTier(path), VolatileTier(4, 64, "evict_oldest", 0.75),
                             DeviceCache(32, 4, "lru", device="cpu"))
    server.create_table("t", DIM, rows=1000)
    server.update("t", torch.arange(10), torch.from_numpy(rows(range(10))))
    return server


def consumer(ps, redis_node, **kwargs):
    kwargs = {"consumer": "c1", "block_ms": 50, "claim_idle_ms": 60_000, "backoff_s": 0.02, "max_backoff_s": 0.2, **kwargs}
    return UpdateConsumer(ps, redis_node.url, STREAM, **kwargs)


@contextmanager
def running(ps, redis_node, **kwargs):
    """A started `consumer`, stopped on the way out."""
    c = consumer(ps, redis_node, **kwargs)
    c.start()
    try:
        yield c
    finally:
        c.stop()


def left_pending(client, reader: str, keys, scale: float) -> int:
    """One update per key published, then read by consumer `reader` of group "turboserve", which crashed before
    acknowledging them; returns how many it read."""
    client.xgroup_create(STREAM, "turboserve", id="0", mkstream=True)
    for key in keys:
        publish_update(client, STREAM, "t", [key], rows([key], scale=scale))
    return len(client.xreadgroup("turboserve", reader, {STREAM: ">"}, count=10)[0][1])


def pending(client) -> int:
    try:
        return client.xpending(STREAM, "turboserve")["pending"]
    except redis.ResponseError:
        return -1


def vector(ps, key):
    return ps.lookup("t", torch.tensor([key]))[0][0].numpy()
