"""Hit rates on a key trace for a fully-associative cache of C entries: Belady's optimum (MIN/OPT, the bound)
and plain LRU and LFU references. Accesses come in batches (one batch = one lookup call of the parameter
server): a batch's keys are de-duplicated, all of them are looked up against the cache as the previous batch
left it, then the misses are inserted. Batches of 1 are the classic one-access-at-a-time model.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass
from itertools import pairwise

import numpy as np


@dataclass(frozen=True)
class HitCount:
    """Hits among the de-duplicated lookups of a trace."""

    hits: int
    lookups: int

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0


def dedup_batches(keys: np.ndarray, batch_size: int = 1, offsets: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each batch's distinct keys in first-occurrence order, and the new batch offsets [batches + 1]."""
    keys = np.asarray(keys)
    if keys.ndim != 1 or not np.issubdtype(keys.dtype, np.integer):
        raise ValueError(f"keys must be a 1-D integer array; got {keys.shape} {keys.dtype}")
    keys = keys.astype(np.int64)
    if offsets is None:
        if batch_size < 1:
            raise ValueError(f"{batch_size=} must be >= 1")
        offsets = np.append(np.arange(0, keys.size, batch_size), keys.size)
        if batch_size == 1:
            return keys, offsets
    offsets = np.asarray(offsets, dtype=np.int64)
    if offsets.size < 1 or offsets[0] != 0 or offsets[-1] != keys.size or np.any(np.diff(offsets) < 0):
        raise ValueError(f"offsets must rise from 0 to {keys.size}")
    batch = np.repeat(np.arange(offsets.size - 1), np.diff(offsets))  # [n] batch of every access
    order = np.lexsort((keys, batch))  # by batch, then key, then position (stable)
    first = np.ones(keys.size, dtype=bool)
    first[1:] = (keys[order][1:] != keys[order][:-1]) | (batch[order][1:] != batch[order][:-1])
    keep = np.sort(order[first])
    counts = np.bincount(batch[keep], minlength=offsets.size - 1)
    return keys[keep], np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def next_use(keys: np.ndarray) -> np.ndarray:
    """Position of the next access to the same key; never again: len(keys) + position (distinct). int64."""
    n = keys.size
    order = np.argsort(keys, kind="stable")
    same = keys[order][1:] == keys[order][:-1]
    nxt = np.arange(n, 2 * n, dtype=np.int64)
    nxt[order[:-1][same]] = order[1:][same]
    return nxt


def belady_hits(
    keys: np.ndarray, capacity: int, *, batch_size: int = 1, offsets: np.ndarray | None = None, bypass: bool = False
) -> HitCount:
    """Belady's optimum: after each batch keep the entries whose next use comes soonest.

    bypass=False (MIN, demand paging): every key of a batch enters the cache (the nearest-used `capacity` of
    them if the batch has more), evicting the resident keys used furthest in the future; the bound for caches
    that insert every miss, as LRU, LFU and HPS do. bypass=True: a miss may also stay out, so the cache keeps
    the nearest-used of residents and batch keys together; the bound for any policy, admission included.
    O(n log n): next uses by a stable sort, then one pass with a max-heap of next uses (stale entries skipped).
    """
    if capacity < 0:
        raise ValueError(f"{capacity=} must be >= 0")
    stream, bounds = dedup_batches(keys, batch_size, offsets)
    n = stream.size
    if capacity == 0 or n == 0:
        return HitCount(0, n)
    nxt = next_use(stream).tolist()
    # Each resident is identified by its next use q (distinct per access); resident[q] marks it live.
    resident = bytearray(2 * n)
    if bounds.size == n + 1:
        hits = _belady_single(nxt, capacity, resident, bypass)
    else:
        hits = _belady_batched(nxt, bounds.tolist(), capacity, resident, bypass)
    return HitCount(hits, n)


def _belady_single(nxt: list[int], capacity: int, resident: bytearray, bypass: bool) -> int:
    heap: list[int] = []  # -next use
    push, replace = heapq.heappush, heapq.heapreplace
    hits = size = 0
    dead = len(nxt)  # next uses from here on mean "never again"
    for t, q in enumerate(nxt):
        if resident[t]:  # a hit: this access's entry is spent, its key now waits for q
            hits += 1
            resident[t] = 0
            resident[q] = 1
            push(heap, -q)
        elif size < capacity:
            size += 1
            resident[q] = 1
            push(heap, -q)
        else:
            while not resident[-heap[0]]:
                heapq.heappop(heap)
            if q > -heap[0] and (bypass or -heap[0] >= dead):
                # Used later than every resident: keep it out. Without bypass too when the victim would be
                # dead (never used again): it or the new, dead key take the slot, hits are the same.
                continue
            resident[-heap[0]] = 0
            resident[q] = 1
            replace(heap, -q)
    return hits


def _belady_batched(nxt: list[int], bounds: list[int], capacity: int, resident: bytearray, bypass: bool) -> int:
    heap: list[int] = []
    hits = size = 0

    def evict_down_to(target: int) -> int:
        nonlocal size
        while size > target:
            q = -heapq.heappop(heap)
            if resident[q]:
                resident[q] = 0
                size -= 1
        return size

    for lo, hi in pairwise(bounds):
        for t in range(lo, hi):  # look the whole batch up first
            if resident[t]:
                hits += 1
                resident[t] = 0
                size -= 1
        if not bypass:  # room for the batch from the old residents, furthest next use first
            evict_down_to(max(0, capacity - (hi - lo)))
        for t in range(lo, hi):
            resident[nxt[t]] = 1
            heapq.heappush(heap, -nxt[t])
        size += hi - lo
        evict_down_to(capacity)
    return hits


def lru_hits(keys: np.ndarray, capacity: int, *, batch_size: int = 1, offsets: np.ndarray | None = None) -> HitCount:
    """Least recently used (OrderedDict reference): a batch's hits are refreshed, then its misses inserted."""
    stream, bounds = dedup_batches(keys, batch_size, offsets)
    cache: OrderedDict[int, None] = OrderedDict()
    hits, stream = 0, stream.tolist()
    for lo, hi in pairwise(bounds.tolist()):
        misses = []
        for k in stream[lo:hi]:
            if k in cache:
                cache.move_to_end(k)
                hits += 1
            else:
                misses.append(k)
        for k in misses:
            cache[k] = None
            if len(cache) > capacity:
                cache.popitem(last=False)
    return HitCount(hits, len(stream))


def lfu_hits(keys: np.ndarray, capacity: int, *, batch_size: int = 1, offsets: np.ndarray | None = None) -> HitCount:
    """Least frequently used (in-cache counts, ties to the least recent; lazy-heap reference). A batch's misses
    evict other keys before each other, so a batch that fits stays whole, as with LRU."""
    stream, bounds = dedup_batches(keys, batch_size, offsets)
    state: dict[int, tuple[int, int]] = {}  # key -> (uses since insertion, last use)
    heap: list[tuple[int, int, int]] = []  # (uses, last use, key); stale when it differs from state
    hits, clock, stream = 0, 0, stream.tolist()
    for lo, hi in pairwise(bounds.tolist()):
        batch, misses = set(stream[lo:hi]), []
        for k in stream[lo:hi]:
            clock += 1
            if k in state:
                hits += 1
                state[k] = (state[k][0] + 1, clock)
                heapq.heappush(heap, (*state[k], k))
            else:
                misses.append(k)
        in_batch = (hi - lo) - len(misses)  # the batch's keys now resident
        for k in misses:
            if capacity == 0:
                break
            if len(state) == capacity:
                in_batch -= _evict_lfu(state, heap, batch, protect=len(state) > in_batch)
            clock += 1
            state[k] = (1, clock)
            heapq.heappush(heap, (1, clock, k))
            in_batch += 1
    return HitCount(hits, len(stream))


def _evict_lfu(state: dict, heap: list, batch: set, protect: bool) -> bool:
    """Drop the least-used live entry, skipping the current batch's keys while others remain (protect);
    return whether the victim was one of the batch's keys."""
    deferred = []
    while True:
        uses, last, k = heapq.heappop(heap)
        if state.get(k) != (uses, last):
            continue
        if protect and k in batch:
            deferred.append((uses, last, k))
            continue
        del state[k]
        break
    for entry in deferred:
        heapq.heappush(heap, entry)
    return k in batch
