"""The volatile tier in this process's memory: partitioned hash maps with a capacity and an overflow policy.

Each table is split into `partitions` partitions by a multiplicative hash of the key. A partition
is a dict (key -> slot) over numpy slabs (`vectors [slots, dim]`, `keys`, `uses`, `last`), grown by
doubling up to `capacity` rows. The per-key work is one dict probe; gathering and scattering the
rows is vectorised numpy. `lookup_many` / `insert_many` take every table of a batch in one pass: one
C-level loop of dict probes over all keys, then the row writes per (table, partition) with keys.

Overflow: when an insert would take a partition past `capacity`, rows are evicted first, down to
`target_fill * capacity` (so overflow work is amortised over many inserts), chosen by policy:
- `evict_random`: uniformly at random (seeded);
- `evict_least_used`: fewest lookup hits since insertion first (ties: least recently used);
- `evict_oldest`: least recently used first (last insert or lookup hit; HugeCTR's "oldest").
Rows written by the same insert batch are never its victims. If one batch brings more new rows
than a partition holds, the last `capacity` of them are kept.
"""

from __future__ import annotations

import logging
from itertools import repeat
from typing import Literal

import numpy as np
import torch

from embeddings.tier import TableSpec, Tier, check_keys, check_vectors, keys_to_numpy, last_occurrence

logger = logging.getLogger(__name__)

OverflowPolicy = Literal["evict_random", "evict_least_used", "evict_oldest"]
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def partition_of(keys: np.ndarray, partitions: int) -> np.ndarray:
    """Partition of each key: bits 40..63 of key * golden ratio, modulo partitions. keys: [n] int64."""
    with np.errstate(over="ignore"):
        h = keys.astype(np.uint64, copy=False) * _GOLDEN
    return ((h >> np.uint64(40)) % np.uint64(partitions)).astype(np.int64)


def group_by(part: np.ndarray, partitions: int) -> list[tuple[int, np.ndarray]]:
    """(partition, batch positions in it) for each partition present, positions in batch order."""
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(partitions + 1))
    return [(p, order[bounds[p]:bounds[p + 1]]) for p in range(partitions) if bounds[p + 1] > bounds[p]]


class _Partition:
    """One partition's rows: a dict key -> slot over numpy slabs."""

    def __init__(self, dim: int, capacity: int) -> None:
        self.capacity = capacity
        self.index: dict[int, int] = {}
        n = min(capacity, 1024)
        self.vectors = np.zeros((n, dim), dtype=np.float32)  # [slots, dim]
        self.keys = np.zeros(n, dtype=np.int64)  # [slots]
        self.uses = np.zeros(n, dtype=np.int64)  # [slots] lookup hits since insertion
        self.last = np.zeros(n, dtype=np.int64)  # [slots] tick of the last insert or hit
        self.free: list[int] = []  # freed slots below `fresh`
        self.fresh = 0  # slots from here on were never used

    def slots_of(self, keys: list[int]) -> np.ndarray:
        """Slot of each key, -1 where absent."""
        get = self.index.get
        return np.fromiter((get(k, -1) for k in keys), dtype=np.int64, count=len(keys))

    def take(self, n: int) -> np.ndarray | slice:
        """n free slots (freed ones first, then never used ones), growing the slabs within capacity; a slice when
        they are all never used ones (contiguous: slice writes are cheaper than scattered ones)."""
        reused = self.free[len(self.free) - min(n, len(self.free)):]
        del self.free[len(self.free) - len(reused):]
        extra = n - len(reused)
        if self.fresh + extra > self.keys.size:
            self._grow(min(self.capacity, max(2 * self.keys.size, self.fresh + extra)))
        start, self.fresh = self.fresh, self.fresh + extra
        if not reused:
            return slice(start, start + extra)
        return np.concatenate([np.array(reused, dtype=np.int64), np.arange(start, start + extra, dtype=np.int64)])

    def _grow(self, size: int) -> None:
        for name in ("vectors", "keys", "uses", "last"):
            old = getattr(self, name)
            new = np.zeros((size, *old.shape[1:]), dtype=old.dtype)
            new[:old.shape[0]] = old
            setattr(self, name, new)

    def drop(self, slots: np.ndarray) -> None:
        """Free the slots."""
        for k in self.keys[slots].tolist():
            del self.index[k]
        self.free.extend(slots.tolist())


class VolatileTier(Tier):
    """Partitioned in-memory hash maps with a per-partition capacity and an overflow policy.

    partitions: partitions per table. capacity_per_partition: most rows in one partition.
    overflow_policy: evict_random | evict_least_used | evict_oldest. target_fill: fraction of
    capacity a full partition is brought down to (0 < target_fill <= 1). seed: for evict_random.
    Not thread-safe: the ParameterServer serialises calls.
    """

    name = "volatile"

    def __init__(self, partitions: int = 16, capacity_per_partition: int = 1 << 20,
                 overflow_policy: OverflowPolicy = "evict_oldest", target_fill: float = 0.8, seed: int = 0) -> None:
        super().__init__()
        if partitions < 1 or capacity_per_partition < 1:
            raise ValueError(f"{partitions=} and {capacity_per_partition=} must be >= 1")
        if overflow_policy not in ("evict_random", "evict_least_used", "evict_oldest"):
            raise ValueError(f"overflow_policy={overflow_policy!r} is not evict_random|evict_least_used|evict_oldest")
        if not 0.0 < target_fill <= 1.0:
            raise ValueError(f"target_fill={target_fill} must be in (0, 1]")
        self.partitions, self.capacity = partitions, capacity_per_partition
        self.policy, self.target_fill = overflow_policy, target_fill
        self._rng = np.random.default_rng(seed)
        self._parts: dict[str, list[_Partition]] = {}
        self._tick = 0

    def create_table(self, spec: TableSpec) -> None:
        """Create the table's empty partitions (a no-op if it exists)."""
        super().create_table(spec)
        if spec.name not in self._parts:
            self._parts[spec.name] = [_Partition(spec.dim, self.capacity) for _ in range(self.partitions)]

    def _table(self, table: str) -> list[_Partition]:
        self.spec(table)
        return self._parts[table]

    def fill(self, table: str) -> list[int]:
        """Rows held in each partition of the table."""
        return [len(p.index) for p in self._table(table)]

    def lookup(self, table: str, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows held: vectors [n, dim] and found [n] (CPU tensors); a hit counts as a use."""
        return self.lookup_many({table: keys})[table]

    def lookup_many(self, requests: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """`lookup` of several tables in one pass: the dict probes of every table's keys in one C-level loop."""
        tables = list(requests)
        specs = [self.spec(t) for t in tables]
        ks = [keys_to_numpy(check_keys(requests[t])) for t in tables]
        counts = np.array([k.size for k in ks], dtype=np.int64)
        starts = np.cumsum(counts) - counts  # [T] first batch position of each table
        k = ks[0] if len(ks) == 1 else np.concatenate(ks)  # [n]
        if len(specs) > 1 and len({spec.dim for spec in specs}) == 1:  # one output for every table; each part a view
            whole = np.empty((k.size, specs[0].dim), dtype=np.float32)  # [n, dim]
            outs = np.split(whole, np.cumsum(counts)[:-1])
        else:
            whole, outs = None, [np.empty((c, spec.dim), dtype=np.float32) for c, spec in zip(counts.tolist(), specs)]
        for out, spec in zip(outs, specs):
            out[:] = spec.default.numpy()
        found = np.zeros(k.size, dtype=bool)
        self._tick += 1
        # One C-level pass of dict probes over the keys sorted by (table, partition) (each partition's dict is
        # probed in a burst: cache-friendly), then per partition with hits only three vectorised row operations.
        P = self.partitions
        part = partition_of(k, P)  # [n]
        if len(ks) > 1:
            part += np.repeat(np.arange(len(ks), dtype=np.int64) * P, counts)  # [n] table * P + partition
        order = np.argsort(part, kind="stable")  # [n]
        part_sorted = part[order]
        parts = [q for t in tables for q in self._table(t)]  # [T * P]
        index_of = [q.index for q in parts]
        slots = np.fromiter(map(dict.get, map(index_of.__getitem__, part_sorted.tolist()), k[order].tolist(),
                                repeat(-1)), dtype=np.int64, count=k.size)  # [n] slot, -1 where absent; sorted order
        hit = np.flatnonzero(slots >= 0)  # [h] into the sorted order, grouped by (table, partition)
        pos, slots, part_sorted = order[hit], slots[hit], part_sorted[hit]  # [h] batch positions, slots, partitions
        found[pos] = True
        bounds = np.searchsorted(part_sorted, np.arange(len(parts) + 1)).tolist()
        rows = np.empty((hit.size, outs[0].shape[1]), dtype=np.float32) if whole is not None else None  # [h, dim]
        for g in range(len(parts)):  # (table, partition) groups with hits
            lo, hi = bounds[g], bounds[g + 1]
            if hi == lo:
                continue
            q, hs = parts[g], slots[lo:hi]
            if rows is not None:  # a contiguous write here, one scatter of every row after the loop
                np.take(q.vectors, hs, axis=0, out=rows[lo:hi], mode="clip")  # clip: unbuffered (slots are valid)
            else:
                t = g // P
                outs[t][pos[lo:hi] - starts[t]] = q.vectors[hs]
            q.uses[hs] += 1
            q.last[hs] = self._tick
        if rows is not None:
            whole[pos] = rows
        hits = int(found.sum())
        self.count(hits=hits, misses=k.size - hits)
        return {t: (torch.from_numpy(out), torch.from_numpy(f))
                for t, out, f in zip(tables, outs, np.split(found, np.cumsum(counts)[:-1]))}

    def insert(self, table: str, keys: torch.Tensor, vectors: torch.Tensor) -> None:
        """Put the rows; a full partition first evicts by policy down to its target fill."""
        self.insert_many({table: (keys, vectors)})

    def update(self, table: str, keys: torch.Tensor, vectors: torch.Tensor) -> int:
        """Overwrite the rows held (not a use); return how many were."""
        return self._write(table, keys, vectors)

    def _write(self, table: str, keys: torch.Tensor, vectors: torch.Tensor) -> int:
        """Overwrite the rows held (update); inserts go through `insert_many`."""
        parts, spec = self._table(table), self.spec(table)
        keys = check_keys(keys)
        vecs = check_vectors(spec, keys, vectors).cpu().numpy()
        uniq, last_pos = last_occurrence(keys_to_numpy(keys))
        # keep batch order (by last occurrence) so "the last `capacity` rows" means the batch's last
        order = np.argsort(last_pos, kind="stable")
        uniq, last_pos = uniq[order], last_pos[order]
        self._tick += 1
        written = 0
        for p, pos in group_by(partition_of(uniq, self.partitions), self.partitions):
            part = parts[p]
            pkeys, pvecs = uniq[pos], vecs[last_pos[pos]]
            slots = part.slots_of(pkeys.tolist())
            held = slots >= 0
            part.vectors[slots[held]] = pvecs[held]
            written += int(held.sum())
        return written

    def insert_many(self, rows: dict[str, tuple[torch.Tensor, torch.Tensor]], unique: bool = False) -> None:
        """`insert` of several tables in one pass: the dict probes of every table's keys in one C-level loop, then per
        (table, partition) with keys the row writes. unique: no key repeats within a table (skips de-duplication)."""
        tables = list(rows)
        if not tables:
            return
        P, ks, vs = self.partitions, [], []
        for table in tables:
            keys = check_keys(rows[table][0])
            vecs = check_vectors(self.spec(table), keys, rows[table][1]).cpu().numpy()
            k = keys_to_numpy(keys)
            if not unique:  # the last occurrence wins, in batch order of last occurrences (as `_write`)
                uniq, last_pos = last_occurrence(k)
                order = np.argsort(last_pos, kind="stable")
                k, vecs = uniq[order], vecs[last_pos[order]]
            ks.append(k)
            vs.append(vecs)
        counts = np.array([k.size for k in ks], dtype=np.int64)
        k = np.concatenate(ks)  # [n]
        group = partition_of(k, P) + np.repeat(np.arange(len(tables), dtype=np.int64) * P, counts)  # [n]
        order = np.argsort(group, kind="stable")  # [n]: grouped, batch order within a group
        k, group = k[order], group[order]
        same_dim = len({v.shape[1] for v in vs}) == 1
        v = np.concatenate(vs)[order] if same_dim else None  # [n, dim] in group order
        starts = np.cumsum(counts) - counts
        parts = [q for t in tables for q in self._table(t)]  # [T * P]
        index_of = [q.index for q in parts]
        slots = np.fromiter(map(dict.get, map(index_of.__getitem__, group.tolist()), k.tolist(), repeat(-1)),
                            dtype=np.int64, count=k.size)  # [n] slot, -1 where absent
        held_before = np.concatenate([[0], np.cumsum(slots >= 0)]).tolist()
        bounds = np.searchsorted(group, np.arange(len(parts) + 1)).tolist()
        self._tick += 1
        for g in range(len(parts)):
            lo, hi = bounds[g], bounds[g + 1]
            if hi == lo:
                continue
            part, t = parts[g], g // P
            gv = v[lo:hi] if v is not None else vs[t][order[lo:hi] - starts[t]]  # [hi - lo, dim]
            if held_before[hi] == held_before[lo]:  # every key is new (the ParameterServer's promoted rows)
                self._add(part, slots[:0], k[lo:hi], gv)
                continue
            s = slots[lo:hi]
            held = s >= 0
            part.vectors[s[held]] = gv[held]
            part.last[s[held]] = self._tick
            self._add(part, s[held], k[lo:hi][~held], gv[~held])

    def _add(self, part: _Partition, protected: np.ndarray, keys: np.ndarray, vecs: np.ndarray) -> int:
        """Add new rows to a partition, evicting first if it would overflow; return rows added."""
        room = part.capacity - protected.size
        if keys.size > room:
            keys, vecs = keys[keys.size - room:], vecs[keys.size - room:]
        size = len(part.index)
        if size + keys.size > part.capacity:
            # existing rows to keep: down to the target fill, and at least the batch's own
            keep = max(protected.size, min(int(part.capacity * self.target_fill), part.capacity - keys.size))
            self._evict_down(part, protected, size - keep)
        slots = part.take(keys.size)
        part.keys[slots], part.vectors[slots] = keys, vecs
        part.uses[slots], part.last[slots] = 0, self._tick
        numbers = range(slots.start, slots.stop) if isinstance(slots, slice) else slots.tolist()
        part.index.update(zip(keys.tolist(), numbers))
        return keys.size

    def _evict_down(self, part: _Partition, protected: np.ndarray, n: int) -> None:
        """Evict n rows (or all evictable ones) chosen by the overflow policy."""
        slots = np.fromiter(part.index.values(), dtype=np.int64, count=len(part.index))
        slots = slots[~np.isin(slots, protected)]
        n = min(n, slots.size)
        if n <= 0:
            return
        if self.policy == "evict_random":
            victims = self._rng.choice(slots, size=n, replace=False)
        elif self.policy == "evict_least_used":
            victims = slots[np.lexsort((slots, part.last[slots], part.uses[slots]))[:n]]
        else:
            victims = slots[np.lexsort((slots, part.last[slots]))[:n]]
        part.drop(victims)
        self.count(evictions=n)
        logger.debug("volatile: evicted %d rows by %s", n, self.policy)

    def evict(self, table: str, keys: torch.Tensor) -> int:
        """Drop the rows held; return how many were."""
        parts = self._table(table)
        k = np.unique(keys_to_numpy(check_keys(keys)))
        dropped = 0
        for p, pos in group_by(partition_of(k, self.partitions), self.partitions):
            slots = parts[p].slots_of(k[pos].tolist())
            slots = slots[slots >= 0]
            parts[p].drop(slots)
            dropped += slots.size
        return dropped

    def keys(self, table: str) -> np.ndarray:
        """All keys held for the table, sorted; for tests and inspection."""
        held = [np.fromiter(p.index.keys(), np.int64, len(p.index)) for p in self._table(table)]
        return np.sort(np.concatenate(held))
