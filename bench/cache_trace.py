"""Embedding-key traces and the hit rates a cache could reach on them: the library under the cache benchmark.

Traces: 26 tables with the Criteo Kaggle cardinalities (times a scale factor); keys per table drawn from a
bounded Zipf law P(rank k) ∝ k^-α (α = 0: uniform), then sent through a seeded bijection of [0, n) so the
hottest key is not key 0 and hot keys are scattered over the table. No downloads; everything is seeded.

Hit rates on a key trace for a fully-associative cache of C entries: Belady's optimum (MIN/OPT, the bound)
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

# Rows per categorical feature C1..C26 of the Criteo Kaggle Display Advertising Challenge (as counted by
# facebookresearch/dlrm's preprocessing, no frequency threshold): 33.8 M rows in all, the largest 10.1 M.
CRITEO_KAGGLE_CARDINALITIES = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)


def criteo_cardinalities(scale: float = 1.0) -> np.ndarray:
    """The 26 Criteo Kaggle cardinalities times `scale`, rounded, at least 1 row each: int64 [26]."""
    if not scale > 0:
        raise ValueError(f"{scale=} must be > 0")
    return np.maximum(1, np.rint(np.asarray(CRITEO_KAGGLE_CARDINALITIES, dtype=np.float64) * scale)).astype(np.int64)


# --- power-law ranks: rejection-inversion (Hörmann & Derflinger 1996), exact, O(1) memory per table --------

def _log1p_over(x: np.ndarray) -> np.ndarray:
    """log(1 + x) / x, 1 at x = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.abs(x) > 1e-8, np.log1p(x) / x, 1 - x / 2)


def _expm1_over(x: np.ndarray) -> np.ndarray:
    """(e^x - 1) / x, 1 at x = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.abs(x) > 1e-8, np.expm1(x) / x, 1 + x / 2)


def zipf_ranks(n: int, alpha: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """`size` ranks in [0, n), rank r drawn with probability ∝ (r + 1)^-alpha (alpha = 0: uniform): int64."""
    if n < 1 or size < 0 or alpha < 0:
        raise ValueError(f"{n=} must be >= 1, {size=} >= 0, {alpha=} >= 0")
    if alpha == 0:
        return rng.integers(0, n, size, dtype=np.int64)
    a = 1.0 - alpha

    def h(x):  # the unnormalised density x^-alpha
        return np.exp(-alpha * np.log(x))

    def h_integral(x):  # ∫_1^x h = (x^(1-alpha) - 1) / (1 - alpha)
        log_x = np.log(x)
        return _expm1_over(a * log_x) * log_x

    def h_integral_inverse(y):
        return np.exp(_log1p_over(np.maximum(y * a, -1.0)) * y)

    lo, hi = h_integral(np.float64(1.5)) - 1.0, h_integral(np.float64(n + 0.5))
    s = 2.0 - h_integral_inverse(h_integral(np.float64(2.5)) - h(np.float64(2.0)))
    out = np.empty(size, dtype=np.int64)
    todo = np.arange(size)
    while todo.size:  # a few percent are rejected each round
        u = hi + rng.random(todo.size) * (lo - hi)
        x = h_integral_inverse(u)
        k = np.clip(np.floor(x + 0.5), 1, n)
        accept = (k - x <= s) | (u >= h_integral(k + 0.5) - h(k))
        out[todo[accept]] = k[accept].astype(np.int64) - 1
        todo = todo[~accept]
    return out


# --- a seeded bijection of [0, n): Feistel network on the next even power of two, cycle-walked into range ---

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a fast, well-mixed 64-bit hash."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


class KeyHash:
    """A seeded permutation of [0, n) with its inverse; vectorised, no table (n may be in the billions)."""

    ROUNDS = 6

    def __init__(self, n: int, seed: int) -> None:
        if n < 1:
            raise ValueError(f"{n=} must be >= 1")
        self.n = n
        bits = max(2, int(n - 1).bit_length())
        self.half = np.uint64((bits + 1) // 2)  # the domain 2^(2·half) holds n and is below 4n
        self.mask = np.uint64((1 << int(self.half)) - 1)
        self.keys = np.random.default_rng([seed, n]).integers(0, 2**63, self.ROUNDS, dtype=np.uint64)

    def _rounds(self, x: np.ndarray, inverse: bool) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for key in (self.keys[::-1] if inverse else self.keys):
            if inverse:
                left, right = right ^ (_mix(left ^ key) & self.mask), left
            else:
                left, right = right, left ^ (_mix(right ^ key) & self.mask)
        return (left << self.half) | right

    def _walk(self, x: np.ndarray, inverse: bool) -> np.ndarray:
        x = np.asarray(x)
        if x.size and (x.min() < 0 or x.max() >= self.n):
            raise ValueError(f"keys must lie in [0, {self.n})")
        y = self._rounds(x.astype(np.uint64), inverse)
        out = np.flatnonzero(y >= self.n)
        while out.size:  # cycle-walking: a bijection of the big domain restricted to [0, n) stays one
            y[out] = self._rounds(y[out], inverse)
            out = out[y[out] >= self.n]
        return y.astype(np.int64)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self._walk(x, inverse=False)

    def inverse(self, y: np.ndarray) -> np.ndarray:
        return self._walk(y, inverse=True)


def sample_keys(n: int, alpha: float, size: int, seed: int) -> np.ndarray:
    """`size` keys of a table of `n` rows, power law of exponent alpha (0: uniform) over hashed ranks: int64."""
    rng = np.random.default_rng([seed, n, 1])
    return KeyHash(n, seed)(zipf_ranks(n, alpha, size, rng))


@dataclass(frozen=True)
class Trace:
    """Keys of `batches` lookups per table; batch b of table t is keys[t][b·per_batch : (b+1)·per_batch]."""

    cardinalities: np.ndarray  # int64 [tables]
    keys: tuple[np.ndarray, ...]  # per table, int64 [batches · per_batch]
    per_batch: int  # keys per table per batch: batch size × keys per sample
    alpha: float

    @property
    def offsets(self) -> np.ndarray:
        """First global key of every table: global key = offsets[t] + key (one key space for one cache)."""
        return np.concatenate([[0], np.cumsum(self.cardinalities)[:-1]]).astype(np.int64)

    def combined(self) -> np.ndarray:
        """All tables as one stream of global keys, batch by batch (per_batch × tables keys a batch)."""
        stacked = np.stack(self.keys).reshape(len(self.keys), -1, self.per_batch) + self.offsets[:, None, None]
        return stacked.transpose(1, 0, 2).ravel()  # [batches, tables, per_batch] flattened


def make_trace(
    cardinalities, *, batches: int, batch_size: int, alpha: float, seed: int, hotness: int = 1
) -> Trace:
    """A seeded trace: `batches` batches of `batch_size` samples, `hotness` keys per sample per table."""
    cards = np.asarray(cardinalities, dtype=np.int64)
    if batches < 0 or batch_size < 1 or hotness < 1:
        raise ValueError(f"{batches=} must be >= 0, {batch_size=} and {hotness=} >= 1")
    per_batch = batch_size * hotness
    keys = tuple(sample_keys(int(n), alpha, batches * per_batch, seed * 1000 + t) for t, n in enumerate(cards))
    return Trace(cardinalities=cards, keys=keys, per_batch=per_batch, alpha=alpha)


# --- hit rates ------------------------------------------------------------------------------------------------

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
