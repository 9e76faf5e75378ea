"""Embedding-key traces for the cache benchmark (the hit rates a cache could reach on them: cache_bounds.py).

Traces: 26 tables with the Criteo Kaggle cardinalities (times a scale factor); keys per table drawn from a
bounded Zipf law P(rank k) ∝ k^-α (α = 0: uniform), then sent through a seeded bijection of [0, n) so the
hottest key is not key 0 and hot keys are scattered over the table. No downloads; everything is seeded.
"""

from __future__ import annotations

from dataclasses import dataclass

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
