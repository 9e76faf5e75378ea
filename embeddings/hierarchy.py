"""The lookup hierarchy: device cache -> volatile tier -> persistent tier -> default vector.

`ParameterServer.lookup(table, keys)` de-duplicates the batch's keys, answers what the device
cache holds, asks the volatile tier (memory or Redis) for the rest, then the persistent tier,
and answers the table's default vector for keys no tier holds. Rows found lower are inserted
upward (persistent hits into the volatile tier, every fetched row into the device cache).
`lookup_many` (a DLRM batch: every table at once) asks each tier once for all the tables
(`Tier.lookup_many` / `insert_many`: one op sequence in the device cache, one pass in the volatile
tier; RocksDB has no multi-get across column families, so one multi-get per table with misses),
so a batch of 26 tables costs a handful of tier calls, not 26 times as many; `lookup` is a
`lookup_many` of one table.

`preload` fills the volatile tier from RocksDB before serving (embeddings.volatile_preload, HPS's
initial cache rate), so that lookups of tables that fit in memory never wait on RocksDB.

High-hit-rate mode (`async_defaults=True`, off by default; HPS's behaviour): when the device
cache answers more than `hit_rate_threshold` of a batch's unique keys, the batch's misses are
answered with the table's default vector at once and fetched into the cache by a background
thread. Every default served that way is counted in `defaults_async`; defaults for keys no tier
holds are counted in `defaults_missing`. Below the threshold, misses are fetched synchronously.

Updates (`update`) write the persistent tier first (fsynced: an acknowledged update survives a
crash), then the rows the volatile tier holds, then refresh (or, with `refresh_on_update=False`,
invalidate) the rows the device cache holds, so the next lookup sees the new value.

A volatile tier shared by replicas (Redis) may only receive rows this replica knows to be current:
`shared_current` (set by the update-stream consumer, embeddings/stream.py) says whether this replica had
applied every update in the stream a moment ago. While it is not, rows read from its own RocksDB are not
filled into the shared tier (they may predate an update other replicas applied), its updates and refreshes
evict the keys from the shared tier instead of writing them (a later fill by a current replica puts the
right row back), and counts `volatile_fills_skipped`.

One lock serialises lookups, updates and the background fetches, so a background fetch can
never write a row older than an update that came before it into a cache.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections.abc import Callable

import numpy as np
import torch

from embeddings.device_cache import DeviceCache
from embeddings.persistent import PersistentTier
from embeddings.tier import TableSpec, Tier, check_keys, check_vectors, moved_together

logger = logging.getLogger(__name__)


class ParameterServer:
    """Embedding rows of named tables, looked up through a hierarchy of tiers.

    persistent: the source of truth (required). volatile: an in-memory or Redis tier, or None.
    device_cache: a DeviceCache, or None. async_defaults, hit_rate_threshold: high-hit-rate mode
    (see the module docstring). refresh_on_update: refresh cached rows on update (else evict them).
    max_pending: most background fetch batches queued; more are dropped (and counted).
    """

    def __init__(self, persistent: PersistentTier, volatile: Tier | None = None, device_cache: DeviceCache | None = None,
                 async_defaults: bool = False, hit_rate_threshold: float = 0.9, refresh_on_update: bool = True,
                 max_pending: int = 64) -> None:
        if not 0.0 <= hit_rate_threshold <= 1.0:
            raise ValueError(f"hit_rate_threshold={hit_rate_threshold} must be in [0, 1]")
        self.persistent, self.volatile, self.device_cache = persistent, volatile, device_cache
        self.async_defaults, self.hit_rate_threshold = async_defaults, hit_rate_threshold
        self.refresh_on_update = refresh_on_update
        # None: the volatile tier is this replica's own. Else: may rows go into the shared tier now?
        self.shared_current: Callable[[], bool] | None = None
        self.device = device_cache.device if device_cache is not None else torch.device("cpu")
        self._lock = threading.RLock()
        self._counts = {"keys": 0, "unique_keys": 0, "defaults_async": 0, "defaults_missing": 0,
                        "background_fetched": 0, "background_dropped": 0, "volatile_fills_skipped": 0,
                        "volatile_preloaded": 0}
        self._pending: queue.Queue[tuple[str, torch.Tensor] | None] = queue.Queue(maxsize=max_pending)
        self._worker: threading.Thread | None = None
        for spec in persistent.tables.values():
            self._register(spec)

    @property
    def tiers(self) -> list[Tier]:
        """The tiers present, top (device) to bottom (persistent)."""
        return [t for t in (self.device_cache, self.volatile, self.persistent) if t is not None]

    @property
    def tables(self) -> dict[str, TableSpec]:
        """Every table, by name (the persistent tier's record)."""
        return dict(self.persistent.tables)

    def _register(self, spec: TableSpec) -> None:
        for tier in (self.device_cache, self.volatile):
            if tier is not None:
                tier.create_table(spec)

    def create_table(self, name: str, dim: int, default: torch.Tensor | None = None, rows: int | None = None) -> TableSpec:
        """Create a table in every tier; a table the persistent tier already stores keeps its stored dim and default."""
        with self._lock:
            self.persistent.create_table(TableSpec(name, dim, default, rows))
            spec = self.persistent.tables[name]
            self._register(spec)
            return spec

    def lookup(self, table: str, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of keys: vectors [n, dim] float32 on the cache's device, found [n] bool (False: default served)."""
        return self.lookup_many({table: keys})[table]

    def lookup_many(self, requests: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """`lookup` of several tables at once (a DLRM batch: one request per table), each answer as `lookup`'s.

        Every table and key tensor is checked before any tier is asked; the lock is taken once and the
        server's counters are updated once for the whole call."""
        out = {}
        for table, (_, inverse, vectors, found) in self._lookup_distinct(requests, inverse=True).items():
            inverse = inverse.to(self.device)
            out[table] = vectors.index_select(0, inverse), found.index_select(0, inverse)  # [n, dim], [n]
        return out

    def lookup_distinct(self, requests: dict[str, torch.Tensor],
                        asked: dict[str, int] | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """As `lookup_many`, answered per distinct key: for each table (uniq [u] sorted, as `torch.unique`,
        vectors [u, dim], found [u]). asked: the caller de-duplicated the keys itself (models/dlrm.py does, to pool
        them): each table's keys are taken as distinct, answered in their order, and asked[table] keys are counted
        as looked up (the server's `keys` counter counts keys before de-duplication)."""
        return {t: (uniq, vectors, found)
                for t, (uniq, _, vectors, found) in self._lookup_distinct(requests, asked=asked).items()}

    def _lookup_distinct(self, requests: dict[str, torch.Tensor], inverse: bool = False,
                         asked: dict[str, int] | None = None) -> dict[str, tuple]:
        checked = {}
        for table, keys in requests.items():
            keys = check_keys(keys).cpu()
            spec = self.persistent.spec(table)  # KeyError naming an unknown table, before any work
            if asked is not None:
                checked[table] = (spec, asked.get(table, keys.numel()), keys, None)
                continue
            uniq, inv = torch.unique(keys, return_inverse=True) if inverse else (torch.unique(keys), None)
            checked[table] = (spec, keys.numel(), uniq, inv)  # uniq: [u], inv: [n]
        totals = {"keys": 0, "unique_keys": 0, "defaults_async": 0, "defaults_missing": 0}
        for spec, n, uniq, inv in checked.values():
            totals["keys"] += n
            totals["unique_keys"] += uniq.numel()
        with self._lock:
            rows = self._lookup_unique({t: uniq for t, (_, _, uniq, _) in checked.items()}, totals)
            self._count(**totals)
        return {t: (uniq, inv, *rows[t]) for t, (_, _, uniq, inv) in checked.items()}

    def _lookup_unique(self, uniqs: dict[str, torch.Tensor],
                       totals: dict[str, int]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Rows of each table's unique keys uniq [u] (CPU): vectors [u, dim], found [u] on the device, each tier
        asked once for every table together; adds to totals. Lock held."""
        if self.device_cache is not None:
            answers = self.device_cache.lookup_many(uniqs)  # table -> ([u, dim], [u]) on the device
        else:
            answers = {t: (self.persistent.defaults(t, u.numel(), self.device),
                           torch.zeros(u.numel(), dtype=torch.bool, device=self.device)) for t, u in uniqs.items()}
        misses = {}  # table -> [m] positions in uniq
        cpu = torch.device("cpu")
        for (table, uniq), found in zip(uniqs.items(), moved_together([answers[t][1] for t in uniqs], cpu)):
            miss = torch.nonzero(~found).squeeze(1)
            if not miss.numel():
                continue
            hit_rate = 1.0 - miss.numel() / max(1, uniq.numel())
            if self.async_defaults and self.device_cache is not None and hit_rate > self.hit_rate_threshold:
                totals["defaults_async"] += miss.numel()
                self._enqueue(table, uniq.index_select(0, miss))
            else:
                misses[table] = miss
        if misses:
            fetched = self._fetch({t: uniqs[t].index_select(0, m) for t, m in misses.items()})  # CPU
            parts = []  # the rows found lower and their positions in uniq, every table's moved to the device at once
            for table, miss in misses.items():
                got_vectors, got = fetched[table]  # [m, dim], [m]
                got_idx = torch.nonzero(got).squeeze(1)
                parts += [miss.index_select(0, got_idx), got_vectors.index_select(0, got_idx)]
                totals["defaults_missing"] += miss.numel() - got_idx.numel()
            moved = moved_together(parts, self.device)
            for table, hit, rows in zip(misses, moved[::2], moved[1::2]):
                vectors, found = answers[table]
                vectors.index_copy_(0, hit, rows)
                found.index_fill_(0, hit, True)
        return answers

    def _fetch(self, requests: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Rows below the device cache (volatile, then persistent), inserted upward; one call per tier for every
        table (the persistent tier: one multi-get per table). requests: table -> keys [m] unique, CPU."""
        if self.volatile is not None:
            answers = self.volatile.lookup_many(requests)  # table -> ([m, dim], [m])
        else:
            answers = {t: (torch.empty(k.numel(), self.persistent.spec(t).dim), torch.zeros(k.numel(), dtype=torch.bool))
                       for t, k in requests.items()}
        lower = {t: torch.nonzero(~found).squeeze(1) for t, (_, found) in answers.items()}
        lower = {t: idx for t, idx in lower.items() if idx.numel()}
        promote = {}
        for table, idx in lower.items():
            vectors, found = answers[table]
            lower_keys = requests[table].index_select(0, idx)
            p_vectors, p_found = self.persistent.lookup(table, lower_keys)
            vectors.index_copy_(0, idx, p_vectors)
            found.index_copy_(0, idx, p_found)
            if bool(p_found.any()):
                promote[table] = lower_keys[p_found], p_vectors[p_found]
        if self.volatile is not None and promote:
            if self._volatile_writable():
                self.volatile.insert_many(promote, unique=True)
            else:
                self._count(volatile_fills_skipped=sum(k.numel() for k, _ in promote.values()))
        if self.device_cache is not None:
            held = {t: torch.nonzero(found).squeeze(1) for t, (_, found) in answers.items()}
            rows = {t: (requests[t].index_select(0, h), answers[t][0].index_select(0, h)) for t, h in held.items() if h.numel()}
            if rows:
                self.device_cache.insert_many(rows, unique=True)
        return answers

    def _enqueue(self, table: str, keys: torch.Tensor) -> None:
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._background, name="embedding-fetch", daemon=True)
            self._worker.start()
        try:
            self._pending.put_nowait((table, keys))
        except queue.Full:
            self._count(background_dropped=keys.numel())

    def _background(self) -> None:
        """The background fetcher: fetch queued misses into the caches until a None arrives."""
        while True:
            item = self._pending.get()
            try:
                if item is None:
                    return
                table, keys = item
                with self._lock:
                    # another batch may have fetched some of them meanwhile
                    if self.device_cache is not None:
                        keys = keys[~self.device_cache.contains(table, keys).cpu()]
                    if keys.numel():
                        self._fetch({table: keys})
                    self._count(background_fetched=keys.numel())
            except Exception:  # a failed background fetch must not kill the fetcher
                logger.exception("embedding background fetch failed")
            finally:
                self._pending.task_done()

    def drain(self) -> None:
        """Wait until every queued background fetch is done."""
        self._pending.join()

    def preload(self, fraction: float, chunk: int = 1 << 16, progress: Callable[[int], None] | None = None) -> dict[str, int]:
        """Fill the volatile tier from the persistent tier (HPS's initial cache rate), before serving: each table's
        first `fraction` of its rows (TableSpec.rows, else RocksDB's estimate) in key order, at most what the tier
        holds at its target fill (a load past it would evict its own rows). Returns the rows loaded per table;
        progress(n) is called after each chunk of n rows.

        Each chunk is read and inserted under the lock, so an update lands before or after a chunk, never between
        its read and its insert: no row loaded is older than an update. A shared tier this replica is behind
        (`shared_current`) is not filled."""
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"preload fraction={fraction} must be in [0, 1]")
        if self.volatile is None or fraction == 0.0:
            return {}
        if not self._volatile_writable():
            logger.warning("volatile tier not preloaded: this replica is behind the shared tier's update stream")
            return {}
        room = getattr(self.volatile, "partitions", 1) * getattr(self.volatile, "capacity", 1 << 62)
        room = int(room * getattr(self.volatile, "target_fill", 1.0))
        loaded = {}
        for table, spec in self.tables.items():
            if spec.rows is None and fraction == 1.0:
                want = room  # every stored row the tier can hold (the table's size is not recorded)
            else:
                rows = spec.rows if spec.rows is not None else self.persistent.estimated_rows(table)
                want = min(room, math.ceil(fraction * rows))
            start: int | None = None
            loaded[table] = 0
            while loaded[table] < want:
                with self._lock:
                    keys, vectors = self.persistent.scan(table, start, min(chunk, want - loaded[table]))
                    if keys.size:
                        self.volatile.insert_many({table: (torch.from_numpy(keys), torch.from_numpy(vectors))}, unique=True)
                loaded[table] += int(keys.size)
                if progress is not None and keys.size:
                    progress(int(keys.size))
                if keys.size < chunk or keys[-1] == np.iinfo(np.int64).max:
                    break
                start = int(keys[-1]) + 1
        self._count(volatile_preloaded=sum(loaded.values()))
        return loaded

    def update(self, table: str, keys: torch.Tensor, vectors: torch.Tensor, sync: bool | None = None) -> None:
        """Write rows: persistent first (fsynced unless sync=False), then volatile, then the device cache."""
        keys = check_keys(keys).cpu()
        vectors = check_vectors(self.persistent.spec(table), keys, vectors).cpu()
        with self._lock:
            self.persistent.update(table, keys, vectors, sync=sync)
            self._write_volatile(table, keys, vectors)
            if self.device_cache is not None:
                if self.refresh_on_update:
                    self.device_cache.update(table, keys, vectors)
                else:
                    self.device_cache.evict(table, keys)

    def refresh(self, table: str, keys: torch.Tensor) -> int:
        """Rewrite the rows of keys that the volatile tier and the device cache hold with the persistent tier's;
        returns how many keys the persistent tier has. Replicas sharing a Redis tier call it a little after an
        update (embeddings/stream.py) to undo an older row another replica wrote there meanwhile."""
        keys = check_keys(keys).cpu()
        with self._lock:  # the rows read and the rows written are the same version: no update in between
            vectors, found = self.persistent.read(table, keys)  # not a lookup: not counted as hits
            keys, vectors = keys[found], vectors[found]
            if keys.numel():
                self._write_volatile(table, keys, vectors)
                if self.device_cache is not None:
                    self.device_cache.update(table, keys, vectors)
            return int(keys.numel())

    def _write_volatile(self, table: str, keys: torch.Tensor, vectors: torch.Tensor) -> None:
        """Rewrite the rows the volatile tier holds; while this replica is behind a shared tier's update
        stream, drop them instead (a newer row may be there: never overwrite it with an older one)."""
        if self.volatile is None:
            return
        if self._volatile_writable():
            self.volatile.update(table, keys, vectors)
        else:
            self.volatile.evict(table, keys)

    def _volatile_writable(self) -> bool:
        """May rows from this replica go into the volatile tier now (always, unless it is shared and this
        replica is behind the update stream)?"""
        return self.shared_current is None or self.shared_current()

    def delete(self, table: str, keys: torch.Tensor) -> None:
        """Remove rows from every tier (later lookups answer the default vector)."""
        keys = check_keys(keys).cpu()
        with self._lock:
            self.persistent.evict(table, keys)
            for tier in (self.volatile, self.device_cache):
                if tier is not None:
                    tier.evict(table, keys)

    def _count(self, **increments: int) -> None:
        for key, value in increments.items():
            self._counts[key] += int(value)

    def stats(self) -> dict[str, dict[str, int]]:
        """Counters by tier name (hits, misses, errors, evictions, ...) and under "server" the hierarchy's own."""
        out = {tier.name: tier.counters() for tier in self.tiers}
        with self._lock:
            out["server"] = dict(self._counts)
        return out

    def close(self) -> None:
        """Stop the background fetcher and close every tier."""
        if self._worker is not None and self._worker.is_alive():
            self._pending.put(None)
            self._worker.join()
        for tier in self.tiers:
            tier.close()


class ServerLookup:
    """The DLRM's lookup (models/dlrm.py) through a ParameterServer: `many` answers every table of a batch in one
    `lookup_distinct` of the keys the model de-duplicated (each tier asked once for all the tables); a call of
    one table is a `lookup`."""

    def __init__(self, ps: ParameterServer) -> None:
        self.ps = ps

    def __call__(self, table: str, keys: torch.Tensor) -> torch.Tensor:
        return self.ps.lookup(table, keys)[0]

    def many(self, queries: dict[str, torch.Tensor], asked: dict[str, int]) -> dict[str, torch.Tensor]:
        """Rows [u, dim] of each table's distinct keys [u]; asked: the keys before de-duplication, per table."""
        return {t: vectors for t, (_, vectors, _) in self.ps.lookup_distinct(queries, asked=asked).items()}
