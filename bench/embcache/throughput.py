"""Part 2 of bench/embedding_cache.py: lookup throughput of every tier on keys they all hold."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from bench.embcache.common import LARGEST_CRITEO, Phase, fill_tier, pid_cpu_s
from embeddings.device_cache import DeviceCache
from embeddings.hierarchy import ParameterServer
from embeddings.persistent import PersistentTier
from embeddings.redis_tier import RedisTier
from embeddings.tier import TableSpec, Tier
from embeddings.volatile import VolatileTier
from tests.processes import RedisProcess, free_port


def time_lookups(lookup: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], batches: list[torch.Tensor],
                 rounds: int) -> dict:
    """Median seconds per batch over `rounds` rounds (each looks up every batch once; one untimed batch first)."""
    lookup(batches[0])
    per_round = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for keys in batches:
            _, found = lookup(keys)
            if not bool(found.all()):
                raise AssertionError(f"{int((~found).sum())} of {keys.numel()} keys were not found: not fully cached")
        per_round.append((time.perf_counter() - t0) / len(batches))
    return {"s_per_batch": float(np.median(per_round)), "rounds_s_per_batch": [round(x, 6) for x in per_round]}


def throughput(rows: int = 1 << 19, dim: int = 64, batch: int = 16384, batches: int = 8, rounds: int = 5,
               use_redis: bool = True, seed: int = 0, workdir: Path | None = None,
               log: Callable[[str], None] = lambda s: None) -> list[dict]:
    """keys/s and GB/s of batched lookups of keys every tier holds; one dict per tier."""
    rng = np.random.default_rng(seed)
    keys = rng.choice(LARGEST_CRITEO, rows, replace=False).astype(np.int64)
    vectors = rng.standard_normal((rows, dim), dtype=np.float32)
    spec = TableSpec("t", dim, rows=rows)
    own_tmp = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="embedding_cache_")) if workdir is None else workdir
    results: list[dict] = []
    redis_server = None
    tiers: list[Tier] = []
    try:
        # device cache of 2x the rows: 16-way sets at half load drop only the few keys of overfull sets
        device = DeviceCache(2 * rows, 16, "lru", "cpu")
        device.create_table(spec)
        fill_tier(device, "t", keys, vectors)
        held = keys[device.contains("t", torch.from_numpy(keys)).numpy()]
        volatile = VolatileTier(16, max(1 << 20, rows))
        volatile.create_table(spec)
        persistent = PersistentTier(workdir / "rocksdb", sync=False)
        persistent.create_table(spec)
        tiers += [device, volatile, persistent]
        with Phase("fill") as fill:
            fill_tier(volatile, "t", keys, vectors)
            fill_tier(persistent, "t", keys, vectors)
            persistent.flush()
        log(f"  {rows:,} rows of dim {dim}; {held.size:,} held by the device cache; volatile+RocksDB filled in "
            f"{fill.wall_s:.1f} s")
        lookup_batches = [torch.from_numpy(rng.choice(held, batch, replace=False)) for _ in range(batches)]
        server = ParameterServer(persistent, volatile, device)
        candidates: list[tuple[str, Callable, Callable[[], float] | None]] = [
            ("device cache", lambda k: device.lookup("t", k), None),
            ("volatile (memory)", lambda k: volatile.lookup("t", k), None),
        ]
        if use_redis:
            redis_server = RedisProcess(free_port(), workdir / "redis").start()
            redis_tier = RedisTier(redis_server.url, partitions=16, capacity_per_partition=max(1 << 20, rows), timeout_s=5.0)
            redis_tier.create_table(spec)
            tiers.append(redis_tier)
            fill_tier(redis_tier, "t", keys, vectors)
            candidates.append(("redis", lambda k: redis_tier.lookup("t", k), lambda: pid_cpu_s(redis_server.proc.pid)))
        candidates += [("persistent (RocksDB)", lambda k: persistent.lookup("t", k), None),
                       ("ParameterServer (warm)", lambda k: server.lookup("t", k), None)]
        for name, fn, watched in candidates:
            with Phase(name, watched) as phase:
                timing = time_lookups(fn, lookup_batches, rounds)
            s = timing["s_per_batch"]
            results.append({"tier": name, "keys_per_batch": batch, "dim": dim, "rows": rows,
                            "keys_per_s": batch / s, "GB_per_s": batch * dim * 4 / s / 1e9, "ms_per_batch": 1e3 * s,
                            **timing, "phase": phase.record()})
            log(f"  {name:24} {batch / s / 1e6:7.3f} M keys/s {batch * dim * 4 / s / 1e9:6.3f} GB/s "
                f"({1e3 * s:.2f} ms a batch; others took {phase.record()['other_share']} of the CPU)")
        base = next(r["keys_per_s"] for r in results if r["tier"].startswith("persistent"))
        for r in results:
            r["vs_persistent"] = r["keys_per_s"] / base
        return results
    finally:
        for tier in tiers:
            tier.close()
        if redis_server is not None:
            redis_server.stop()
        if own_tmp:
            shutil.rmtree(workdir, ignore_errors=True)
