"""Part 4 of bench/embedding_cache.py: the fixed cost of one tier call."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from bench.embcache.common import median_ms
from embeddings.device_cache import DeviceCache
from embeddings.persistent import PersistentTier
from embeddings.tier import TableSpec
from embeddings.volatile import VolatileTier


def call_costs(cache_slots_list: tuple[int, ...] = (1 << 14, 1 << 17, 1 << 20, 1 << 22), sizes: tuple[int, ...] = (100, 1000, 16384),
               dim: int = 16, repeats: int = 30, seed: int = 0, workdir: Path | None = None, tables: int = 26) -> list[dict]:
    """Median ms of one lookup / insert call of new random keys: DeviceCache by cache size (100 keys), VolatileTier
    and PersistentTier by keys a call. Explains the per-table cost of a multi-table batch (part 3). Then a batch of
    `tables` tables x 100 keys (a DLRM batch's misses), DeviceCache and VolatileTier: one `lookup_many` /
    `insert_many` against one call per table, in the same run."""
    rng = np.random.default_rng(seed)

    def new_keys(n: int) -> torch.Tensor:
        return torch.from_numpy(rng.integers(0, 1 << 40, n))

    rows = []
    for slots in cache_slots_list:
        cache = DeviceCache(slots, 16, "lru", "cpu")
        cache.create_table(TableSpec("t", dim, rows=slots))
        cache.insert("t", new_keys(min(slots, 1 << 16)), torch.zeros(min(slots, 1 << 16), dim))
        zeros = torch.zeros(100, dim)
        rows.append({"tier": "device cache", "slots": slots, "keys": 100,
                     "lookup_ms": median_ms(lambda c=cache: c.lookup("t", new_keys(100)), repeats),
                     "insert_ms": median_ms(lambda c=cache, z=zeros: c.insert("t", new_keys(100), z), repeats)})
    own_tmp = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="embedding_cache_calls_")) if workdir is None else workdir
    volatile = VolatileTier(16, 1 << 20)
    persistent = PersistentTier(workdir / "rocksdb", sync=False)
    try:
        for tier in (volatile, persistent):
            tier.create_table(TableSpec("t", dim))
        for n in sizes:
            held = new_keys(n)
            zeros = torch.zeros(n, dim)
            for tier in (volatile, persistent):
                tier.insert("t", held, zeros)
                rows.append({"tier": tier.name, "slots": None, "keys": n,
                             "lookup_ms": median_ms(lambda t=tier, k=held: t.lookup("t", k), repeats),
                             "insert_ms": median_ms(lambda t=tier, z=zeros, n=n: t.insert("t", new_keys(n), z), max(3, repeats // 3))})
        rows += multi_table_costs(dim, repeats, tables, new_keys)
        return rows
    finally:
        persistent.close()
        if own_tmp:
            shutil.rmtree(workdir, ignore_errors=True)


def multi_table_costs(dim: int, repeats: int, tables: int, new_keys: Callable[[int], torch.Tensor]) -> list[dict]:
    """One grouped call over `tables` tables x 100 new keys against `tables` single-table calls, per tier."""
    names = [f"C{i + 1}" for i in range(tables)]
    cache = DeviceCache(1 << 14, 16, "lru", "cpu")
    volatile = VolatileTier(16, 1 << 20)
    zeros = torch.zeros(100, dim)
    for name in names:
        for tier in (cache, volatile):
            tier.create_table(TableSpec(name, dim, rows=1 << 14))
        cache.insert(name, new_keys(1 << 13), torch.zeros(1 << 13, dim))
    out = []
    for tier in (cache, volatile):
        held = {n: new_keys(100) for n in names}
        tier.insert_many({n: (k, zeros) for n, k in held.items()})

        def each_lookup(t=tier, held=held):
            for n, k in held.items():
                t.lookup(n, k)

        def each_insert(t=tier):
            for n in names:
                t.insert(n, new_keys(100), zeros)

        out.append({"tier": f"{tier.name} x{tables} tables", "slots": None, "keys": 100 * tables,
                    "lookup_ms": median_ms(lambda t=tier, h=held: t.lookup_many(h), repeats),
                    "insert_ms": median_ms(lambda t=tier: t.insert_many({n: (new_keys(100), zeros) for n in names}), repeats),
                    "per_table_lookup_ms": median_ms(each_lookup, repeats),
                    "per_table_insert_ms": median_ms(each_insert, repeats)})
    return out
