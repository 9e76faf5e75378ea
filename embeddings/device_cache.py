"""The device cache: a fixed-size, set-associative embedding cache held as torch tensors.

Each table gets `num_sets = ceil(capacity_rows / ways)` sets of `ways` slots. A key may live only
in its set, picked by a multiplicative (Fibonacci) hash so that sequential keys spread over sets.
Lookups and inserts are whole-batch torch ops (gather the key's set, compare, scatter), never a
Python loop per key, so they run on the GPU when the tensors are there and on the CPU otherwise.

Replacement within a set, by `policy`:
- `lru`: the slot used longest ago goes first (one tick per lookup/insert batch; ties: lowest way).
- `lfu`: the slot used least often goes first (ties: least recently, then lowest way).
Empty slots are always filled first. Within one insert batch the rows it refreshes are never
evicted by the batch's new keys, and when more new keys map to a set than it has free or
evictable slots, the ones earlier in the batch win.

An empty slot holds its set's `empty` key, one that hashes to another set, so a lookup is a plain
compare with no occupancy mask (with a single set no such key exists: there the key -2^63 marks
empty slots and is never cached).

Memory (`memory_bytes`, exact): per table, with slots = num_sets * ways,
    slots * (4 * dim + 8 [key] + 8 [last use] (+ 8 [use count], lfu only)) + 8 * num_sets [empty key]
    + 4 * dim [default vector] bytes,
see `DeviceCache.bytes_per_table`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from embeddings.tier import TableSpec, Tier, check_keys, check_vectors

logger = logging.getLogger(__name__)

# Knuth's multiplicative constant 2^64 / golden ratio, as a signed int64 (int64 products wrap).
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_INT64_MAX = torch.iinfo(torch.int64).max


def set_of(keys: torch.Tensor, num_sets: int) -> torch.Tensor:
    """The set each key maps to: high 32 bits of key * golden ratio, modulo num_sets. keys: [n] int64."""
    h = keys * _GOLDEN  # wraps modulo 2^64
    return ((h >> 32) & 0xFFFFFFFF) % num_sets


@dataclass
class _Slots:
    """One table's cache arrays; slot i of set s is row s * ways + i."""

    keys: torch.Tensor  # [num_sets, ways] int64, `empty` where the slot is free
    empty: torch.Tensor  # [num_sets, 1] int64, a key that never maps to the set
    last: torch.Tensor  # [num_sets, ways] int64, tick of the last use
    freq: torch.Tensor | None  # [num_sets, ways] int64, uses since insertion (lfu only)
    values: torch.Tensor  # [num_sets * ways, dim] float32
    default: torch.Tensor  # [dim] float32, on the device
    tick: int = 0

    @property
    def num_sets(self) -> int:
        return self.keys.shape[0]

    @property
    def ways(self) -> int:
        return self.keys.shape[1]

    def occupied(self, sets: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """[len(sets), ways] bool: which slots of the sets hold a key."""
        return self.keys[sets] != self.empty[sets]


def empty_keys(num_sets: int) -> torch.Tensor:
    """[num_sets, 1] int64: for each set a key that maps to another set (-2^63 when there is one set)."""
    if num_sets == 1:
        return torch.full((1, 1), torch.iinfo(torch.int64).min, dtype=torch.int64)
    candidates = torch.arange(256)
    where = set_of(candidates, num_sets)
    a, b = candidates[0], candidates[where != where[0]][0]  # two keys in different sets
    sets = torch.arange(num_sets)
    return torch.where(sets == where[0], b, a)[:, None]


class DeviceCache(Tier):
    """Set-associative LRU/LFU cache of embedding rows on one torch device.

    capacity: rows per table (int >= 1), or a fraction (0 < float <= 1) of each table's `rows`.
    ways: slots per set. policy: "lru" or "lfu". device: where the tensors live; default CUDA
    when present, else CPU. Not thread-safe: the ParameterServer serialises calls.
    """

    name = "device"

    def __init__(self, capacity: int | float = 0.2, ways: int = 16,  # noqa: PYI041 (int: rows, float: a fraction)
                 policy: Literal["lru", "lfu"] = "lru", device: torch.device | str | None = None) -> None:
        super().__init__()
        if isinstance(capacity, float) and not 0.0 < capacity <= 1.0:
            raise ValueError(f"capacity={capacity} as a fraction must be in (0, 1]")
        if isinstance(capacity, int) and capacity < 1:
            raise ValueError(f"capacity={capacity} rows must be >= 1")
        if ways < 1:
            raise ValueError(f"ways={ways} must be >= 1")
        if policy not in ("lru", "lfu"):
            raise ValueError(f"policy={policy!r} must be 'lru' or 'lfu'")
        self.capacity, self.ways, self.policy = capacity, ways, policy
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self._slots: dict[str, _Slots] = {}

    def capacity_rows(self, spec: TableSpec) -> int:
        """Rows asked for this table (before rounding up to whole sets)."""
        if isinstance(self.capacity, float):
            if spec.rows is None:
                raise ValueError(f"table {spec.name!r}: a fractional cache capacity needs the table's rows")
            return max(1, math.ceil(self.capacity * spec.rows))
        return self.capacity

    @staticmethod
    def bytes_per_table(num_sets: int, ways: int, dim: int, policy: str) -> int:
        """Exact bytes of one table's cache (the formula of `memory_bytes`)."""
        return num_sets * ways * (4 * dim + 8 + 8 + (8 if policy == "lfu" else 0)) + 8 * num_sets + 4 * dim

    def _zeros(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        # On the CPU numpy's allocation: large arrays get transparent huge pages (fewer TLB misses).
        if self.device.type == "cpu":
            return torch.from_numpy(np.zeros(shape, dtype=np.float32 if dtype == torch.float32 else np.int64))
        return torch.zeros(shape, dtype=dtype, device=self.device)

    def create_table(self, spec: TableSpec) -> None:
        """Allocate the table's sets (a no-op if it exists)."""
        super().create_table(spec)
        if spec.name in self._slots:
            return
        num_sets = math.ceil(self.capacity_rows(spec) / self.ways)
        shape, dev = (num_sets, self.ways), self.device
        empty = empty_keys(num_sets).to(dev)
        keys = self._zeros(shape, torch.int64)
        keys.copy_(empty.expand(shape))
        self._slots[spec.name] = _Slots(
            keys=keys, empty=empty, last=self._zeros(shape, torch.int64),
            freq=self._zeros(shape, torch.int64) if self.policy == "lfu" else None,
            values=self._zeros((num_sets * self.ways, spec.dim), torch.float32),
            default=spec.default.to(dev),
        )
        logger.info("device cache: table %s, %d sets x %d ways on %s, %d bytes", spec.name, num_sets, self.ways,
                    dev, self.bytes_per_table(num_sets, self.ways, spec.dim, self.policy))

    @property
    def memory_bytes(self) -> int:
        """Exact bytes held: the sum of `nbytes` of every table's tensors (see the module docstring)."""
        total = 0
        for s in self._slots.values():
            for t in (s.keys, s.empty, s.last, s.freq, s.values, s.default):
                if t is not None:
                    total += t.nbytes
        return total

    def _slots_of(self, table: str) -> _Slots:
        self.spec(table)  # KeyError naming the table
        return self._slots[table]

    def _find(self, s: _Slots, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Where keys are cached. keys: [n] on the device -> (set [n], found [n] bool, flat slot [n])."""
        sets = set_of(keys, s.num_sets)  # [n]
        # index_select: several times faster than advanced indexing on the CPU
        match = s.keys.index_select(0, sets) == keys[:, None]  # [n, ways]; empty slots never match
        found, way = match.view(torch.uint8).max(dim=1)  # a key is in at most one way
        found = found.view(torch.bool)
        if s.num_sets == 1:
            found &= keys != s.empty[0, 0]
        return sets, found, sets * s.ways + way

    def _empty(self, n: int, dim: int) -> torch.Tensor:
        """A fresh [n, dim] float32 output; on the CPU from numpy, whose allocator avoids torch's page-faulting one."""
        if self.device.type == "cpu":
            return torch.from_numpy(np.empty((n, dim), dtype=np.float32))
        return torch.empty(n, dim, dtype=torch.float32, device=self.device)

    def _touch(self, s: _Slots, flat: torch.Tensor) -> None:
        """Record a use of the slots (duplicates count once: gather, add, scatter)."""
        s.last.view(-1).index_fill_(0, flat, s.tick)
        if s.freq is not None:
            freq = s.freq.view(-1)
            freq.index_copy_(0, flat, freq.index_select(0, flat) + 1)  # duplicates write the same value

    def lookup(self, table: str, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached rows: vectors [n, dim] and found [n], on the cache's device. Hits count as uses."""
        s = self._slots_of(table)
        keys = check_keys(keys).to(self.device)
        s.tick += 1
        _, found, flat = self._find(s, keys)
        vectors = torch.index_select(s.values, 0, flat, out=self._empty(keys.numel(), s.values.shape[1]))  # [n, dim]
        hits = int(found.sum())
        if hits < keys.numel():
            vectors[~found] = s.default
            self._touch(s, flat.index_select(0, torch.nonzero(found).squeeze(1)))
        else:
            self._touch(s, flat)
        self.count(hits=hits, misses=keys.numel() - hits)
        return vectors, found

    def contains(self, table: str, keys: torch.Tensor) -> torch.Tensor:
        """found [n] bool on the device: which keys are cached (not a use, not counted)."""
        return self._find(self._slots_of(table), check_keys(keys).to(self.device))[1]

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
        s = self._slots_of(table)
        keys = check_keys(keys)
        vectors = check_vectors(self.spec(table), keys, vectors)
        if keys.numel() == 0:
            return
        keys, vectors = self._dedupe(keys.to(self.device), vectors.to(self.device))
        s.tick += 1
        sets, found, flat = self._find(s, keys)
        # index_select / index_copy_ throughout: advanced indexing is several times slower on the CPU.
        # Refresh the rows already cached; the batch may not evict them.
        hit = torch.nonzero(found).squeeze(1)
        hit_flat = flat.index_select(0, hit)  # unique: the keys are
        s.values.index_copy_(0, hit_flat, vectors.index_select(0, hit))
        self._touch(s, hit_flat)
        # The refreshed slots are exactly those whose last use is this call's tick (ticks only grow), so the
        # protected mask is read off the touched sets below: no O(capacity) mask per call.
        new = ~found
        if s.num_sets == 1:
            new &= keys != s.empty[0, 0]  # the empty marker cannot be cached
        idx = torch.nonzero(new).squeeze(1)  # [m] positions of the new keys in the batch
        if idx.numel() == 0:
            return
        # Group the new keys by set, keeping batch order within a set; rank = position in its group.
        nsets = sets.index_select(0, idx)
        order = torch.argsort(nsets, stable=True)
        idx, nsets = idx.index_select(0, order), nsets.index_select(0, order)
        touched, counts = torch.unique_consecutive(nsets, return_counts=True)  # [t], [t]
        group = torch.repeat_interleave(torch.arange(touched.numel(), device=self.device), counts)  # [m]
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(idx.numel(), device=self.device) - starts.index_select(0, group)  # [m]
        # Victim order per touched set: empty first, then by policy score; protected slots never.
        score = s.last.index_select(0, touched)  # [t, ways]
        prot = score == s.tick  # [t, ways] slots this batch refreshed
        if s.freq is not None:
            score = (s.freq.index_select(0, touched).clamp(max=(1 << 22) - 1) << 40) | score
        occupied = s.keys.index_select(0, touched) != s.empty.index_select(0, touched)
        score = torch.where(occupied, score, torch.full_like(score, -1))
        score = torch.where(prot, torch.full_like(score, _INT64_MAX), score)
        victims = torch.sort(score, dim=1, stable=True).indices  # [t, ways]
        room = self.ways - prot.sum(dim=1)  # [t]
        ok = torch.nonzero(rank < room.index_select(0, group)).squeeze(1)  # [k] new keys that get a slot
        group, rank, src = group.index_select(0, ok), rank.index_select(0, ok), idx.index_select(0, ok)
        dsets = nsets.index_select(0, ok)
        dest = dsets * self.ways + victims.view(-1).index_select(0, group * self.ways + rank)  # [k] flat slots
        evicted = int((s.keys.view(-1).index_select(0, dest) != s.empty.view(-1).index_select(0, dsets)).sum())
        s.keys.view(-1).index_copy_(0, dest, keys.index_select(0, src))
        s.values.index_copy_(0, dest, vectors.index_select(0, src))
        s.last.view(-1).index_fill_(0, dest, s.tick)
        if s.freq is not None:
            s.freq.view(-1).index_fill_(0, dest, 1)
        self.count(evictions=evicted)

    def update(self, table: str, keys: torch.Tensor, vectors: torch.Tensor) -> int:
        """Refresh the rows that are cached (not a use); return how many were."""
        s = self._slots_of(table)
        keys = check_keys(keys)
        vectors = check_vectors(self.spec(table), keys, vectors)
        if keys.numel() == 0:
            return 0
        keys, vectors = self._dedupe(keys.to(self.device), vectors.to(self.device))
        _, found, flat = self._find(s, keys)
        s.values[flat[found]] = vectors[found]
        return int(found.sum())

    def evict(self, table: str, keys: torch.Tensor) -> int:
        """Drop the cached rows of keys; return how many were cached."""
        s = self._slots_of(table)
        keys = torch.unique(check_keys(keys).to(self.device))
        sets, found, flat = self._find(s, keys)
        s.keys.view(-1)[flat[found]] = s.empty[sets[found], 0]
        return int(found.sum())

    def cached_keys(self, table: str) -> torch.Tensor:
        """All keys cached for the table, sorted ([k] int64 on the CPU); for tests and inspection."""
        s = self._slots_of(table)
        return torch.sort(s.keys[s.occupied()].cpu()).values

    def clear(self, table: str) -> None:
        """Empty the table's cache."""
        s = self._slots_of(table)
        s.keys.copy_(s.empty.expand_as(s.keys))
