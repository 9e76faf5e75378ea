"""A hash map from (table, key) pairs to row slots, over numpy arrays, probed for a whole batch at once.

The volatile tier's index (embeddings/volatile.py). A Python dict answers one key per probe, ~0.3 µs each
(the int objects, the call, a cache miss into a large dict); this map answers a batch of n keys with a few
numpy operations per probe round over the keys not yet resolved, so a batch of every table's keys is one call.

Open addressing with linear probing: three parallel arrays of a power-of-two size (`keys` int64, `tables`
int32, `vals` int64, where a val of EMPTY marks a never used position and GONE a deleted one). A key's probe
sequence starts at its home position (Fibonacci hashing of key and table) and walks forward until the key or
an EMPTY position. Deletion leaves GONE so that sequences through it still reach their keys; inserts reuse GONE
positions. Before an insert would take the used positions (live + GONE) past MAX_LOAD of the arrays, they are
rebuilt: twice as large when the live entries need it, else the same size without the GONE positions.
"""

from __future__ import annotations

import numpy as np

EMPTY, GONE = -1, -2
MAX_LOAD = 0.5  # used positions / size before a rebuild (linear probing: ~1.5 probes a hit, ~2.5 a miss at 0.5)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_TABLE_MIX = np.uint64(0xD6E8FEB86659FD93)


class KeyIndex:
    """(table number, int64 key) -> int64 value (>= 0). Arguments are equal-length numpy arrays; not thread-safe."""

    def __init__(self, capacity: int = 1024) -> None:
        self._allocate(_size_for(capacity))
        self.live = 0  # entries held

    def _allocate(self, size: int) -> None:
        self.size, self.bits = size, size.bit_length() - 1
        self.keys = np.zeros(size, dtype=np.int64)
        self.tables = np.zeros(size, dtype=np.int32)
        self.vals = np.full(size, EMPTY, dtype=np.int64)
        self.used = 0  # positions not EMPTY (live + GONE)

    def __len__(self) -> int:
        return self.live

    def _home(self, tables: np.ndarray, keys: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            h = (keys.astype(np.uint64) ^ (tables.astype(np.uint64) * _TABLE_MIX)) * _GOLDEN
        return (h >> np.uint64(64 - self.bits)).astype(np.int64)

    def find(self, tables: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """Position of each (table, key), -1 where absent."""
        out = np.full(keys.size, -1, dtype=np.int64)
        idx = np.arange(keys.size)  # the pairs still probing
        pos = self._home(tables, keys)
        mask = self.size - 1
        while idx.size:
            v = self.vals[pos]
            hit = (v >= 0) & (self.keys[pos] == keys[idx]) & (self.tables[pos] == tables[idx])
            out[idx[hit]] = pos[hit]
            more = ~hit & (v != EMPTY)
            idx, pos = idx[more], (pos[more] + 1) & mask
        return out

    def get(self, tables: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """Value of each (table, key), -1 where absent."""
        pos = self.find(tables, keys)
        return np.where(pos >= 0, self.vals[pos], -1)

    def put(self, tables: np.ndarray, keys: np.ndarray, vals: np.ndarray) -> None:
        """Add pairs known to be absent and distinct, with their values (>= 0)."""
        n = keys.size
        if not n:
            return
        if self.used + n > MAX_LOAD * self.size:
            self._rebuild(self.live + n)
        idx = np.arange(n)
        pos = self._home(tables, keys)
        mask = self.size - 1
        while idx.size:
            free = np.flatnonzero(self.vals[pos] < 0)  # EMPTY or GONE: the pair may go there
            if free.size:
                _, first = np.unique(pos[free], return_index=True)  # one pair a position; the others probe on
                won = free[first]
                at, src = pos[won], idx[won]
                self.used += int(np.count_nonzero(self.vals[at] == EMPTY))
                self.keys[at], self.tables[at], self.vals[at] = keys[src], tables[src], vals[src]
                rest = np.ones(idx.size, dtype=bool)
                rest[won] = False
                idx, pos = idx[rest], pos[rest]
            pos = (pos + 1) & mask  # a position taken (before, or by a winner just now): the next one
        self.live += n

    def delete(self, tables: np.ndarray, keys: np.ndarray) -> int:
        """Remove the pairs held (absent ones are ignored); return how many were."""
        pos = self.find(tables, keys)
        pos = np.unique(pos[pos >= 0])
        self.vals[pos] = GONE
        self.live -= pos.size
        return int(pos.size)

    def items(self, table: int) -> tuple[np.ndarray, np.ndarray]:
        """Keys and values held for one table (in no particular order)."""
        at = np.flatnonzero((self.vals >= 0) & (self.tables == table))
        return self.keys[at], self.vals[at]

    def _rebuild(self, need: int) -> None:
        """Re-insert the live pairs into arrays that hold `need` entries at 2/3 of MAX_LOAD or less (no GONE positions)."""
        at = np.flatnonzero(self.vals >= 0)
        keys, tables, vals = self.keys[at], self.tables[at], self.vals[at]
        self._allocate(max(self.size, _size_for(need)))
        self.live = 0
        self.put(tables, keys, vals)


def _size_for(entries: int) -> int:
    """The power of two that holds `entries` at 2/3 of MAX_LOAD or less (room to grow before the next rebuild)."""
    return 1 << max(4, int(np.ceil(np.log2(max(1, entries) * 1.5 / MAX_LOAD))))
