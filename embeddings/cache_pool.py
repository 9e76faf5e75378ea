"""The storage of the device cache: one set-associative pool of slots for every table of one vector size.

A pool holds `num_sets` sets of `ways` slots; table i owns the sets `base[i] .. base[i] + sets[i] - 1`, so a
batch over many tables is one op sequence over the pool (set of a key = base[table] + hash(key) mod
sets[table]) while each table keeps the capacity it was configured with. A key may live only in its set,
picked by a multiplicative (Fibonacci) hash so that sequential keys spread over sets.

An empty slot holds its set's `empty` key, one that hashes to another set of the table, so a lookup is a
plain compare with no occupancy mask (a table of a single set has no such key: there the key -2^63 marks
empty slots and is never cached).

Replacement within a set, by policy (empty slots are always filled first; rows a batch refreshes are
never evicted by the batch's own new keys):
- `lru`: the slot used longest ago goes first (one tick per call; ties: lowest way). When more new keys
  map to a set than it has evictable slots, the ones earlier in the batch win.
- `lfu`: the slot used least often since insertion goes first (ties: least recently, then lowest way).
- `tinylfu`: a count-min sketch (`embeddings/sketch.py`) counts every looked-up key, cached or not. The
  victim is the least recently used slot (as lru), and a new key takes it only if the sketch estimates
  the new key more frequent than the victim's key (or the slot is empty): TinyLFU's admission, which
  keeps one-off keys from displacing frequent ones. New keys of one set compete in order of estimate.
  (Choosing the victim by lowest estimate instead gained at most 0.3 points of hit rate on
  bench/embedding_cache.py's traces and cost a sketch probe of every slot of every touched set.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from embeddings.sketch import FrequencySketch
from kernels.cache_lookup import set_of

_SALT = 0x632BE59BD9B4E019  # mixes a table's base set into the sketch's key, so equal keys of two tables differ
INT64_MAX = torch.iinfo(torch.int64).max
INT64_MIN = torch.iinfo(torch.int64).min
_SCORE_MAX = (1 << 22) - 1  # frequency bits of a victim score: (frequency << 40) | last use tick
# tinylfu's sketch: 2 counters a slot per row (4 rows: 32 bytes a slot), halved every 100 lookups a slot. Tuned on
# bench/embedding_cache.py's hit-rate traces (1% cache, α 1.05): 1x/10 (Caffeine's) 0.499, 2x/100 0.540, 4x/100 0.545.
SKETCH_WIDTH, SKETCH_SAMPLE = 2.0, 100


def empty_keys(num_sets: int) -> torch.Tensor:
    """[num_sets, 1] int64: for each set a key that maps to another set (-2^63 when there is one set)."""
    if num_sets == 1:
        return torch.full((1, 1), INT64_MIN, dtype=torch.int64)
    candidates = torch.arange(256)
    where = set_of(candidates, num_sets)
    a, b = candidates[0], candidates[where != where[0]][0]  # two keys in different sets
    sets = torch.arange(num_sets)
    return torch.where(sets == where[0], b, a)[:, None]


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeroed tensor; on the CPU from numpy: large arrays get transparent huge pages (fewer TLB misses)."""
    if device.type == "cpu":
        return torch.from_numpy(np.zeros(shape, dtype=np.float32 if dtype == torch.float32 else np.int64))
    return torch.zeros(shape, dtype=dtype, device=device)


@dataclass
class Located:
    """A batch over some tables of a pool: keys [n], their global sets [n], and per-key table facts."""

    keys: torch.Tensor  # [n] int64
    sets: torch.Tensor  # [n] int64, global set index
    marker: torch.Tensor | None  # [n] bool: the single-set empty marker (never cached); None when no such table
    hkeys: torch.Tensor | None  # [n] int64: keys salted by table, for the sketch (tinylfu only)
    tables: list[int]  # pool table indices of the batch's parts
    counts: list[int]  # keys in each part


@dataclass
class Pool:
    """The cache arrays of every table of one dim; slot i of set s is row s * ways + i."""

    dim: int
    ways: int
    policy: str
    device: torch.device
    keys: torch.Tensor = field(init=False)  # [S, ways] int64, `empty` where the slot is free
    empty: torch.Tensor = field(init=False)  # [S, 1] int64, a key that never maps to the set
    last: torch.Tensor = field(init=False)  # [S, ways] int64, tick of the last use
    freq: torch.Tensor | None = field(init=False)  # [S, ways] int64, uses since insertion (lfu only)
    values: torch.Tensor = field(init=False)  # [S * ways, dim] float32
    defaults: torch.Tensor = field(init=False)  # [T, dim] float32, each table's default vector
    sketch: FrequencySketch | None = None  # tinylfu only
    bases: list[int] = field(default_factory=list)  # first set of each table
    sizes: list[int] = field(default_factory=list)  # sets of each table
    tick: int = 0

    def __post_init__(self) -> None:
        dev, ways = self.device, self.ways
        self.keys, self.last = zeros((0, ways), torch.int64, dev), zeros((0, ways), torch.int64, dev)
        self.freq = zeros((0, ways), torch.int64, dev) if self.policy == "lfu" else None
        self.empty = zeros((0, 1), torch.int64, dev)
        self.values, self.defaults = zeros((0, self.dim), torch.float32, dev), zeros((0, self.dim), torch.float32, dev)
        self._base_t = torch.zeros(0, dtype=torch.int64, device=dev)
        self._size_t = torch.zeros(0, dtype=torch.int64, device=dev)

    @property
    def num_sets(self) -> int:
        """Sets of every table of the pool."""
        return self.keys.shape[0]

    def add_table(self, num_sets: int, default: torch.Tensor) -> int:
        """Append a table of num_sets empty sets; return its index. Copies the pool (tables are made at start-up)."""
        old, total, dev = self.num_sets, self.num_sets + num_sets, self.device
        empty = torch.cat([self.empty, empty_keys(num_sets).to(dev)])

        def grown(t: torch.Tensor, rows: int, dtype: torch.dtype) -> torch.Tensor:
            new = zeros((rows, *t.shape[1:]), dtype, dev)
            new[:t.shape[0]] = t
            return new

        keys = grown(self.keys, total, torch.int64)
        keys[old:] = empty[old:].expand(num_sets, self.ways)
        self.keys, self.empty = keys, empty
        self.last = grown(self.last, total, torch.int64)
        self.freq = grown(self.freq, total, torch.int64) if self.freq is not None else None
        self.values = grown(self.values, total * self.ways, torch.float32)
        self.defaults = torch.cat([self.defaults, default.to(dev)[None]])
        self.bases.append(old)
        self.sizes.append(num_sets)
        self._base_t = torch.tensor(self.bases, dtype=torch.int64, device=dev)
        self._size_t = torch.tensor(self.sizes, dtype=torch.int64, device=dev)
        if self.policy == "tinylfu":  # sized to the whole pool; counts so far are dropped (start-up only)
            self.sketch = FrequencySketch(total * self.ways, width_factor=SKETCH_WIDTH, sample_factor=SKETCH_SAMPLE,
                                          device=dev)
        return len(self.bases) - 1

    def locate(self, tables: list[int], keys: list[torch.Tensor]) -> Located:
        """Concatenate the tables' keys (each [n_i] int64 on the device) and find each key's set."""
        counts = [k.numel() for k in keys]
        flat = keys[0] if len(keys) == 1 else torch.cat(keys)  # [n]
        if len(tables) == 1:
            t = tables[0]
            base: int | torch.Tensor = self.bases[t]
            sets = set_of(flat, self.sizes[t])
            if base:
                sets += base
            single = self.sizes[t] == 1
            marker = (flat == INT64_MIN) if single else None
        else:
            it, ct = torch.tensor(tables, device=self.device), torch.tensor(counts, device=self.device)
            base = self._base_t.index_select(0, it).repeat_interleave(ct)  # [n]
            size = self._size_t.index_select(0, it).repeat_interleave(ct)  # [n]
            sets = set_of(flat, size) + base
            marker = ((flat == INT64_MIN) & (size == 1)) if any(self.sizes[t] == 1 for t in tables) else None
        hkeys = flat ^ (base * _SALT) if self.sketch is not None else None
        return Located(flat, sets, marker, hkeys, tables, counts)

    def find(self, at: Located) -> tuple[torch.Tensor, torch.Tensor]:
        """found [n] bool and flat slot [n] of each key (the slot is meaningless where not found)."""
        # index_select: several times faster than advanced indexing on the CPU
        match = self.keys.index_select(0, at.sets) == at.keys[:, None]  # [n, ways]; empty slots never match
        found, way = match.view(torch.uint8).max(dim=1)  # a key is in at most one way
        found = found.view(torch.bool)
        if at.marker is not None:
            found &= ~at.marker
        return found, at.sets * self.ways + way

    def touch(self, flat: torch.Tensor) -> None:
        """Record a use of the slots (duplicates count once: gather, add, scatter)."""
        self.last.view(-1).index_fill_(0, flat, self.tick)
        if self.freq is not None:
            freq = self.freq.view(-1)
            freq.index_copy_(0, flat, freq.index_select(0, flat) + 1)  # duplicates write the same value

    def insert(self, at: Located, vectors: torch.Tensor) -> tuple[int, int]:
        """Cache rows of keys unique within their table (vectors [n, dim]); returns (rows added, rows evicted)."""
        self.tick += 1
        ways, dev = self.ways, self.device
        found, flat = self.find(at)
        # Refresh the rows already cached (index_copy_ throughout: advanced indexing is slower on the CPU).
        hit = torch.nonzero(found).squeeze(1)
        if hit.numel():
            hit_flat = flat.index_select(0, hit)
            self.values.index_copy_(0, hit_flat, vectors.index_select(0, hit))
            self.touch(hit_flat)
        new = ~found if at.marker is None else ~(found | at.marker)  # the empty marker cannot be cached
        idx = torch.nonzero(new).squeeze(1)  # [m] positions of the new keys in the batch
        if idx.numel() == 0:
            return 0, 0
        est = None
        if self.sketch is not None:  # the most frequent new keys of a set compete first
            est = self.sketch.estimate(at.hkeys.index_select(0, idx))  # [m]
            by_est = torch.argsort(est, descending=True, stable=True)
            idx, est = idx.index_select(0, by_est), est.index_select(0, by_est)
        nsets = at.sets.index_select(0, idx)
        order = torch.argsort(nsets, stable=True)  # group by set; batch (or estimate) order within a set
        idx, nsets = idx.index_select(0, order), nsets.index_select(0, order)
        touched, counts = torch.unique_consecutive(nsets, return_counts=True)  # [t], [t]
        starts = torch.cumsum(counts, 0) - counts
        group = torch.repeat_interleave(counts)  # [m] index of each key's set in `touched`
        rank = torch.arange(idx.numel(), device=dev) - starts.index_select(0, group)  # [m] position in its set
        # Victim order per touched set: empty first, then by policy score; protected (refreshed) slots never.
        last = self.last.index_select(0, touched)  # [t, ways]
        prot = last == self.tick
        set_keys = self.keys.index_select(0, touched)  # [t, ways]
        occupied = set_keys != self.empty.index_select(0, touched)
        score = last
        if self.freq is not None:
            score = (self.freq.index_select(0, touched).clamp(max=_SCORE_MAX) << 40) | last
        score = torch.where(occupied, score, -1)
        score = torch.where(prot, INT64_MAX, score)
        # Victims in the order a stable sort of the scores gives (lowest score, then lowest way). Most sets get one
        # new key: their first minimum (argmin) is all they need; only the sets that get several are sorted.
        room = ways - prot.sum(dim=1)  # [t]
        need = torch.minimum(counts, room)  # [t] victims each set gives up
        deep = max(1, int(need.max()))
        victims = torch.empty(touched.numel(), deep, dtype=torch.int64, device=dev)  # [t, deep]
        victims[:, 0] = score.argmin(dim=1)  # the first minimum, as the stable sort's first
        several = torch.nonzero(need > 1).squeeze(1)
        if several.numel():
            ways_sorted = torch.sort(score.index_select(0, several), dim=1, stable=True).indices  # [s, ways]
            victims.index_copy_(0, several, ways_sorted[:, :deep])
        ok = torch.nonzero(rank < room.index_select(0, group)).squeeze(1)  # [k] new keys that get a slot
        group, rank, idx, nsets = (x.index_select(0, ok) for x in (group, rank, idx, nsets))
        way = victims.view(-1).index_select(0, group * deep + rank)  # [k]
        at_victim = group * ways + way  # [k] into the [t, ways] arrays
        taken = occupied.view(-1).index_select(0, at_victim)  # [k] the victim slot holds a key
        if self.sketch is not None:  # admission: a new key must be estimated more frequent than the key it evicts
            salt = at.hkeys.index_select(0, idx) ^ at.keys.index_select(0, idx)  # [k] its table's salt
            victim_est = self.sketch.estimate(set_keys.view(-1).index_select(0, at_victim) ^ salt)  # [k]
            admit = torch.nonzero(~taken | (est.index_select(0, order.index_select(0, ok)) > victim_est)).squeeze(1)
            idx, nsets, way, taken = (x.index_select(0, admit) for x in (idx, nsets, way, taken))
        dest = nsets * ways + way  # [k] flat slots
        self.keys.view(-1).index_copy_(0, dest, at.keys.index_select(0, idx))
        self.values.index_copy_(0, dest, vectors.index_select(0, idx))
        self.last.view(-1).index_fill_(0, dest, self.tick)
        if self.freq is not None:
            self.freq.view(-1).index_fill_(0, dest, 1)
        return dest.numel(), int(taken.sum())

    def table_of(self, at: Located, positions: torch.Tensor) -> torch.Tensor:
        """Pool table index of batch positions [m] of a located batch."""
        ends = torch.tensor(np.cumsum(at.counts), dtype=torch.int64, device=self.device)
        parts = torch.searchsorted(ends, positions, right=True)
        return torch.tensor(at.tables, dtype=torch.int64, device=self.device).index_select(0, parts)

    def region(self, table: int) -> slice:
        """The table's sets."""
        return slice(self.bases[table], self.bases[table] + self.sizes[table])

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the pool holds (for memory accounting)."""
        out = [self.keys, self.empty, self.last, self.values, self.defaults]
        out += [self.freq] if self.freq is not None else []
        out += [self.sketch.counts] if self.sketch is not None else []
        return out
