"""Embedding cache benchmark (issue 6): hit rates against Belady's optimum, tier throughput, DLRM end to end.

    .venv/bin/python bench/embedding_cache.py --out bench/out        # the full run (about 4 minutes here)
    .venv/bin/python bench/embedding_cache.py --quick                # a 15-30 s smoke run of every path

1. Hit rate. One table: the largest Criteo Kaggle cardinality (10,131,227 rows) times --hit-scale (0.2: 2,026,245
   rows). Keys from `bench.cache_trace.sample_keys` (power law α 0.9 / 1.05 / 1.2 over hashed ranks, and
   uniform), in batches of --hit-batch keys. The first half of the batches warms every cache up; hits are counted
   on the second half only, per batch over the batch's distinct keys (as the ParameterServer looks them up).
   Cache sizes 1 %, 5 %, 20 % of the rows, rounded up to whole sets of --ways slots; every policy gets that
   many slots. Policies:
   - device LRU / LFU: `DeviceCache` (set-associative, --ways 16) driven as `ParameterServer.lookup` drives it:
     `lookup(unique keys)`, then `insert` of the misses. Rows have dim 1 (the hit rate does not depend on dim).
   - LRU ref: `cache_trace.lru_hits`, fully associative LRU (hits = whole trace minus the warm-up part: LRU is
     online, so its warm-up hits are the same either way). LFU ref (`--lfu-reference`): `lfu_hits`, likewise.
   - Belady: `cache_trace.belady_hits` in batches of the same size, demand paging (every miss enters, like the
     policies above: the like-for-like bound) and with bypass (a miss may stay out: the bound for any policy).
     Warm-up for Belady is perfect: the measured part starts with the cache holding the C keys of the warm-up
     part that the measured part uses soonest (the warm-up part is fed as one batch of its distinct keys). No
     cache that only saw the warm-up part can start better, so this is an upper bound for the measured part.
2. Throughput: lookups of --tp-batch distinct keys (dim 64), all held by the tier, keys drawn uniformly from
   --tp-rows stored rows: device cache, volatile tier, Redis tier (a redis-server started here on a free
   loopback port), persistent tier (RocksDB in a temp dir, flushed to SST files), and the ParameterServer
   (persistent + volatile + that device cache, every key cached). Median over rounds; GB/s counts the bytes
   of the rows returned (keys × dim × 4).
3. DLRM end to end: 13 dense features, 26 sparse features with the Criteo Kaggle cardinalities × --dlrm-scale,
   dim 16, DLRM's Criteo Kaggle MLPs (bottom 512-256-64-16, top 512-256-1), seeded random weights (`save_dlrm`,
   `load_dlrm`) and rows (uniform ±1/sqrt(rows), as `save_random_tables`) in a temp RocksDB. Batches of 1,024
   samples, one key per sample per feature, α 1.05 (`make_trace`). Through a ParameterServer (device cache
   --dlrm-cache of each table's rows, 16-way LRU; in-memory volatile tier), warmed on --dlrm-warm batches of the
   same trace (the device hit rate is steady by then), against the same model looking rows up straight from the
   persistent tier. Both see the same fresh batches each round; their scores must agree. One request = one sample
   scored. The time inside the ParameterServer is split by tier method (device lookup/insert, volatile ...).
4. Fixed cost of one call: median ms of one lookup / insert of new random keys (dim 16): DeviceCache with 100
   keys in caches of 16k to 4M slots; VolatileTier and PersistentTier with 100, 1,000 and 16,384 keys.

torch runs with --threads intra-op threads (default 1): on a machine shared with other busy processes, two
OpenMP threads on two cores made every small torch op 10-60x slower (a thread waits at each op's barrier for
a partner the scheduler has descheduled). Each phase records how much CPU other processes took meanwhile.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cache_trace import (
    CRITEO_KAGGLE_CARDINALITIES,
    belady_hits,
    criteo_cardinalities,
    lfu_hits,
    lru_hits,
    make_trace,
    sample_keys,
)
from embeddings.device_cache import DeviceCache
from embeddings.hierarchy import ParameterServer, PrefetchedLookup
from embeddings.persistent import PersistentTier
from embeddings.redis_tier import RedisTier
from embeddings.tier import TableSpec, Tier
from embeddings.volatile import VolatileTier
from models.runtime import cpu_name
from models.dlrm import DLRMConfig, SparseFeature, load_dlrm, save_dlrm

LARGEST_CRITEO = max(CRITEO_KAGGLE_CARDINALITIES)
UNIFORM = 0.0  # alpha 0 means uniform keys in cache_trace


# --- machine and CPU accounting ----------------------------------------------------------------------------------

def machine_info() -> dict:
    """CPU model, cores, versions and torch threads, for the record."""
    cpu = cpu_name()
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}


def _machine_busy_s() -> float | None:
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    except (OSError, ValueError):
        return None
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


class Phase:
    """Wall time of a phase and the CPU seconds other processes took during it (`other_cpu_s`)."""

    def __init__(self, name: str, watched: Callable[[], float] | None = None) -> None:
        self.name, self.watched = name, watched  # watched: CPU seconds of a helper we started (redis-server)

    def __enter__(self) -> Self:
        self.t0, self.busy0, self.own0 = time.perf_counter(), _machine_busy_s(), sum(os.times()[:2])
        self.helper0 = self.watched() if self.watched else 0.0
        return self

    def __exit__(self, *exc) -> None:
        self.wall_s = time.perf_counter() - self.t0
        busy = _machine_busy_s()
        own = sum(os.times()[:2]) - self.own0 + ((self.watched() - self.helper0) if self.watched else 0.0)
        self.other_cpu_s = None if busy is None or self.busy0 is None else max(0.0, busy - self.busy0 - own)

    def record(self) -> dict:
        capacity = self.wall_s * (os.cpu_count() or 1)
        other = self.other_cpu_s
        return {"wall_s": round(self.wall_s, 2), "other_cpu_s": None if other is None else round(other, 2),
                "other_share": None if other is None else round(other / capacity, 3)}


def _pid_cpu_s(pid: int) -> float:
    try:
        parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


# --- 1. hit rates ------------------------------------------------------------------------------------------------

def cache_slots(rows: int, fraction: float, ways: int) -> int:
    """Slots of a cache of `fraction` of `rows`, rounded up to whole sets (what DeviceCache allocates)."""
    return math.ceil(math.ceil(fraction * rows) / ways) * ways


def device_cache_hits(keys: np.ndarray, batch: int, warm_batches: int, slots: int, ways: int, policy: str) -> tuple[int, int]:
    """(hits, lookups) of a DeviceCache on the batches after the warm-up; lookups = distinct keys per batch."""
    cache = DeviceCache(slots, ways, policy, "cpu")  # type: ignore[arg-type]
    cache.create_table(TableSpec("t", 1, rows=slots))
    assert cache._slots["t"].keys.numel() == slots, "cache_slots must match DeviceCache's rounding"
    hits = lookups = 0
    k = torch.from_numpy(keys)
    for b in range(keys.size // batch):
        uniq = torch.unique(k[b * batch:(b + 1) * batch])  # as ParameterServer.lookup
        _, found = cache.lookup("t", uniq)
        miss = uniq[~found]
        if miss.numel():
            cache.insert("t", miss, torch.zeros(miss.numel(), 1))
        if b >= warm_batches:
            hits += int(found.sum())
            lookups += uniq.numel()
    return hits, lookups


def online_reference_hits(fn: Callable, keys: np.ndarray, batch: int, warm_batches: int, slots: int) -> tuple[int, int]:
    """(hits, lookups) of an online reference (lru_hits, lfu_hits) after the warm-up: whole trace minus warm-up."""
    whole = fn(keys, slots, batch_size=batch)
    warm = fn(keys[:warm_batches * batch], slots, batch_size=batch)
    return whole.hits - warm.hits, whole.lookups - warm.lookups


def belady_measured_hits(keys: np.ndarray, batch: int, warm_batches: int, slots: int, bypass: bool) -> tuple[int, int]:
    """(hits, lookups) of Belady on the batches after the warm-up, from the best state the warm-up allows.

    The warm-up part becomes one batch of its distinct keys: Belady keeps the `slots` of them used soonest after
    it (no hits in that batch: the cache starts empty), then runs on the measured batches."""
    split = warm_batches * batch
    warm = np.unique(keys[:split])
    measured = keys[split:keys.size // batch * batch]
    offsets = np.concatenate([[0], warm.size + np.arange(0, measured.size + 1, batch)]).astype(np.int64)
    result = belady_hits(np.concatenate([warm, measured]), slots, offsets=offsets, bypass=bypass)
    return result.hits, result.lookups - warm.size


def hit_rate_grid(rows: int, fractions: tuple[float, ...], alphas: tuple[float, ...], batch: int, batches: int,
                  warm_batches: int, ways: int = 16, seed: int = 0, lfu_reference: bool = False,
                  log: Callable[[str], None] = lambda s: None) -> list[dict]:
    """Hit rates of every policy for every (key distribution, cache size); one dict per cell."""
    cells = []
    for alpha in alphas:
        keys = sample_keys(rows, alpha, batch * batches, seed)
        for fraction in fractions:
            slots = cache_slots(rows, fraction, ways)
            t0 = time.perf_counter()
            cell: dict = {"alpha": alpha, "distribution": "uniform" if alpha == UNIFORM else f"α={alpha}",
                          "fraction": fraction, "slots": slots}
            runs: dict[str, tuple[int, int]] = {
                "device_lru": device_cache_hits(keys, batch, warm_batches, slots, ways, "lru"),
                "device_lfu": device_cache_hits(keys, batch, warm_batches, slots, ways, "lfu"),
                "lru_ref": online_reference_hits(lru_hits, keys, batch, warm_batches, slots),
                "belady": belady_measured_hits(keys, batch, warm_batches, slots, bypass=False),
                "belady_bypass": belady_measured_hits(keys, batch, warm_batches, slots, bypass=True),
            }
            if lfu_reference:
                runs["lfu_ref"] = online_reference_hits(lfu_hits, keys, batch, warm_batches, slots)
            lookups = {n for _, n in runs.values()}
            assert len(lookups) == 1, f"policies counted different lookups: {runs}"
            cell["lookups"] = lookups.pop()
            for name, (hits, n) in runs.items():
                cell[name] = hits / n if n else 0.0
            best = max(cell["device_lru"], cell["device_lfu"])
            cell["device_lru_vs_belady"] = cell["device_lru"] / cell["belady"] if cell["belady"] else 1.0
            cell["device_lfu_vs_belady"] = cell["device_lfu"] / cell["belady"] if cell["belady"] else 1.0
            cell["best_device_vs_belady"] = best / cell["belady"] if cell["belady"] else 1.0
            cell["seconds"] = round(time.perf_counter() - t0, 2)
            cells.append(cell)
            log(f"  {cell['distribution']:8} {fraction:5.0%}: device LRU {cell['device_lru']:.4f} LFU "
                f"{cell['device_lfu']:.4f}, LRU ref {cell['lru_ref']:.4f}, Belady {cell['belady']:.4f} "
                f"(bypass {cell['belady_bypass']:.4f}) [{cell['seconds']} s]")
    return cells


# --- 2. throughput -------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A redis-server on a free loopback port, no persistence, stopped by `stop` (as tests/embeddings/conftest.py)."""

    def __init__(self, workdir: Path) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (make redis-server installs Debian's)")
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc = subprocess.Popen([exe, "--port", str(self.port), "--save", "", "--appendonly", "no", "--bind",
                                      "127.0.0.1", "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        client, deadline = redis.Redis(port=self.port, socket_connect_timeout=0.2), time.monotonic() + 10
        while True:
            try:
                if client.ping():
                    break
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {self.port} did not start") from None
                time.sleep(0.01)
        client.close()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def cpu_s(self) -> float:
        return _pid_cpu_s(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def _fill(tier: Tier | ParameterServer, table: str, keys: np.ndarray, vectors: np.ndarray, chunk: int = 1 << 16) -> None:
    for i in range(0, keys.size, chunk):
        tier.insert(table, torch.from_numpy(keys[i:i + chunk]), torch.from_numpy(vectors[i:i + chunk]))  # type: ignore[union-attr]


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
        _fill(device, "t", keys, vectors)
        held = keys[device.contains("t", torch.from_numpy(keys)).numpy()]
        volatile = VolatileTier(16, max(1 << 20, rows))
        volatile.create_table(spec)
        persistent = PersistentTier(workdir / "rocksdb", sync=False)
        persistent.create_table(spec)
        tiers += [device, volatile, persistent]
        with Phase("fill") as fill:
            _fill(volatile, "t", keys, vectors)
            _fill(persistent, "t", keys, vectors)
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
            redis_server = RedisServer(workdir / "redis")
            redis_tier = RedisTier(redis_server.url, partitions=16, capacity_per_partition=max(1 << 20, rows), timeout_s=5.0)
            redis_tier.create_table(spec)
            tiers.append(redis_tier)
            _fill(redis_tier, "t", keys, vectors)
            candidates.append(("redis", lambda k: redis_tier.lookup("t", k), redis_server.cpu_s))
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


# --- 3. DLRM end to end --------------------------------------------------------------------------------------------

def dlrm_config(cardinalities: np.ndarray, dim: int, bottom: tuple[int, ...], top: tuple[int, ...]) -> DLRMConfig:
    features = tuple(SparseFeature(f"C{i + 1}", f"C{i + 1}", int(n)) for i, n in enumerate(cardinalities))
    return DLRMConfig(num_dense=13, bottom_mlp=(*bottom, dim), top_mlp=(*top, 1), embedding_dim=dim, sparse_features=features)


def fill_tables(persistent: PersistentTier, config: DLRMConfig, seed: int, chunk: int = 1 << 18) -> None:
    """Every row of every table, uniform in ±1/sqrt(rows) (DLRM's init, as `save_random_tables`), seeded per table."""
    for index, (table, rows) in enumerate(config.tables.items()):
        persistent.create_table(TableSpec(table, config.embedding_dim, rows=rows))
        rng, bound = np.random.default_rng([seed, index]), 1 / math.sqrt(rows)
        for start in range(0, rows, chunk):
            stop = min(rows, start + chunk)
            vectors = rng.uniform(-bound, bound, (stop - start, config.embedding_dim)).astype(np.float32)
            persistent.insert(table, torch.arange(start, stop), torch.from_numpy(vectors), sync=False)
    persistent.flush()


class TimedLookup:
    """A lookup callable for the DLRM that adds up the time spent in it. With a ParameterServer and the model's
    config, `for_batch` first fetches every table of the batch in one `lookup_many` (timed too), as
    server/recommend.py does; without, it is the callable itself."""

    def __init__(self, fn: Callable[[str, torch.Tensor], torch.Tensor], server: ParameterServer | None = None,
                 config: DLRMConfig | None = None) -> None:
        self.fn, self.seconds, self.server, self.config = fn, 0.0, server, config

    def for_batch(self, sparse: dict) -> TimedLookup:
        if self.server is None or self.config is None:
            return self
        t0 = time.perf_counter()
        keys_by_table: dict[str, list[torch.Tensor]] = {}
        for f in self.config.sparse_features:
            keys_by_table.setdefault(f.table, []).append(sparse[f.name][0])
        self.fn = PrefetchedLookup(self.server, keys_by_table)
        self.seconds += time.perf_counter() - t0
        return self

    def __call__(self, table: str, keys: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        rows = self.fn(table, keys)
        self.seconds += time.perf_counter() - t0
        return rows


class OpTimer:
    """Seconds spent in each tier method while `active` (wraps the methods of the given tier objects)."""

    def __init__(self, tiers: list[Tier], methods: tuple[str, ...] = ("lookup", "insert")) -> None:
        self.active, self.seconds = False, {f"{t.name}.{m}": 0.0 for t in tiers for m in methods}
        for tier in tiers:
            for method in methods:
                setattr(tier, method, self._wrap(getattr(tier, method), f"{tier.name}.{method}"))

    def _wrap(self, fn: Callable, name: str) -> Callable:
        def timed(*args, **kwargs):
            if not self.active:
                return fn(*args, **kwargs)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t0
        return timed


def dlrm_end_to_end(scale: float = 0.1, dim: int = 16, batch: int = 1024, alpha: float = 1.05,
                    cache_fractions: tuple[float, ...] = (0.05, 0.2), warm_batches: int = 800, timed_batches: int = 10,
                    rounds: int = 3, bottom: tuple[int, ...] = (512, 256, 64), top: tuple[int, ...] = (512, 256),
                    seed: int = 0, workdir: Path | None = None, log: Callable[[str], None] = lambda s: None) -> list[dict]:
    """Samples/s of a DLRM through a warm ParameterServer vs straight from the persistent tier; one dict per cache size.

    Warm-up: `warm_batches` batches of the trace looked up through the ParameterServer (16 batches a call, no model;
    the device cache reaches the same steady hit rate as with one batch a call). Timed: `rounds` rounds of
    `timed_batches` further batches, each round through both paths (who goes first alternates)."""
    cards = criteo_cardinalities(scale)
    config = dlrm_config(cards, dim, bottom, top)
    own_tmp = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="embedding_cache_dlrm_")) if workdir is None else workdir
    persistent = PersistentTier(workdir / "rocksdb", sync=False)
    results = []
    try:
        with Phase("fill") as fill:
            fill_tables(persistent, config, seed)
        log(f"  26 tables, {int(cards.sum()):,} rows of dim {dim} (Criteo × {scale}, largest {int(cards.max()):,}) "
            f"written to RocksDB in {fill.wall_s:.1f} s")
        model = load_dlrm(save_dlrm(workdir / "model", config, seed), device="cpu")
        total = warm_batches + rounds * timed_batches
        trace = make_trace(cards, batches=total, batch_size=batch, alpha=alpha, seed=seed + 1)
        dense_rng = np.random.default_rng([seed, 2])
        dense = [torch.from_numpy(dense_rng.standard_normal((batch, 13), dtype=np.float32)) for _ in range(total)]
        offsets = torch.arange(batch)

        def sparse(b: int) -> dict:
            return {f.name: (torch.from_numpy(trace.keys[i][b * batch:(b + 1) * batch]), offsets)
                    for i, f in enumerate(config.sparse_features)}

        direct = TimedLookup(lambda t, k: persistent.lookup(t, k)[0])
        for fraction in cache_fractions:
            cache = DeviceCache(fraction, 16, "lru", "cpu")
            volatile = VolatileTier(16, 1 << 20)
            server = ParameterServer(persistent, volatile, cache)
            via_server = TimedLookup(lambda t, k, server=server: server.lookup(t, k)[0], server, config)
            with Phase("warm") as warm:
                for g in range(0, warm_batches, 16):
                    hi = min(warm_batches, g + 16)
                    for i, f in enumerate(config.sparse_features):
                        server.lookup(f.table, torch.from_numpy(trace.keys[i][g * batch:hi * batch]))
            log(f"  cache {fraction:.0%}: warmed on {warm_batches} batches in {warm.wall_s:.1f} s; device cache "
                f"{cache.memory_bytes / 2**20:.1f} MiB")
            ops = OpTimer([cache, volatile, persistent])
            before = server.stats()
            per_batch: dict[str, list[float]] = {"server": [], "persistent": []}
            lookup_s: dict[str, list[float]] = {"server": [], "persistent": []}
            max_diff = 0.0
            with torch.inference_mode(), Phase("timed") as timed:
                for r in range(rounds):
                    chunk = range(warm_batches + r * timed_batches, warm_batches + (r + 1) * timed_batches)
                    scores: dict[str, list[torch.Tensor]] = {}
                    order = (("server", via_server), ("persistent", direct))
                    for name, fn in order if r % 2 == 0 else order[::-1]:  # alternate who goes first
                        fn.seconds, ops.active = 0.0, name == "server"
                        t0 = time.perf_counter()
                        scores[name] = [model(dense[b], sb, fn.for_batch(sb)) for b in chunk for sb in (sparse(b),)]
                        per_batch[name].append((time.perf_counter() - t0) / len(chunk))
                        lookup_s[name].append(fn.seconds / len(chunk))
                        ops.active = False
                    for a, b in zip(scores["server"], scores["persistent"]):
                        max_diff = max(max_diff, float((a - b).abs().max()))
            after = server.stats()
            for tier in (cache, volatile, persistent):  # drop the timing wrappers
                for method in ("lookup", "insert"):
                    vars(tier).pop(method, None)
            if max_diff > 1e-5:
                raise AssertionError(f"DLRM scores through the ParameterServer differ from the persistent path by {max_diff}")
            delta = {tier: {k: v - before[tier].get(k, 0) for k, v in after[tier].items()} for tier in after}
            n_timed = rounds * timed_batches
            med = {k: float(np.median(v)) for k, v in per_batch.items()}
            med_lookup = {k: float(np.median(v)) for k, v in lookup_s.items()}
            breakdown = {k: 1e3 * v / n_timed for k, v in ops.seconds.items()}
            breakdown["server own (dedup, gather, locks)"] = 1e3 * float(np.mean(lookup_s["server"])) - sum(breakdown.values())
            dev, vol = delta["device"], delta["volatile"]
            result = {
                "scale": scale, "dim": dim, "batch": batch, "alpha": alpha, "cache_fraction": fraction,
                "rows": int(cards.sum()), "largest_table": int(cards.max()), "bottom_mlp": [*bottom, dim],
                "top_mlp": [*top, 1], "warm_batches": warm_batches, "timed_batches": timed_batches, "rounds": rounds,
                "device_cache_bytes": cache.memory_bytes, "fill_s": round(fill.wall_s, 1), "warm_s": round(warm.wall_s, 1),
                "server_samples_per_s": batch / med["server"], "persistent_samples_per_s": batch / med["persistent"],
                "server_ms_per_batch": 1e3 * med["server"], "persistent_ms_per_batch": 1e3 * med["persistent"],
                "server_lookup_ms_per_batch": 1e3 * med_lookup["server"],
                "persistent_lookup_ms_per_batch": 1e3 * med_lookup["persistent"],
                "ratio": med["persistent"] / med["server"], "lookup_ratio": med_lookup["persistent"] / med_lookup["server"],
                "server_lookup_breakdown_ms_per_batch": breakdown,
                "device_hit_rate_timed": dev["hits"] / max(1, dev["hits"] + dev["misses"]),
                "volatile_hit_rate_of_misses": vol["hits"] / max(1, vol["hits"] + vol["misses"]),
                "unique_keys_per_batch": delta["server"]["unique_keys"] / n_timed,
                "max_score_diff": max_diff, "rounds_ms": {k: [round(1e3 * x, 2) for x in v] for k, v in per_batch.items()},
                "phase": timed.record(),
            }
            results.append(result)
            log(f"  cache {fraction:.0%}: ParameterServer {result['server_samples_per_s']:,.0f} samples/s "
                f"({result['server_ms_per_batch']:.1f} ms a batch, lookups {result['server_lookup_ms_per_batch']:.1f} ms) "
                f"vs persistent {result['persistent_samples_per_s']:,.0f} samples/s ({result['persistent_ms_per_batch']:.1f} "
                f"ms, lookups {result['persistent_lookup_ms_per_batch']:.1f} ms): {result['ratio']:.2f}x; device hit rate "
                f"{result['device_hit_rate_timed']:.3f}; others took {result['phase']['other_share']} of the CPU")
        return results
    finally:
        persistent.close()
        if own_tmp:
            shutil.rmtree(workdir, ignore_errors=True)


# --- 4. fixed cost of one call ------------------------------------------------------------------------------------

def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def call_costs(cache_slots_list: tuple[int, ...] = (1 << 14, 1 << 17, 1 << 20, 1 << 22), sizes: tuple[int, ...] = (100, 1000, 16384),
               dim: int = 16, repeats: int = 30, seed: int = 0, workdir: Path | None = None) -> list[dict]:
    """Median ms of one lookup / insert call of new random keys: DeviceCache by cache size (100 keys), VolatileTier
    and PersistentTier by keys a call. Explains the per-table cost of a multi-table batch (part 3)."""
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
                     "lookup_ms": _median_ms(lambda c=cache: c.lookup("t", new_keys(100)), repeats),
                     "insert_ms": _median_ms(lambda c=cache, z=zeros: c.insert("t", new_keys(100), z), repeats)})
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
                             "lookup_ms": _median_ms(lambda t=tier, k=held: t.lookup("t", k), repeats),
                             "insert_ms": _median_ms(lambda t=tier, z=zeros, n=n: t.insert("t", new_keys(n), z), max(3, repeats // 3))})
        return rows
    finally:
        persistent.close()
        if own_tmp:
            shutil.rmtree(workdir, ignore_errors=True)


# --- report ----------------------------------------------------------------------------------------------------------

def format_report(results: dict) -> str:
    """The compact tables printed at the end."""
    lines = []
    hr = results.get("hit_rates")
    if hr:
        h = hr["setup"]
        lfu = any("lfu_ref" in c for c in hr["cells"])
        lines.append(f"Hit rate on the measured half ({h['rows']:,} rows, batches of {h['batch']} keys, "
                     f"{h['batches']} batches, {h['ways']}-way device cache)")
        lines.append(f"{'keys':8} {'cache':>5} {'dev LRU':>8} {'dev LFU':>8} {'LRU ref':>8}" + (f" {'LFU ref':>8}" if lfu else "")
                     + f" {'Belady':>8} {'bypass':>8} {'LRU/B':>6} {'LFU/B':>6}")
        for c in hr["cells"]:
            lines.append(f"{c['distribution']:8} {c['fraction']:5.0%} {c['device_lru']:8.4f} {c['device_lfu']:8.4f} "
                         f"{c['lru_ref']:8.4f}" + (f" {c['lfu_ref']:8.4f}" if lfu else "")
                         + f" {c['belady']:8.4f} {c['belady_bypass']:8.4f} {c['device_lru_vs_belady']:6.1%} "
                         f"{c['device_lfu_vs_belady']:6.1%}")
        t = hr["target"]
        lines.append(f"target best device policy >= 95% of Belady at α 1.05-1.2: worst {t['worst']:.1%} -> "
                     f"{'met' if t['met'] else 'MISSED'}")
    tp = results.get("throughput")
    if tp:
        lines.append("")
        lines.append(f"Lookup throughput ({tp[0]['keys_per_batch']:,} keys a batch, dim {tp[0]['dim']}, all held, "
                     f"{tp[0]['rows']:,} rows stored)")
        lines.append(f"{'tier':24} {'M keys/s':>9} {'GB/s':>7} {'ms/batch':>9} {'vs RocksDB':>10} {'others CPU':>10}")
        for r in tp:
            lines.append(f"{r['tier']:24} {r['keys_per_s'] / 1e6:9.3f} {r['GB_per_s']:7.3f} {r['ms_per_batch']:9.2f} "
                         f"{r['vs_persistent']:9.1f}x {r['phase']['other_share']!s:>10}")
    calls = results.get("calls")
    if calls:
        lines.append("")
        lines.append("One call (new random keys; device cache: 100 keys, by cache size)")
        lines.append(f"{'tier':14} {'slots':>9} {'keys':>6} {'lookup ms':>9} {'insert ms':>9}")
        for c in calls:
            lines.append(f"{c['tier']:14} {c['slots'] or '':>9} {c['keys']:6} {c['lookup_ms']:9.3f} {c['insert_ms']:9.3f}")
    for d in results.get("dlrm", []):
        lines.append("")
        lines.append(f"DLRM end to end (batch {d['batch']}, 26 tables, {d['rows']:,} rows dim {d['dim']}, α {d['alpha']}, "
                     f"device cache {d['cache_fraction']:.0%}, warm)")
        lines.append(f"{'path':22} {'samples/s':>10} {'ms/batch':>9} {'lookup ms':>9}")
        lines.append(f"{'ParameterServer':22} {d['server_samples_per_s']:10,.0f} {d['server_ms_per_batch']:9.1f} "
                     f"{d['server_lookup_ms_per_batch']:9.1f}")
        lines.append(f"{'persistent tier only':22} {d['persistent_samples_per_s']:10,.0f} {d['persistent_ms_per_batch']:9.1f} "
                     f"{d['persistent_lookup_ms_per_batch']:9.1f}")
        lines.append(f"ratio {d['ratio']:.2f}x end to end (target >= 5x: {'met' if d['ratio'] >= 5 else 'MISSED'}), "
                     f"{d['lookup_ratio']:.1f}x on the lookups alone; device hit rate {d['device_hit_rate_timed']:.3f}, "
                     f"{d['unique_keys_per_batch']:,.0f} unique keys a batch")
        parts = ", ".join(f"{k} {v:.1f}" for k, v in d["server_lookup_breakdown_ms_per_batch"].items())
        lines.append(f"ParameterServer lookup ms a batch: {parts}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes: a ~30 s smoke run of every path")
    p.add_argument("--out", help="folder for embedding_cache.json")
    p.add_argument("--only", default="hit,throughput,dlrm,calls", help="comma-separated parts: hit, throughput, dlrm, calls")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (see the module docstring)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hit-scale", type=float, default=None, help="table rows = 10,131,227 × this (default 0.2; quick 0.02)")
    p.add_argument("--hit-batch", type=int, default=None, help="keys a batch (default 4096; quick 1024)")
    p.add_argument("--hit-batches", type=int, default=None, help="batches in the trace, half of them warm-up (default 400)")
    p.add_argument("--ways", type=int, default=16)
    p.add_argument("--lfu-reference", action="store_true", help="also the fully associative LFU reference (slow)")
    p.add_argument("--tp-rows", type=int, default=None, help="rows stored for the throughput test (default 2^19)")
    p.add_argument("--tp-batch", type=int, default=16384)
    p.add_argument("--no-redis", action="store_true")
    p.add_argument("--dlrm-scale", type=float, default=None, help="Criteo cardinalities × this (default 0.1; quick 0.005)")
    p.add_argument("--dlrm-dim", type=int, default=16)
    p.add_argument("--dlrm-batch", type=int, default=1024, help="samples a batch")
    p.add_argument("--dlrm-cache", default="0.05,0.2", help="device cache fractions, comma-separated")
    p.add_argument("--dlrm-warm", type=int, default=None, help="warm-up batches (default 800; quick 32)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    quick = args.quick
    parts = set(args.only.split(","))
    results: dict = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
                     "machine": machine_info(), "quick": quick,
                     "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "loadavg_start": os.getloadavg()}
    try:
        results["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                           cwd=Path(__file__).resolve().parent, check=False).stdout.strip() or None
    except OSError:
        results["commit"] = None

    def log(s: str) -> None:
        print(s, flush=True)

    t_start = time.perf_counter()
    if "hit" in parts:
        scale = args.hit_scale or (0.02 if quick else 0.2)
        rows = round(LARGEST_CRITEO * scale)
        batch = args.hit_batch or (1024 if quick else 4096)
        batches = args.hit_batches or (60 if quick else 400)
        log(f"1. hit rates: {rows:,} rows, {batches} batches of {batch} keys (first {batches // 2} warm-up)")
        with Phase("hit") as phase:
            cells = hit_rate_grid(rows, (0.01, 0.05, 0.2), (0.9, 1.05, 1.2, UNIFORM), batch, batches, batches // 2,
                                  ways=args.ways, seed=args.seed, lfu_reference=args.lfu_reference, log=log)
        in_target = [c["best_device_vs_belady"] for c in cells if c["alpha"] in (1.05, 1.2)]
        results["hit_rates"] = {
            "setup": {"rows": rows, "scale_of_largest_criteo": scale, "batch": batch, "batches": batches,
                      "warm_batches": batches // 2, "ways": args.ways, "dim": 1, "seed": args.seed},
            "cells": cells, "target": {"worst": min(in_target), "met": min(in_target) >= 0.95}, "phase": phase.record()}
    if "throughput" in parts:
        rows = args.tp_rows or (1 << 16 if quick else 1 << 19)
        log(f"2. throughput: batches of {args.tp_batch:,} keys, dim 64")
        results["throughput"] = throughput(rows, 64, args.tp_batch, batches=4 if quick else 8, rounds=3 if quick else 7,
                                           use_redis=not args.no_redis, seed=args.seed, log=log)
    if "calls" in parts:
        log("4. fixed cost of one call")
        results["calls"] = call_costs(repeats=5 if quick else 30)
    if "dlrm" in parts:
        scale = args.dlrm_scale or (0.005 if quick else 0.1)
        fractions = tuple(float(x) for x in args.dlrm_cache.split(","))
        log(f"3. DLRM end to end, device cache {', '.join(f'{f:.0%}' for f in fractions)}")
        results["dlrm"] = dlrm_end_to_end(scale, args.dlrm_dim, args.dlrm_batch, 1.05, fractions,
                                          warm_batches=args.dlrm_warm or (32 if quick else 800),
                                          timed_batches=3 if quick else 10, rounds=2 if quick else 3, seed=args.seed, log=log)
    results["total_s"] = round(time.perf_counter() - t_start, 1)
    results["loadavg_end"] = os.getloadavg()
    print()
    print(format_report(results))
    print(f"\ntotal {results['total_s']} s; load average {results['loadavg_start'][0]:.2f} at the start, "
          f"{results['loadavg_end'][0]:.2f} at the end; torch threads {torch.get_num_threads()}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "embedding_cache.json").write_text(json.dumps(results, indent=1, default=float))
        print(f"wrote {out / 'embedding_cache.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
