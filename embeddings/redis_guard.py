"""The Redis tier's connection (embeddings/redis_tier.py): a client behind a circuit breaker that remembers which rows
Redis may hold stale, and deletes them before it trusts Redis again.

Failures: every call runs behind a circuit breaker. A Redis error (unreachable, timeout, cluster
down) counts in `errors`, opens the breaker for a backoff that doubles from `backoff_s` up to
`max_backoff_s`, and the call answers as if Redis held nothing (lookup: all misses; writes: not
applied). While open, calls skip Redis (counted in `skipped`); the first call after the backoff
tries again and a success closes the breaker. An update or evict that fails leaves a row Redis may
hold stale, so its keys are remembered (up to `max_dirty` per table) and deleted from Redis on recovery;
past that bound the table's partitions are dropped whole on recovery. With a `journal` (the persistent tier) they
are also written there, fsynced, before the update returns, and read back at start: a server that stops before
Redis comes back still deletes them when it next reaches Redis (else the stale row would be served for good).

A Redis that restarts (from an RDB snapshot or an AOF older than the last writes, or a replica promoted in its place)
may hold rows older than updates acknowledged since, and it fails no call to say so: redis-py reconnects silently.
So every new connection asks the server its `run_id` (INFO server), which changes at each start; a node seen before
(at the same address: a failover to another address is not noticed) under another run_id makes every table wholly
stale, as past `max_dirty`: its partitions are dropped before the next
call, and the call that met the new run_id answers as failed (its replies may be those stale rows). With a `journal`
the run_ids are kept in it too, so a Redis that restarted while no server was running is noticed at the next start.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry

logger = logging.getLogger(__name__)


class RedisGuard:
    """One client (a single node, or a Redis Cluster from its startup nodes) behind a circuit breaker, with the keys of
    each table whose rows Redis may hold stale. Thread-safe.

    urls, cluster, timeout_s, backoff_s, max_backoff_s, max_dirty, journal: as RedisTier's. count: the tier's counters
    (`errors`, `skipped`). tables: the tables registered (every one turns stale when a node restarts). drop: adds to a
    pipeline the deletion of a table's rows with the given keys, or of all its rows (None).
    """

    def __init__(self, urls: list[str], cluster: bool, timeout_s: float, backoff_s: float, max_backoff_s: float,
                 max_dirty: int, journal: Any, count: Callable[..., None], tables: Callable[[], list[str]],
                 drop: Callable[[Any, str, set[int] | None], None]) -> None:
        self.urls, self.cluster = urls, cluster
        self.timeout_s, self.backoff_s, self.max_backoff_s, self.max_dirty = timeout_s, backoff_s, max_backoff_s, max_dirty
        self._count, self._tables, self._drop = count, tables, drop
        self._client: Any = None
        self._lock = threading.Lock()  # breaker state and the dirty sets
        self._failures = 0
        self._open_until = 0.0
        self._dirty: dict[str, set[int] | None] = {}  # None: too many, drop the table on recovery
        self._run_ids: dict[tuple[str, int], bytes] = {}  # node address -> the run_id it answered (see _on_connect)
        self._restarts = 0  # nodes met with a new run_id; a call during which it grows is not trusted
        self.journal = journal  # durable copy of _dirty: journal_add / journal_remove / journal (PersistentTier)
        if journal is not None:
            for table, keys in journal.journal().items():  # left by a server that stopped before Redis came back
                self._dirty[table] = None if keys is None else set(keys.tolist())
            for node, run_id in journal.redis_run_ids().items():  # a Redis restarted while no server ran is noticed too
                host, _, port = node.rpartition(":")
                self._run_ids[(host, int(port))] = run_id

    def _connect(self) -> Any:
        common = {"socket_timeout": self.timeout_s, "socket_connect_timeout": self.timeout_s, "retry": Retry(NoBackoff(), 0),
                  "redis_connect_func": self._on_connect}
        if not self.cluster:
            return redis.Redis.from_url(self.urls[0], **common)
        nodes = []
        for url in self.urls:
            hostport = url.split("://", 1)[-1].split("/", 1)[0]
            host, _, port = hostport.rpartition(":")
            nodes.append(ClusterNode(host, int(port)))
        return RedisCluster(startup_nodes=nodes, cluster_error_retry_attempts=1, **common)

    def _on_connect(self, connection: Any) -> None:
        """Each new connection (redis-py's connect hook): note the node's run_id; a new one for a node seen before
        is a restarted Redis (or a failover), whose rows may predate acknowledged updates: drop every table."""
        if not self.cluster:  # RedisCluster runs the connection's own set-up before calling this hook
            connection.on_connect()
        connection.send_command("INFO", "server")
        try:
            info = connection.read_response()
        except redis.ResponseError as exc:  # INFO refused (an ACL user without +info, a renamed command, a proxy)
            if ("", 0) not in self._run_ids:
                logger.warning("redis tier: INFO refused (%s): a restarted Redis is not noticed", exc)
            self._run_ids.setdefault(("", 0), b"")
            return
        info = info if isinstance(info, bytes) else str(info).encode()
        run_id = next((line.split(b":", 1)[1].strip() for line in info.splitlines() if line.startswith(b"run_id:")), b"")
        address = (str(getattr(connection, "host", None) or getattr(connection, "path", "")), int(getattr(connection, "port", 0)))
        with self._lock:
            new = address not in self._run_ids  # (those loaded from the journal are in it already)
            known = self._run_ids.setdefault(address, run_id)
            save = self.journal is not None and (new or known != run_id)  # into the journal: first seen, or changed
            tables = None
            if known != run_id:
                self._run_ids[address] = run_id
                self._restarts += 1
                tables = self._tables()
                for table in tables:
                    self._mark_dirty(table, None)
        if tables is not None:
            logger.warning("redis tier: %s:%d restarted (run_id %s, was %s): dropping every table's rows there, which "
                           "may predate updates", address[0], address[1], run_id.decode(), known.decode())
            if self.journal is not None:
                for table in tables:
                    self.journal.journal_add(table, None)
        if save:  # after the drop is journalled: a crash in between still drops at the next start
            self.journal.set_redis_run_id(f"{address[0]}:{address[1]}", run_id)

    @property
    def available(self) -> bool:
        """False while the circuit breaker is open (Redis failed recently)."""
        return time.monotonic() >= self._open_until

    def call(self, fn: Callable[[Any], Any]) -> Any:
        """Run fn(client) behind the breaker; None when skipped or failed (never raises a RedisError)."""
        if time.monotonic() < self._open_until:
            self._count(skipped=1)
            return None
        try:
            if self._client is None:
                self._client = self._connect()
            restarts = self._restarts
            if self._failures or self._dirty:
                self._recover(self._client)
            result = fn(self._client)
            if self._restarts != restarts:  # met a restarted node: the replies may be its stale rows
                if self._dirty:
                    self._recover(self._client)
                return None
        except (redis.RedisError, RedisClusterException) as exc:  # the latter: cluster discovery failed
            with self._lock:
                self._failures += 1
                delay = min(self.max_backoff_s, self.backoff_s * 2 ** (self._failures - 1))
                self._open_until = time.monotonic() + delay
            self._count(errors=1)
            if self.cluster or isinstance(exc, redis.ConnectionError):
                self._client = None  # a fresh client rediscovers nodes and connections
            logger.warning("redis tier: %s: %s; answering misses for %.2f s", type(exc).__name__, exc, delay)
            return None
        if self._failures:
            logger.info("redis tier: recovered after %d failed calls", self._failures)
            self._failures = 0
        return result

    def _recover(self, client: Any) -> None:
        """Before the first call after a failure: delete rows whose writes may have been missed."""
        with self._lock:
            dirty, self._dirty = self._dirty, {}
        pipe = client.pipeline(transaction=False)
        for table, keys in dirty.items():
            self._drop(pipe, table, keys)
        try:
            pipe.execute()
        except (redis.RedisError, RedisClusterException):
            with self._lock:  # still down: keep them for the next try
                for table, keys in dirty.items():
                    self._mark_dirty(table, keys)
            raise
        if self.journal is not None and dirty:
            with self._lock:  # keys a failure marked again meanwhile keep their journal entries
                again = dict(self._dirty)
            self.journal.journal_remove({t: None if k is None else np.fromiter(k - again.get(t, set()), np.int64)
                                         for t, k in dirty.items() if again.get(t, set()) is not None})

    def _mark_dirty(self, table: str, keys: Any) -> None:
        old = self._dirty.get(table, set())
        if old is None or keys is None or len(old) + len(keys) > self.max_dirty:
            self._dirty[table] = None
        else:
            old.update(int(k) for k in keys)
            self._dirty[table] = old

    def write_failed(self, table: str, keys: np.ndarray) -> None:
        """An update or evict of these keys did not reach Redis: remember them (and journal them) as stale."""
        with self._lock:
            self._mark_dirty(table, keys.tolist())
            whole = self._dirty.get(table) is None
        if self.journal is not None:  # before the update returns: a restart must still find these keys
            self.journal.journal_add(table, None if whole else keys)

    def close(self) -> None:
        """Close the connections."""
        if self._client is not None:
            self._client.close()
            self._client = None
