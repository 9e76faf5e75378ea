"""The device cache: a fixed-size, set-associative embedding cache held as torch tensors.

Each table gets `num_sets = ceil(capacity_rows / ways)` sets of `ways` slots. The tables of one vector size
share one storage pool (`embeddings/cache_pool.py`: layout, hashing, replacement policies), so
`lookup_many` / `insert_many` over every table of a batch are one op sequence, not one per table; the
single-table calls go through the same path. Lookups and inserts are whole-batch torch ops (gather the
key's set, compare, scatter), never a Python loop per key, so they run on the GPU when the tensors are
there and on the CPU otherwise.

Policies (`policy`): `lru`, `lfu`, `tinylfu` (see cache_pool's docstring). On a CUDA device with CuPy, an
`lru` lookup is one fused kernel (kernels/cache_lookup.py) with the same results as the op sequence, once
the kernel has been checked against its reference on that device (else the op sequence, with an error logged).

Memory (`memory_bytes`, exact): per table, with slots = num_sets * ways,
    slots * (4 * dim + 8 [key] + 8 [last use] (+ 8 [use count], lfu only)) + 8 * num_sets [empty key]
    + 4 * dim [default vector] bytes,
see `DeviceCache.bytes_per_table`; with tinylfu, plus the sketch of each pool (4 rows of int32 counters,
2 per row for each of the pool's slots, rounded up to a power of two: `FrequencySketch.nbytes`).
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import numpy as np
import torch

from embeddings.cache_pool import Located, Pool, set_of
from embeddings.tier import TableSpec, Tier, check_keys, check_vectors, moved_together
from kernels.cache_lookup import cache_lookup
from kernels.cache_lookup import verified as fused_lookup_ok
from kernels.cuda import kernels_on, use_kernels

__all__ = ["DeviceCache", "set_of"]

logger = logging.getLogger(__name__)

Policy = Literal["lru", "lfu", "tinylfu"]


class DeviceCache(Tier):
    """Set-associative LRU/LFU/TinyLFU cache of embedding rows on one torch device.

    capacity: rows per table (int >= 1), or a fraction (0 < float <= 1) of each table's `rows`.
    ways: slots per set. policy: "lru", "lfu" or "tinylfu". device: where the tensors live; default CUDA
    when present, else CPU. fused: on CUDA, look up with the fused kernel when it passed its check (False:
    always the op sequence; for comparisons). Not thread-safe: the ParameterServer serialises calls.
    """

    name = "device"

    def __init__(self, capacity: int | float = 0.2, ways: int = 16,  # noqa: PYI041 (int: rows, float: a fraction)
                 policy: Policy = "lru", device: torch.device | str | None = None, fused: bool = True) -> None:
        super().__init__()
        if isinstance(capacity, float) and not 0.0 < capacity <= 1.0:
            raise ValueError(f"capacity={capacity} as a fraction must be in (0, 1]")
        if isinstance(capacity, int) and capacity < 1:
            raise ValueError(f"capacity={capacity} rows must be >= 1")
        if ways < 1:
            raise ValueError(f"ways={ways} must be >= 1")
        if policy not in ("lru", "lfu", "tinylfu"):
            raise ValueError(f"policy={policy!r} must be 'lru', 'lfu' or 'tinylfu'")
        self.capacity, self.ways, self.policy, self.fused = capacity, ways, policy, fused
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self._pools: dict[int, Pool] = {}  # by dim
        self._where: dict[str, tuple[Pool, int]] = {}  # table -> (its pool, its index there)
        # The fused lookup's per-batch table layout on the device, by (dim, tables, key counts): a batch shaped like
        # an earlier one sends nothing to the device. The kernel adds its hits to a counter on the device (callers may
        # change `found` afterwards: the hierarchy marks rows found lower), read only when the counters are: a read
        # per lookup would stall the host on the device after every batch.
        self._parts: dict[tuple, torch.Tensor] = {}
        self._device_hits = torch.zeros(1, dtype=torch.int64, device=self.device)
        self._device_looked = 0
        if fused and policy == "lru" and kernels_on(self.device):
            # Build and check the fused kernel now, at start-up, not inside the first request's lookup.
            fused_lookup_ok(str(self.device))

    def capacity_rows(self, spec: TableSpec) -> int:
        """Rows asked for this table (before rounding up to whole sets)."""
        if isinstance(self.capacity, float):
            if spec.rows is None:
                raise ValueError(f"table {spec.name!r}: a fractional cache capacity needs the table's rows")
            return max(1, math.ceil(self.capacity * spec.rows))
        return self.capacity

    @staticmethod
    def bytes_per_table(num_sets: int, ways: int, dim: int, policy: str) -> int:
        """Exact bytes of one table's cache (the formula of `memory_bytes`; tinylfu's sketch is per pool)."""
        return num_sets * ways * (4 * dim + 8 + 8 + (8 if policy == "lfu" else 0)) + 8 * num_sets + 4 * dim

    def create_table(self, spec: TableSpec) -> None:
        """Allocate the table's sets (a no-op if it exists)."""
        super().create_table(spec)
        if spec.name in self._where:
            return
        num_sets = math.ceil(self.capacity_rows(spec) / self.ways)
        pool = self._pools.get(spec.dim)
        if pool is None:
            pool = self._pools[spec.dim] = Pool(spec.dim, self.ways, self.policy, self.device)
        self._where[spec.name] = (pool, pool.add_table(num_sets, spec.default))
        self._parts.clear()
        logger.info("device cache: table %s, %d sets x %d ways on %s, %d bytes", spec.name, num_sets, self.ways,
                    self.device, self.bytes_per_table(num_sets, self.ways, spec.dim, self.policy))

    @property
    def memory_bytes(self) -> int:
        """Exact bytes held: the sum of `nbytes` of every pool's tensors (see the module docstring)."""
        return sum(t.nbytes for pool in self._pools.values() for t in pool.tensors())

    def slots(self, table: str) -> int:
        """Slots of the table (its rows rounded up to whole sets)."""
        pool, t = self._table(table)
        return pool.sizes[t] * self.ways

    def _table(self, table: str) -> tuple[Pool, int]:
        self.spec(table)  # KeyError naming the table
        return self._where[table]

    def _by_pool(self, tables: list[str]) -> dict[int, tuple[Pool, list[int], list[str]]]:
        """Tables grouped by pool, in request order: dim -> (pool, table indices, names)."""
        groups: dict[int, tuple[Pool, list[int], list[str]]] = {}
        for table in tables:
            pool, t = self._table(table)
            entry = groups.setdefault(pool.dim, (pool, [], []))
            entry[1].append(t)
            entry[2].append(table)
        return groups

    def _empty(self, n: int, dim: int) -> torch.Tensor:
        """A fresh [n, dim] float32 output; on the CPU from numpy, whose allocator avoids torch's page-faulting one."""
        if self.device.type == "cpu":
            return torch.from_numpy(np.empty((n, dim), dtype=np.float32))
        return torch.empty(n, dim, dtype=torch.float32, device=self.device)

    def lookup(self, table: str, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached rows: vectors [n, dim] and found [n], on the cache's device. Hits count as uses."""
        return self.lookup_many({table: keys})[table]

    def lookup_many(self, requests: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """`lookup` of several tables: one op sequence per pool (vector size), answers as views of one output."""
        checked = dict(zip(requests, moved_together([check_keys(k) for k in requests.values()], self.device)))
        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        hits = misses = 0
        for pool, idx, names in self._by_pool(list(checked)).values():
            keys = [checked[n] for n in names]
            vectors, found, h = self._lookup_pool(pool, idx, keys)
            counts = [k.numel() for k in keys]
            if h is None:  # the fused kernel: its hits were added to the device's counter
                with self._counter_lock:
                    self._device_looked += found.numel()
            else:
                hits, misses = hits + h, misses + sum(counts) - h
            if len(names) == 1:  # one table of this vector size: its answer is the whole output
                out[names[0]] = vectors, found
            else:
                for name, v, f in zip(names, vectors.split(counts), found.split(counts)):
                    out[name] = v, f
        if hits or misses:
            self.count(hits=hits, misses=misses)
        return {t: out[t] for t in requests}

    def counters(self) -> dict[str, int]:
        """The counters, with the fused lookups' hits and misses read from the device."""
        with self._counter_lock:
            out = dict(self._counts)
            device_hits = int(self._device_hits)
            out["hits"] += device_hits
            out["misses"] += self._device_looked - device_hits
        return out

    def _layout(self, pool: Pool, idx: list[int], keys: list[torch.Tensor]) -> torch.Tensor:
        """The fused kernel's `parts` for this batch on the device: cached, else sent from pinned memory, no wait."""
        counts = tuple(k.numel() for k in keys)
        key = (pool.dim, tuple(idx), counts)
        parts = self._parts.get(key)
        if parts is None:
            host = torch.tensor([np.cumsum(counts).tolist(), [pool.bases[t] for t in idx], [pool.sizes[t] for t in idx], idx],
                                dtype=torch.int64)
            if self.device.type == "cuda":
                host = host.pin_memory()
            parts = host.to(self.device, non_blocking=True)
            if len(self._parts) >= 256:
                self._parts.clear()
            self._parts[key] = parts
        return parts

    def _lookup_pool(self, pool: Pool, idx: list[int], keys: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int | None]:
        """Rows [n, dim], found [n] and the number found (None from the fused kernel, which adds it to the device's
        counter), of the keys of tables `idx` of one pool (concatenated); hits count as uses."""
        pool.tick += 1
        if self.fused and pool.policy == "lru" and use_kernels(pool.keys) and fused_lookup_ok(str(self.device)):
            # One kernel instead of ~12 launches: at GPU speed the launches cost more than the bytes. The pool's
            # own tensors skip the entry checks (made once, by the pool); the keys were checked on entry.
            flat_keys = keys[0] if len(keys) == 1 else torch.cat(keys)
            vectors, found, _ = cache_lookup(pool.keys, pool.values, pool.defaults, pool.last, flat_keys,
                                             self._layout(pool, idx, keys), pool.tick, self._device_hits, checked=True)
            return vectors, found, None
        at = pool.locate(idx, keys)
        found, flat = pool.find(at)
        vectors = torch.index_select(pool.values, 0, flat, out=self._empty(at.keys.numel(), pool.dim))  # [n, dim]
        h = int(found.sum())
        if h < at.keys.numel():
            miss = torch.nonzero(~found).squeeze(1)  # [m]
            if len(idx) == 1:
                vectors.index_copy_(0, miss, pool.defaults[idx[0]].expand(miss.numel(), -1))
            else:
                vectors.index_copy_(0, miss, pool.defaults.index_select(0, pool.table_of(at, miss)))
            pool.touch(flat.index_select(0, torch.nonzero(found).squeeze(1)))
        else:
            pool.touch(flat)
        if pool.sketch is not None:
            pool.sketch.add(at.hkeys)
        return vectors, found, h

    def contains(self, table: str, keys: torch.Tensor) -> torch.Tensor:
        """found [n] bool on the device: which keys are cached (not a use, not counted)."""
        pool, t = self._table(table)
        return pool.find(pool.locate([t], [check_keys(keys).to(self.device)]))[0]

    @staticmethod
    def _dedupe(keys: torch.Tensor, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unique keys in order of first occurrence, each with its last occurrence's vector."""
        uniq, inv = torch.unique(keys, return_inverse=True)
        if uniq.numel() == keys.numel():
            return keys, vectors
        pos = torch.arange(keys.numel(), device=keys.device)
        first = torch.full_like(uniq, keys.numel()).scatter_reduce(0, inv, pos, "amin")
        last = torch.full_like(uniq, -1).scatter_reduce(0, inv, pos, "amax")
        order = torch.argsort(first)
        return uniq.index_select(0, order), vectors.index_select(0, last.index_select(0, order))

    def insert(self, table: str, keys: torch.Tensor, vectors: torch.Tensor) -> None:
        """Cache the rows, evicting by policy; a cached key gets the new vector and counts a use."""
        self.insert_many({table: (keys, vectors)})

    def insert_many(self, rows: dict[str, tuple[torch.Tensor, torch.Tensor]], unique: bool = False) -> None:
        """`insert` of several tables: one op sequence per pool. unique: the caller promises no key repeats
        within a table (the ParameterServer's de-duplicated misses), which skips the de-duplication."""
        given = {}
        for table, (keys, vectors) in rows.items():
            keys = check_keys(keys)
            vectors = check_vectors(self.spec(table), keys, vectors)
            if keys.numel():
                given[table] = keys, vectors
        moved = moved_together([x for pair in given.values() for x in pair], self.device)  # one copy per dtype
        checked: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for table, keys, vectors in zip(given, moved[::2], moved[1::2]):
            checked[table] = (keys, vectors) if unique else self._dedupe(keys, vectors)
        evicted = 0
        for pool, idx, names in self._by_pool(list(checked)).values():
            at = pool.locate(idx, [checked[n][0] for n in names])
            vectors = checked[names[0]][1] if len(names) == 1 else torch.cat([checked[n][1] for n in names])
            evicted += pool.insert(at, vectors)[1]
        self.count(evictions=evicted)

    def _locate_one(self, table: str, keys: torch.Tensor) -> tuple[Pool, Located]:
        pool, t = self._table(table)
        return pool, pool.locate([t], [keys.to(self.device)])

    def update(self, table: str, keys: torch.Tensor, vectors: torch.Tensor) -> int:
        """Refresh the rows that are cached (not a use); return how many were."""
        keys = check_keys(keys)
        vectors = check_vectors(self.spec(table), keys, vectors)
        if keys.numel() == 0:
            return 0
        keys, vectors = self._dedupe(keys.to(self.device), vectors.to(self.device))
        pool, at = self._locate_one(table, keys)
        found, flat = pool.find(at)
        hit = torch.nonzero(found).squeeze(1)
        pool.values.index_copy_(0, flat.index_select(0, hit), vectors.index_select(0, hit))
        return hit.numel()

    def evict(self, table: str, keys: torch.Tensor) -> int:
        """Drop the cached rows of keys; return how many were cached."""
        pool, at = self._locate_one(table, torch.unique(check_keys(keys).to(self.device)))
        found, flat = pool.find(at)
        pool.keys.view(-1)[flat[found]] = pool.empty[at.sets[found], 0]
        return int(found.sum())

    def cached_keys(self, table: str) -> torch.Tensor:
        """All keys cached for the table, sorted ([k] int64 on the CPU); for tests and inspection."""
        pool, t = self._table(table)
        keys = pool.keys[pool.region(t)]
        return torch.sort(keys[keys != pool.empty[pool.region(t)]].cpu()).values

    def clear(self, table: str) -> None:
        """Empty the table's cache."""
        pool, t = self._table(table)
        pool.keys[pool.region(t)] = pool.empty[pool.region(t)].expand(-1, self.ways)
