"""Online updates from a Redis stream, applied through `ParameterServer.update`.

One stream entry is one update of one table (embeddings/stream_format.py: the fields, and how a trainer writes them).

Delivery is at least once, through a consumer group: XREADGROUP, apply (persistent tier first, fsynced),
then XACK. The entries of one read are applied as one update per table (one fsync, not one per entry) and
acknowledged with one XACK. A consumer that dies between the two leaves the entry pending; at start (and every
`claim_idle_ms`) the consumer takes over entries other consumers left pending that long (XAUTOCLAIM) and
re-reads its own pending entries before new ones, so every entry is applied at least once, in stream order
for one consumer. Re-applying an update writes the same rows again, so a redelivery is harmless.

Order per key: an entry never writes a key over a newer value this replica holds for it. A key written here over
HTTP is held until its own entry is published, then as new as that entry; a key an entry wrote is as new as that
entry, for `2 * claim_idle_ms` + 60 s. So this replica's own entries replayed after its newer local writes, and
another consumer's entry claimed after newer ones were applied, leave the newer value (both wrote an older one
back: values went backwards, and a claimed entry's stayed). An entry read while one of its keys is held waits,
unacknowledged, until the hold ends (one local write and one XADD): whether it is older or newer than the held
write is only known once that write's entry id is. When the group has to be created again (the stream was
deleted, or Redis came back empty), ids may start over lower, so the orders remembered are forgotten.

An entry that can never apply (missing field, unknown table, sizes that do not match the table's dim) is logged,
counted as `rejected`, copied to `<stream>:rejected` (trimmed to about REJECTED_MAXLEN entries) with
`turboserve:reason` and `turboserve:id` fields, and acknowledged. The rows of a read are written (and settled) in
slices of at most `max_keys` keys: each slice holds the lookups' lock, and one huge write would stall every lookup.
An update that fails otherwise (the persistent tier raised) is not acknowledged: it is retried after a
backoff. When Redis goes away the consumer backs off (doubling from `backoff_s` to `max_backoff_s`),
reconnects, and re-creates the group if Redis came back empty; it never exits until `stop()`.

Replicas (fan-out): a consumer group hands each entry to ONE of its consumers, so replicas that must all
apply every update (each has its own RocksDB copy and device cache) each read in their own group: the
group name is a template, `{consumer}` and `{hostname}` filled in (`"turboserve-{consumer}"` with the pod
name as the consumer). `UpdateConsumer.publish` XADDs an update taken over HTTP to the same stream, after
the answering replica wrote it, so the other replicas apply it too; the answering replica re-applies its
own entry in stream order, which is what makes every replica end on the same value (README: Scale-out).
Redis is one tier for all replicas, and a replica that has not applied an entry yet can still put the old
row there (a lookup filling it from its own RocksDB) after a faster replica wrote the new one; so every
applied entry is settled `settle_s` later: the rows Redis and the device cache hold are rewritten from this
replica's RocksDB (`ParameterServer.refresh`), which undoes such a write and anything cached from it.
That alone fails for a replica more than `settle_s` behind (its old rows would land after the settling), so
a replica puts rows into a shared Redis only while it is current: `current()` is true while, within
`block_ms` + CURRENT_MARGIN_S, a read of the stream returned every entry there was (fewer than `batch`) and
they were applied. Behind that, its lookups fill only its device cache and its updates evict the keys from
Redis (ParameterServer.shared_current). A replica can then write an old row into Redis only for an entry
added in the last block_ms + CURRENT_MARGIN_S, which is less than `settle_s` (the default 2 s, against 1.5
s): the replicas that applied it settle it afterwards.
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
from collections import deque
from typing import Any

import numpy as np
import redis
import torch

from embeddings.hierarchy import ParameterServer
from embeddings.key_order import KeyOrder, entry_order
from embeddings.stream_format import RejectedUpdate, decode_update, encode_update, group_name
from embeddings.tier import last_occurrence

logger = logging.getLogger(__name__)


CURRENT_MARGIN_S = 0.5  # slack on top of block_ms for a read that returned everything to count as recent
#                        (a busy host can delay the consumer thread; 1.5 s in all by default, under settle_s's 2 s)
HELD_RETRY_S = 0.005  # how soon an entry waiting on a held key is read again (a hold is one write and one XADD)
REJECTED_MAXLEN = 10_000  # about this many entries are kept in `<stream>:rejected` (MAXLEN ~)


class UpdateConsumer:
    """A background thread applying a Redis stream's updates to a ParameterServer (see the module docstring).

    url: the Redis holding the stream. stream, consumer: names (consumer defaults to the host name, so a
    restarted server finds its own pending entries). group: the consumer group, a `group_name` template.
    batch: most entries per read. block_ms: how long one read waits for new entries. claim_idle_ms: pending
    entries idle this long are taken over from other consumers. publishes: whether HTTP updates are published
    to the stream (`publish`). maxlen: `publish` trims the stream to about this many entries (None: never).
    settle_s: seconds after applying an entry that its rows are settled (`ParameterServer.refresh`); 0: never.
    max_keys: the most keys written (or settled) at once, each slice under the lookups' lock (None: no limit).
    """

    MAX_SETTLING = 100_000  # writes (a table of one read) waiting to settle; older ones are dropped past this (counted)

    def __init__(self, server: ParameterServer, url: str, stream: str, group: str = "turboserve",
                 consumer: str | None = None, batch: int = 64, block_ms: int = 1000, claim_idle_ms: int = 30_000,
                 backoff_s: float = 0.1, max_backoff_s: float = 5.0, publishes: bool = True,
                 maxlen: int | None = None, settle_s: float = 2.0, max_keys: int | None = None) -> None:
        if batch < 1 or block_ms < 1 or claim_idle_ms < 0 or (maxlen is not None and maxlen < 1) or settle_s < 0:
            raise ValueError(f"{batch=}, {block_ms=} and {maxlen=} must be >= 1, {claim_idle_ms=} and {settle_s=} >= 0")
        self.server, self.url, self.stream = server, url, stream
        self.consumer = consumer or socket.gethostname()
        self.group = group_name(group, self.consumer)
        self.publishes, self.maxlen, self.settle_s, self.max_keys = publishes, maxlen, settle_s, max_keys
        self._settling: deque[tuple[float, str, torch.Tensor, int]] = deque()  # (due, table, keys, entries), due order
        self._publisher: redis.Redis | None = None  # its own connection pool: the reader's may be dropped any time
        self.batch, self.block_ms, self.claim_idle_ms = batch, block_ms, claim_idle_ms
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self._client: redis.Redis | None = None
        self._own_pending = True  # re-read our own pending entries before new ones
        self._next_claim = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._counts = {"applied": 0, "rows": 0, "rejected": 0, "claimed": 0, "redis_errors": 0, "update_errors": 0,
                        "published": 0, "settled": 0, "settle_dropped": 0, "rows_superseded": 0, "held_waits": 0}
        self.order = KeyOrder(2 * claim_idle_ms / 1000 + 60)  # no older entry writes over a newer value here
        self._caught_up_at = -math.inf  # monotonic time as of which every entry of the stream was applied
        if server.volatile is not None and server.volatile.shared:  # other replicas use it: write only while current
            if settle_s and settle_s <= block_ms / 1000 + CURRENT_MARGIN_S:
                logger.warning("update stream %s: settle_s=%s should exceed block_ms/1000 + %s, or an old row a "
                               "replica wrote just before it saw an entry can outlive the settling",
                               stream, settle_s, CURRENT_MARGIN_S)
            server.shared_current = self.current

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the consumer thread (returns at once; Redis may still be unreachable)."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="embedding-updates", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Ask the thread to stop and wait for it (an entry being applied is finished and acknowledged first)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout if timeout is not None else self.block_ms / 1000 + 10)
        self._drop_client()
        with self._lock:
            publisher, self._publisher = self._publisher, None
        if publisher is not None:
            publisher.close()

    def publish(self, table: str, keys: np.ndarray | list[int], vectors: np.ndarray | list[list[float]]) -> bytes:
        """XADD one update (already written here, its keys held: `order.hold`) for every replica's consumer; returns
        the entry id, the hold ended either way (here, and only here: holds are counted, one release each; a caller
        that was cancelled meanwhile is gone). Raises redis errors: the caller must not report the update as
        propagated."""
        held = [int(k) for k in keys]
        try:
            with self._lock:
                if self._publisher is None:
                    self._publisher = redis.Redis.from_url(self.url, socket_connect_timeout=1.0, socket_timeout=5.0)
                client = self._publisher
            fields = encode_update(table, keys, np.asarray(vectors, dtype=np.float32))
            # approximate trimming (~) costs nothing per XADD; exact MAXLEN would rewrite a macro node each time
            entry_id = client.xadd(self.stream, fields, maxlen=self.maxlen, approximate=True)  # type: ignore[arg-type]
        except BaseException:
            self.order.release(table, held)  # else this replica's consumer waits on the keys
            raise
        self._count(published=1)
        self.order.note(table, held, entry_order(entry_id), published=True)
        return entry_id

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def counters(self) -> dict[str, int]:
        """applied (entries), rows, rejected, claimed, redis_errors, update_errors, published (by `publish`),
        settled (entries whose rows were settled), settle_dropped (entries too many to settle), held_waits (reads
        that stopped at an entry with a held key, to read it again shortly)."""
        with self._lock:
            return dict(self._counts)

    def _count(self, **increments: int) -> None:
        with self._lock:
            for key, value in increments.items():
                self._counts[key] += int(value)

    # -- the loop -----------------------------------------------------------------------------------
    def _run(self) -> None:
        backoff = self.backoff_s
        while not self._stop.is_set():
            try:
                self.step()
                backoff = self.backoff_s
                continue
            except redis.RedisError as exc:
                self._count(redis_errors=1)
                logger.warning("update stream %s: %s: %s; retrying in %.2f s", self.stream, type(exc).__name__, exc, backoff)
                self._drop_client()
            except Exception:  # the update itself failed: leave it pending and retry it
                self._count(update_errors=1)
                logger.exception("update stream %s: applying an update failed; retrying in %.2f s", self.stream, backoff)
                self._own_pending = True
            self._stop.wait(backoff)
            backoff = min(self.max_backoff_s, backoff * 2)

    def current(self) -> bool:
        """Had this replica applied every entry of the stream within the last block_ms + CURRENT_MARGIN_S?"""
        return time.monotonic() - self._caught_up_at <= self.block_ms / 1000 + CURRENT_MARGIN_S

    def step(self) -> int:
        """One read: connect (and set up) if needed, claim stale entries when due, apply what arrives.
        Returns the number of entries handled. Raises redis errors (the loop backs off on them)."""
        client = self._connect()
        if time.monotonic() >= self._next_claim:
            self._claim(client)
        self._settle_due()
        start = "0" if self._own_pending else ">"
        block = self.block_ms
        if self._settling:  # wake up for the next entry to settle
            block = max(1, min(block, int((self._settling[0][0] - time.monotonic()) * 1000) + 1))
        reading_new = not self._own_pending
        # Our own pending entries, and the first new ones, without blocking: a replica knows it is current as
        # soon as it has applied what the stream holds, not a block_ms later.
        waits = reading_new and self._caught_up_at > -math.inf
        reply = client.xreadgroup(self.group, self.consumer, {self.stream: start}, count=self.batch,
                                  block=block if waits else None)
        answered = time.monotonic()  # Redis sent every new entry it had (up to `batch`) just before this
        entries = reply[0][1] if reply else []
        if self._own_pending and not entries:
            self._own_pending = False  # none of ours left pending: read new entries from now on
        handled = self._handle(client, entries)
        if handled < len(entries):
            # One has a held key: it and the entries after it stay pending, read again (in order) once the hold is over.
            self._count(held_waits=1)
            self._own_pending = True
            self._stop.wait(HELD_RETRY_S)
            return handled
        if reading_new and len(entries) < self.batch:  # the read returned all there was, now applied
            self._caught_up_at = answered
        return len(entries)

    def _connect(self) -> redis.Redis:
        if self._client is None:
            # A blocking read must be able to wait block_ms before the socket times out.
            client = redis.Redis.from_url(self.url, socket_connect_timeout=1.0, socket_timeout=self.block_ms / 1000 + 5)
            try:
                client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
                logger.info("update stream %s: created group %s", self.stream, self.group)
                # A stream deleted and added again (or an empty Redis) may number its entries lower than those
                # applied before: their orders would make newer entries look superseded.
                self.order.reset()
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
            self._client, self._own_pending, self._next_claim = client, True, 0.0
            logger.info("update stream %s: consuming as %s/%s", self.stream, self.group, self.consumer)
        return self._client

    def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except redis.RedisError:
                pass

    def _claim(self, client: redis.Redis) -> None:
        """Take over entries other consumers left pending for claim_idle_ms (XAUTOCLAIM), to read them as ours."""
        cursor, claimed = "0-0", 0
        while True:
            # (redis-py drops the cursor of a JUSTID reply, so the entries come back whole; they are re-read below)
            reply = client.xautoclaim(self.stream, self.group, self.consumer, self.claim_idle_ms, start_id=cursor,
                                      count=self.batch)
            cursor = reply[0]
            claimed += len(reply[1])
            if cursor in (b"0-0", "0-0"):
                break
        if claimed:
            self._count(claimed=claimed)
            self._own_pending = True
            logger.info("update stream %s: claimed %d pending entries of stopped consumers", self.stream, claimed)
        self._next_claim = time.monotonic() + max(1.0, self.claim_idle_ms / 1000)

    def _handle(self, client: redis.Redis, entries: list[tuple[bytes, dict[bytes, bytes] | None]]) -> int:
        """Apply entries in stream order, then XACK them; reject the malformed. One update per table for the whole
        read (persistent tier first: one synced write, not one per entry), the rows of a key repeated in several
        entries written as the last one's. Returns how many were handled: up to the first entry with a held key
        (`KeyOrder.held`), left pending with those after it, untouched."""
        dims = {name: spec.dim for name, spec in self.server.tables.items()}
        writes: dict[str, list[tuple[tuple[int, int], np.ndarray, np.ndarray]]] = {}  # table -> (order, keys, vectors)
        acks: list[bytes] = []
        handled = len(entries)
        for i, (entry_id, fields) in enumerate(entries):
            if fields:  # else the entry was deleted from the stream (XDEL/XTRIM) while pending: only acknowledged
                try:
                    table, keys, vectors = decode_update(fields, dims)
                except RejectedUpdate as exc:
                    self._reject(client, entry_id, fields, str(exc))
                    continue
                if self.order.held(table, keys):
                    handled = i
                    break
                order = entry_order(entry_id)
                newer = self.order.superseded(table, keys, order)
                if newer.any():  # written here since (or a newer entry applied): this older value must not win
                    self._count(rows_superseded=int(newer.sum()))
                    keys, vectors = keys[~newer], vectors[~newer]
                writes.setdefault(table, []).append((order, keys, vectors))
            acks.append(entry_id)
        self._write(writes)
        if acks:
            client.xack(self.stream, self.group, *acks)
        return handled

    def _write(self, writes: dict[str, list[tuple[tuple[int, int], np.ndarray, np.ndarray]]]) -> None:
        """Write the entries' rows of each table in one update (entries in stream order: the last row of a key wins),
        note their orders, and queue them to settle."""
        for table, parts in writes.items():
            keys = np.concatenate([k for _, k, _ in parts])  # [n]
            uniq, last = last_occurrence(keys)
            vectors = np.concatenate([v for _, _, v in parts])[last]  # [u, dim]
            for part in self._slices(uniq.size):  # the lookups' lock is let go between slices
                self.server.update(table, torch.from_numpy(uniq[part]), torch.from_numpy(vectors[part]))
            for order, k, _ in parts:
                self.order.note(table, k.tolist(), order)
            self._count(applied=len(parts), rows=keys.size)
            if self.settle_s > 0:
                if len(self._settling) >= self.MAX_SETTLING:
                    self._count(settle_dropped=self._settling.popleft()[3])
                self._settling.append((time.monotonic() + self.settle_s, table, torch.from_numpy(uniq), len(parts)))

    def _slices(self, n: int) -> list[slice]:
        """n rows as slices of at most max_keys: each is written (or settled) under the lookups' lock on its own."""
        step = self.max_keys or max(n, 1)
        return [slice(at, at + step) for at in range(0, n, step)]

    def _settle_due(self) -> None:
        """Settle the entries whose time has come (removed only once settled: a failure retries them)."""
        now = time.monotonic()
        while self._settling and self._settling[0][0] <= now:
            _, table, keys, entries = self._settling[0]
            if table in self.server.tables:
                for part in self._slices(keys.numel()):
                    self.server.refresh(table, keys[part])
            self._settling.popleft()
            self._count(settled=entries)

    def _reject(self, client: redis.Redis, entry_id: bytes, fields: dict[bytes, bytes], reason: str) -> None:
        logger.warning("update stream %s: rejected entry %s: %s", self.stream, entry_id.decode(), reason)
        # our fields prefixed, so that an entry's own `reason` or `id` is kept as it was
        dead: dict[Any, Any] = {**fields, b"turboserve:reason": reason.encode(), b"turboserve:id": entry_id}
        pipe = client.pipeline(transaction=True)
        pipe.xadd(f"{self.stream}:rejected", dead, maxlen=REJECTED_MAXLEN, approximate=True)
        pipe.xack(self.stream, self.group, entry_id)
        pipe.execute()
        self._count(rejected=1)
