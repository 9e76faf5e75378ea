"""The volatile tier in Redis (one node or a Redis Cluster), shared by the server's replicas.

Layout: each table is split into `partitions` partitions (same hash as the in-memory tier). A
partition is one Redis hash `<prefix>{<table>:<p>}` (field = the key as 8 little-endian bytes,
value = the row's raw float32 bytes) plus, for `evict_oldest`, a sorted set `<prefix>{<table>:<p>}:t`
of write times. The hash tag `{table:p}` puts both on one cluster slot, so a partition lives on
one node and every command touches one node. A batch is one pipeline (HMGET / HSET per partition), and
`lookup_many` / `insert_many` put every table of a batch in one pipeline.

Capacity: after an insert, a partition over `capacity_per_partition` rows is brought down to
`target_fill * capacity` by `evict_random` (HRANDFIELD) or `evict_oldest` (the least recently
written rows). `evict_least_used` would need a counter write per hit and is not offered here.

Failures and restarts (embeddings/redis_guard.py): every call runs behind a circuit breaker and answers as if Redis
held nothing while Redis is down; the keys of an update or evict that failed, and every table when a node restarted
(a new run_id), are deleted from Redis before it is trusted again.

Tables carry an `epoch` (TableSpec.epoch, set by each `turboserve import-embeddings`): it is part of the key names,
so rows Redis kept from before a re-import are never read again (they are left to Redis's own eviction).
"""

from __future__ import annotations

import time
from typing import Any, Literal

import numpy as np
import torch

from embeddings.redis_guard import RedisGuard
from embeddings.tier import TableSpec, Tier, check_keys, check_vectors, keys_to_numpy, last_occurrence
from embeddings.volatile import group_by, partition_of


def _fields(keys: np.ndarray) -> list[bytes]:
    """Hash field names: each key's 8 little-endian bytes."""
    raw = keys.astype("<i8").tobytes()
    return [raw[i:i + 8] for i in range(0, len(raw), 8)]


class RedisTier(Tier):
    """Partitioned rows in Redis hashes, pipelined, behind a circuit breaker.

    urls: one `redis://host:port[/db]` URL (single node), or the startup nodes of a cluster with
    `cluster=True`. partitions, capacity_per_partition, overflow_policy (evict_random |
    evict_oldest), target_fill: as the in-memory tier. prefix: key name prefix. timeout_s: socket
    connect/read timeout. backoff_s, max_backoff_s: circuit breaker backoff. max_dirty, journal: the keys Redis may
    hold stale (embeddings/redis_guard.py). Thread-safe.
    """

    name = "redis"
    shared = True

    def __init__(self, urls: str | list[str] = "redis://127.0.0.1:6379", cluster: bool = False, partitions: int = 16,
                 capacity_per_partition: int = 1 << 20,
                 overflow_policy: Literal["evict_random", "evict_oldest"] = "evict_oldest",
                 target_fill: float = 0.8, prefix: str = "turboserve:emb:", timeout_s: float = 0.25,
                 backoff_s: float = 0.1, max_backoff_s: float = 5.0, max_dirty: int = 100_000, journal: Any = None) -> None:
        super().__init__()
        if overflow_policy not in ("evict_random", "evict_oldest"):
            raise ValueError(f"redis tier: overflow_policy={overflow_policy!r} must be evict_random or evict_oldest")
        if partitions < 1 or capacity_per_partition < 1 or not 0.0 < target_fill <= 1.0:
            raise ValueError(f"{partitions=} and {capacity_per_partition=} must be >= 1, {target_fill=} in (0, 1]")
        self.partitions, self.capacity = partitions, capacity_per_partition
        self.policy, self.target_fill, self.prefix = overflow_policy, target_fill, prefix
        self._counts["skipped"] = 0  # calls not sent because the breaker was open
        self._epochs: dict[str, str] = {}  # table -> its epoch, part of its key names
        self._guard = RedisGuard([urls] if isinstance(urls, str) else list(urls), cluster, timeout_s, backoff_s,
                                 max_backoff_s, max_dirty, journal, self.count, lambda: list(self._epochs), self._drop)

    # -- key layout, and the guard's hooks -----------------------------------------------------------
    @property
    def available(self) -> bool:
        """False while the circuit breaker is open (Redis failed recently)."""
        return self._guard.available

    def _drop(self, pipe: Any, table: str, keys: set[int] | None) -> None:
        """Add to the pipeline the deletion of the table's rows with these keys, or of all its rows (None): the guard's
        recovery."""
        if keys is None:
            for p in range(self.partitions):
                pipe.delete(self._hash(table, p), self._hash(table, p) + ":t")
            return
        k = np.fromiter(keys, np.int64, len(keys))
        for p, pos in group_by(partition_of(k, self.partitions), self.partitions):
            pipe.hdel(self._hash(table, p), *_fields(k[pos]))

    def _hash(self, table: str, p: int) -> str:
        epoch = self._epochs.get(table)
        return f"{self.prefix}{epoch}:{{{table}:{p}}}" if epoch else f"{self.prefix}{{{table}:{p}}}"

    # -- the tier interface ---------------------------------------------------------------------
    def create_table(self, spec: TableSpec) -> None:
        """Register the table (Redis needs no schema; rows of a table made by another replica are shared)."""
        super().create_table(spec)
        self._epochs[spec.name] = spec.epoch

    def lookup(self, table: str, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows held: vectors [n, dim], found [n] (CPU). All misses when Redis is unavailable."""
        return self.lookup_many({table: keys})[table]

    def lookup_many(self, requests: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """`lookup` of several tables in one pipeline (HMGET per table partition); all misses when Redis is down."""
        specs = {t: self.spec(t) for t in requests}
        ks = {t: keys_to_numpy(check_keys(k)) for t, k in requests.items()}
        groups = [(t, p, pos) for t, k in ks.items() for p, pos in group_by(partition_of(k, self.partitions), self.partitions)]

        def run(client: Any) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for t, p, pos in groups:
                pipe.hmget(self._hash(t, p), _fields(ks[t][pos]))
            return pipe.execute()

        replies = self._guard.call(run) if groups else None
        hit_pos: dict[str, list[int]] = {t: [] for t in requests}
        hit_rows: dict[str, list[bytes]] = {t: [] for t in requests}
        for (t, _, pos), values in zip(groups, replies or []):
            width, hp, hr = 4 * specs[t].dim, hit_pos[t], hit_rows[t]
            for i, v in zip(pos.tolist(), values):
                if v is not None and len(v) == width:
                    hp.append(i)
                    hr.append(v)
        answers, hits, total = {}, 0, 0
        for t, spec in specs.items():
            out = np.empty((ks[t].size, spec.dim), dtype=np.float32)  # [n, dim]
            out[:] = spec.default.numpy()
            found = np.zeros(ks[t].size, dtype=bool)
            if hit_pos[t]:
                out[hit_pos[t]] = np.frombuffer(b"".join(hit_rows[t]), dtype=np.float32).reshape(-1, spec.dim)
                found[hit_pos[t]] = True
            hits, total = hits + len(hit_pos[t]), total + ks[t].size
            answers[t] = torch.from_numpy(out), torch.from_numpy(found)
        self.count(hits=hits, misses=total - hits)
        return answers

    def _rows(self, table: str, keys: torch.Tensor, vectors: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        spec = self.spec(table)
        keys = check_keys(keys)
        vecs = check_vectors(spec, keys, vectors).cpu().numpy()
        uniq, last_pos = last_occurrence(keys_to_numpy(keys))
        return uniq, vecs[last_pos]

    def insert(self, table: str, keys: torch.Tensor, vectors: torch.Tensor) -> None:
        """HSET the rows (one pipeline), then trim partitions over capacity; dropped (not retried) if Redis is down."""
        self.insert_many({table: (keys, vectors)})

    def insert_many(self, rows: dict[str, tuple[torch.Tensor, torch.Tensor]], unique: bool = False) -> None:
        """`insert` of several tables in one pipeline (then one trim per table with partitions over capacity).
        unique: no key repeats within a table (skips the de-duplication)."""
        batches = {}
        for table, (keys, vectors) in rows.items():
            if unique:
                k = check_keys(keys)
                uniq, vecs = keys_to_numpy(k), check_vectors(self.spec(table), k, vectors).cpu().numpy()
            else:
                uniq, vecs = self._rows(table, keys, vectors)
            if uniq.size:
                batches[table] = uniq, vecs
        groups = [(t, p, pos) for t, (uniq, _) in batches.items()
                  for p, pos in group_by(partition_of(uniq, self.partitions), self.partitions)]
        if not groups:
            return
        now = time.time()

        def run(client: Any) -> None:
            pipe = client.pipeline(transaction=False)
            for t, p, pos in groups:
                (uniq, vecs), name = batches[t], self._hash(t, p)
                fields = _fields(uniq[pos])
                pipe.hset(name, mapping=dict(zip(fields, (r.tobytes() for r in vecs[pos]))))
                if self.policy == "evict_oldest":
                    pipe.zadd(name + ":t", dict.fromkeys(fields, now))
                pipe.hlen(name)
            replies = pipe.execute()
            sizes = replies[2::3] if self.policy == "evict_oldest" else replies[1::2]
            for table in batches:
                self._trim(client, table, [(p, size) for (t, p, _), size in zip(groups, sizes)
                                           if t == table and size > self.capacity])
            return True

        # A dropped insert is not remembered: the hierarchy inserts only rows Redis just missed,
        # so nothing stale is left behind (and an outage's many fills would flood the dirty set).
        self._guard.call(run)

    def _trim(self, client: Any, table: str, over: list[tuple[int, int]]) -> None:
        """Evict rows of the partitions over capacity down to the target fill."""
        if not over:
            return
        target = int(self.capacity * self.target_fill)
        pipe = client.pipeline(transaction=False)
        for p, size in over:
            name = self._hash(table, p)
            if self.policy == "evict_oldest":
                pipe.zrange(name + ":t", 0, size - target - 1)
            else:
                pipe.hrandfield(name, size - target)
        victims = pipe.execute()
        pipe = client.pipeline(transaction=False)
        for (p, _), fields in zip(over, victims):
            if fields:
                pipe.hdel(self._hash(table, p), *fields)
                if self.policy == "evict_oldest":
                    pipe.zrem(self._hash(table, p) + ":t", *fields)
                self.count(evictions=len(fields))
        pipe.execute()

    def update(self, table: str, keys: torch.Tensor, vectors: torch.Tensor) -> int:
        """Overwrite the rows Redis holds (HMGET to find them, then HSET); returns how many."""
        uniq, rows = self._rows(table, keys, vectors)
        if uniq.size == 0:
            return 0
        groups = group_by(partition_of(uniq, self.partitions), self.partitions)

        def run(client: Any) -> int:
            pipe = client.pipeline(transaction=False)
            for p, pos in groups:
                pipe.hmget(self._hash(table, p), _fields(uniq[pos]))
            held = pipe.execute()
            pipe = client.pipeline(transaction=False)
            written = 0
            for (p, pos), values in zip(groups, held):
                mapping = {f: rows[i].tobytes() for f, i, v in zip(_fields(uniq[pos]), pos.tolist(), values) if v is not None}
                if mapping:
                    pipe.hset(self._hash(table, p), mapping=mapping)
                    written += len(mapping)
            pipe.execute()
            return written

        written = self._guard.call(run)
        if written is None:
            self._guard.write_failed(table, uniq)
            return 0
        return written

    def evict(self, table: str, keys: torch.Tensor) -> int:
        """HDEL the rows; returns how many Redis held (0 when it is down: they are remembered as dirty)."""
        self.spec(table)
        uniq = np.unique(keys_to_numpy(check_keys(keys)))
        if uniq.size == 0:
            return 0
        groups = group_by(partition_of(uniq, self.partitions), self.partitions)

        def run(client: Any) -> int:
            pipe = client.pipeline(transaction=False)
            for p, pos in groups:
                pipe.hdel(self._hash(table, p), *_fields(uniq[pos]))
                if self.policy == "evict_oldest":
                    pipe.zrem(self._hash(table, p) + ":t", *_fields(uniq[pos]))
            replies = pipe.execute()
            return int(sum(replies[:: 2 if self.policy == "evict_oldest" else 1]))

        dropped = self._guard.call(run)
        if dropped is None:
            self._guard.write_failed(table, uniq)
            return 0
        return dropped

    def fill(self, table: str) -> list[int] | None:
        """Rows held in each partition of the table (HLEN), or None when Redis is unavailable."""
        self.spec(table)

        def run(client: Any) -> list[int]:
            pipe = client.pipeline(transaction=False)
            for p in range(self.partitions):
                pipe.hlen(self._hash(table, p))
            return [int(n) for n in pipe.execute()]

        return self._guard.call(run)

    def close(self) -> None:
        """Close the connections."""
        self._guard.close()
