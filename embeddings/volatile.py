"""The volatile tier in this process's memory: partitioned hash maps with a capacity and an overflow policy.

Each table is split into `partitions` partitions by a multiplicative hash of the key; capacity and overflow
are per partition. A table's rows sit in numpy slabs (`vectors [slots, dim]`, `keys`, `uses`, `last`, and
each slot's `part`ition), grown by doubling up to partitions * capacity rows; one vectorised hash map for
every table (embeddings/key_index.py) maps (table, key) to a slot. `lookup_many` / `insert_many` take every
table of a batch in one pass: one batched probe of the map for all keys, then one row gather (or scatter) a
table. (Python dicts probed key by key, per partition, took 4-5x longer on a DLRM batch.)

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
from typing import Literal

import numpy as np
import torch

from embeddings.key_index import KeyIndex
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


class _Slab:
    """The rows of every table of one vector size: numpy slabs indexed by slot, grown by doubling. A batch's rows of
    all those tables are gathered in one take (slabs per table cost a few numpy calls per table of every batch)."""

    def __init__(self, dim: int) -> None:
        n = 1024
        self.vectors = np.zeros((n, dim), dtype=np.float32)  # [slots, dim]
        self.keys = np.zeros(n, dtype=np.int64)  # [slots]
        self.uses = np.zeros(n, dtype=np.int64)  # [slots] lookup hits since insertion
        self.last = np.zeros(n, dtype=np.int64)  # [slots] tick of the last insert or hit
        self.table = np.zeros(n, dtype=np.int32)  # [slots] number of the table whose row it holds
        self.part = np.full(n, -1, dtype=np.int32)  # [slots] partition of the row held, -1 where free
        self.free: list[int] = []  # freed slots below `fresh`
        self.fresh = 0  # slots from here on were never used

    def take(self, n: int) -> np.ndarray | slice:
        """n free slots (freed ones first, then never used ones), growing the slabs; a slice when they are all never
        used ones (contiguous: slice writes are cheaper than scattered ones)."""
        reused = self.free[len(self.free) - min(n, len(self.free)):]
        del self.free[len(self.free) - len(reused):]
        extra = n - len(reused)
        if self.fresh + extra > self.keys.size:
            self._grow(max(2 * self.keys.size, self.fresh + extra))
        start, self.fresh = self.fresh, self.fresh + extra
        if not reused:
            return slice(start, start + extra)
        return np.concatenate([np.array(reused, dtype=np.int64), np.arange(start, start + extra, dtype=np.int64)])

    def _grow(self, size: int) -> None:
        for name in ("vectors", "keys", "uses", "last", "table", "part"):
            old = getattr(self, name)
            new = np.full((size, *old.shape[1:]), -1 if name == "part" else 0, dtype=old.dtype)
            new[:old.shape[0]] = old
            setattr(self, name, new)


class _Table:
    """One table: its number in the tier's index (key -> slot), its rows' slab (shared with the tables of its vector
    size), and how many rows each partition holds. A partition is the keys whose hash falls in it: capacity and
    overflow are counted per partition, the rows sit in the slab."""

    def __init__(self, number: int, index: KeyIndex, slab: _Slab, partitions: int) -> None:
        self.number, self.index, self.slab = number, index, slab
        self.fill = np.zeros(partitions, dtype=np.int64)  # [partitions] rows held in each

    def slots_of(self, keys: np.ndarray) -> np.ndarray:
        """Slot of each key, -1 where absent."""
        return self.index.get(np.full(keys.size, self.number, dtype=np.int32), keys)

    def held_in(self, partition: int) -> np.ndarray:
        """Slots of the rows the partition holds."""
        slab = self.slab
        return np.flatnonzero((slab.part[:slab.fresh] == partition) & (slab.table[:slab.fresh] == self.number))

    def drop(self, slots: np.ndarray) -> None:
        """Free the slots."""
        slab = self.slab
        self.index.delete(np.full(slots.size, self.number, dtype=np.int32), slab.keys[slots])
        np.subtract.at(self.fill, slab.part[slots], 1)
        slab.part[slots] = -1
        slab.free.extend(slots.tolist())


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
        self._tables: dict[str, _Table] = {}
        self._slabs: dict[int, _Slab] = {}  # by vector size
        self._index = KeyIndex()  # (table number, key) -> slot in that table's slab, every table's
        self._tick = 0

    def create_table(self, spec: TableSpec) -> None:
        """Create the table's empty partitions (a no-op if it exists)."""
        super().create_table(spec)
        if spec.name not in self._tables:
            slab = self._slabs.setdefault(spec.dim, _Slab(spec.dim))
            self._tables[spec.name] = _Table(len(self._tables), self._index, slab, self.partitions)

    def _table(self, table: str) -> _Table:
        self.spec(table)
        return self._tables[table]

    def _numbers(self, tables: list[str], counts: list[int]) -> np.ndarray:
        """The index's table number of each key of a batch (tables[i]'s counts[i] keys in turn)."""
        return np.repeat(np.array([self._tables[t].number for t in tables], dtype=np.int32), counts)

    def fill(self, table: str) -> list[int]:
        """Rows held in each partition of the table."""
        return self._table(table).fill.tolist()

    def lookup(self, table: str, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows held: vectors [n, dim] and found [n] (CPU tensors); a hit counts as a use."""
        return self.lookup_many({table: keys})[table]

    def lookup_many(self, requests: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """`lookup` of several tables in one pass: one batched probe of the index for every table's keys, then a few
        vectorised row operations per vector size (one gather for all the tables of a size)."""
        tables = list(requests)
        specs = [self.spec(t) for t in tables]
        ks = [keys_to_numpy(check_keys(requests[t])) for t in tables]
        counts = [k.size for k in ks]
        bounds = np.concatenate([[0], np.cumsum(counts)]).tolist()  # [T + 1] each table's batch positions
        k = ks[0] if len(ks) == 1 else np.concatenate(ks)  # [n]
        slots = self._index.get(self._numbers(tables, counts), k)  # [n] slot, -1 where absent
        found = slots >= 0  # [n]
        self._tick += 1
        by_dim: dict[int, list[int]] = {}
        for t, spec in enumerate(specs):
            by_dim.setdefault(spec.dim, []).append(t)
        answers = {}
        for dim, members in by_dim.items():  # usually one: every table of a DLRM has one vector size
            if len(members) == len(tables):
                s, f = slots, found
            else:
                s = np.concatenate([slots[bounds[t]:bounds[t + 1]] for t in members])
                f = s >= 0
            slab, sizes = self._slabs[dim], [counts[t] for t in members]
            out = np.empty((s.size, dim), dtype=np.float32)  # [m, dim]
            hit = np.flatnonzero(f)
            if hit.size == s.size:  # every key held: one gather, no default rows
                np.take(slab.vectors, s, axis=0, out=out, mode="clip")  # clip: unbuffered (the slots are valid)
                held = s
            else:
                miss = np.flatnonzero(~f)
                defaults = np.stack([specs[t].default.numpy() for t in members])  # [G, dim]
                out[miss] = defaults[np.repeat(np.arange(len(members)), sizes)[miss]]
                held = s[hit]
                out[hit] = slab.vectors[held]
            slab.uses[held] += 1  # a key twice in a batch counts once
            slab.last[held] = self._tick
            cut = np.cumsum(sizes)[:-1]
            for t, o, fo in zip(members, np.split(out, cut), np.split(f, cut)):
                answers[tables[t]] = torch.from_numpy(o), torch.from_numpy(fo)
        hits = int(found.sum())
        self.count(hits=hits, misses=k.size - hits)
        return {t: answers[t] for t in tables}

    def insert(self, table: str, keys: torch.Tensor, vectors: torch.Tensor) -> None:
        """Put the rows; a full partition first evicts by policy down to its target fill."""
        self.insert_many({table: (keys, vectors)})

    def update(self, table: str, keys: torch.Tensor, vectors: torch.Tensor) -> int:
        """Overwrite the rows held (not a use); return how many were."""
        tab, spec = self._table(table), self.spec(table)
        keys = check_keys(keys)
        vecs = check_vectors(spec, keys, vectors).cpu().numpy()
        uniq, last_pos = last_occurrence(keys_to_numpy(keys))
        slots = tab.slots_of(uniq)
        held = slots >= 0
        tab.slab.vectors[slots[held]] = vecs[last_pos[held]]
        return int(held.sum())

    def insert_many(self, rows: dict[str, tuple[torch.Tensor, torch.Tensor]], unique: bool = False) -> None:
        """`insert` of several tables in one pass: one batched probe of the index for every table's keys, then
        per table the row writes. unique: no key repeats within a table (skips de-duplication)."""
        tables = list(rows)
        if not tables:
            return
        ks, vs = [], []
        for table in tables:
            keys = check_keys(rows[table][0])
            vecs = check_vectors(self.spec(table), keys, rows[table][1]).cpu().numpy()
            k = keys_to_numpy(keys)
            if not unique:  # the last occurrence wins, in batch order of last occurrences
                uniq, last_pos = last_occurrence(k)
                order = np.argsort(last_pos, kind="stable")
                k, vecs = uniq[order], vecs[last_pos[order]]
            ks.append(k)
            vs.append(vecs)
        counts = [k.size for k in ks]
        bounds = np.concatenate([[0], np.cumsum(counts)]).tolist()
        k = ks[0] if len(ks) == 1 else np.concatenate(ks)  # [n]
        slots = self._index.get(self._numbers(tables, counts), k)  # [n] slot, -1 where absent
        self._tick += 1
        for t, table in enumerate(tables):
            lo, hi = bounds[t], bounds[t + 1]
            if hi == lo:
                continue
            tab, s, gv, gk = self._tables[table], slots[lo:hi], vs[t], k[lo:hi]
            held = s >= 0
            if held.any():
                tab.slab.vectors[s[held]] = gv[held]
                tab.slab.last[s[held]] = self._tick
                new = ~held
                self._add(tab, s[held], gk[new], gv[new])
            else:  # every key is new (the ParameterServer's promoted rows)
                self._add(tab, s[:0], gk, gv)

    def _add(self, tab: _Table, protected: np.ndarray, keys: np.ndarray, vecs: np.ndarray) -> None:
        """Add new rows (keys in batch order) to a table, evicting first in each partition they would overflow; a
        partition that gets more new rows than it has room keeps the last ones. protected: slots this batch wrote."""
        if not keys.size:
            return
        P, cap = self.partitions, self.capacity
        part = partition_of(keys, P)  # [m]
        new = np.bincount(part, minlength=P)  # [P]
        over = np.flatnonzero(tab.fill + new > cap)
        if over.size:
            mine = np.bincount(tab.slab.part[protected], minlength=P) if protected.size else np.zeros(P, np.int64)
            keep = np.ones(keys.size, dtype=bool)
            for p in over.tolist():
                room = cap - int(mine[p])
                at = np.flatnonzero(part == p)
                if at.size > room:  # more new rows than the partition holds: its last ones
                    keep[at[:at.size - room]] = False
                    at = at[at.size - room:]
                n_new, size = at.size, int(tab.fill[p])
                if size + n_new > cap:  # rows to keep: down to the target fill, and at least the batch's own
                    stay = max(int(mine[p]), min(int(cap * self.target_fill), cap - n_new))
                    self._evict_down(tab, p, protected, size - stay)
            if not keep.all():
                keys, vecs, part = keys[keep], vecs[keep], part[keep]
                new = np.bincount(part, minlength=P)
        slab = tab.slab
        slots = slab.take(keys.size)
        slab.keys[slots], slab.vectors[slots], slab.part[slots], slab.table[slots] = keys, vecs, part, tab.number
        slab.uses[slots], slab.last[slots] = 0, self._tick
        tab.fill += new
        numbers = np.arange(slots.start, slots.stop, dtype=np.int64) if isinstance(slots, slice) else slots
        self._index.put(np.full(keys.size, tab.number, dtype=np.int32), keys, numbers)

    def _evict_down(self, tab: _Table, partition: int, protected: np.ndarray, n: int) -> None:
        """Evict n rows of the partition (or all evictable ones) chosen by the overflow policy."""
        slots = tab.held_in(partition)
        if protected.size:
            slots = slots[~np.isin(slots, protected)]
        n = min(n, slots.size)
        if n <= 0:
            return
        if self.policy == "evict_random":
            victims = self._rng.choice(slots, size=n, replace=False)
        elif self.policy == "evict_least_used":
            victims = slots[np.lexsort((slots, tab.slab.last[slots], tab.slab.uses[slots]))[:n]]
        else:
            victims = slots[np.lexsort((slots, tab.slab.last[slots]))[:n]]
        tab.drop(victims)
        self.count(evictions=n)
        logger.debug("volatile: evicted %d rows by %s", n, self.policy)

    def evict(self, table: str, keys: torch.Tensor) -> int:
        """Drop the rows held; return how many were."""
        tab = self._table(table)
        slots = tab.slots_of(np.unique(keys_to_numpy(check_keys(keys))))
        slots = slots[slots >= 0]
        tab.drop(slots)
        return int(slots.size)

    def keys(self, table: str) -> np.ndarray:
        """All keys held for the table, sorted; for tests and inspection."""
        return np.sort(self._index.items(self._table(table).number)[0])
