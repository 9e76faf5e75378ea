"""Part 3 of bench/embedding_cache.py: a DLRM end to end through the ParameterServer vs the persistent tier alone."""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from bench.cache_trace import criteo_cardinalities, make_trace
from bench.embcache.common import Phase
from embeddings.device_cache import DeviceCache
from embeddings.hierarchy import ParameterServer, ServerLookup
from embeddings.persistent import PersistentTier
from embeddings.tier import TableSpec, Tier
from embeddings.volatile import VolatileTier
from models.dlrm import DLRMConfig, SparseFeature, load_dlrm, save_dlrm


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
    """A lookup callable for the DLRM that adds up the time spent in it. A lookup with `many` (`ServerLookup`, as
    server/recommend.py passes) keeps it: the model then asks every table of a batch in one call."""

    def __init__(self, fn: Callable[[str, torch.Tensor], torch.Tensor]) -> None:
        self.fn, self.seconds = fn, 0.0
        if hasattr(fn, "many"):
            self.many = self._many

    def _many(self, queries: dict[str, torch.Tensor], asked: dict[str, int]) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        rows = self.fn.many(queries, asked)  # type: ignore[attr-defined]
        self.seconds += time.perf_counter() - t0
        return rows

    def __call__(self, table: str, keys: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        rows = self.fn(table, keys)
        self.seconds += time.perf_counter() - t0
        return rows


METHODS = ("lookup", "insert", "lookup_many", "insert_many")


class OpTimer:
    """Seconds spent in each tier method while `active` (wraps the methods of the given tier objects). A method
    called from inside another timed one (DeviceCache.lookup -> lookup_many) is counted in the outer one only;
    `calls` counts the outer calls."""

    def __init__(self, tiers: list[Tier], methods: tuple[str, ...] = METHODS) -> None:
        self.active, self.depth = False, 0
        self.seconds = {f"{t.name}.{m}": 0.0 for t in tiers for m in methods}
        self.calls = dict.fromkeys(self.seconds, 0)
        for tier in tiers:
            for method in methods:
                setattr(tier, method, self._wrap(getattr(tier, method), f"{tier.name}.{method}"))

    def _wrap(self, fn: Callable, name: str) -> Callable:
        def timed(*args, **kwargs):
            if not self.active or self.depth:
                return fn(*args, **kwargs)
            t0 = time.perf_counter()
            self.depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1
                self.seconds[name] += time.perf_counter() - t0
                self.calls[name] += 1
        return timed


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def dlrm_end_to_end(scale: float = 0.1, dim: int = 16, batch: int = 1024, alpha: float = 1.05,
                    cache_fractions: tuple[float, ...] = (0.05, 0.2), warm_batches: int = 800, timed_batches: int = 10,
                    rounds: int = 3, bottom: tuple[int, ...] = (512, 256, 64), top: tuple[int, ...] = (512, 256),
                    seed: int = 0, workdir: Path | None = None, log: Callable[[str], None] = lambda s: None,
                    policy: str = "lru", device: str = "cpu", preload: float = 0.0,
                    dtype: str = "float32") -> list[dict]:
    """Samples/s of a DLRM through a warm ParameterServer vs straight from the persistent tier; one dict per cache size.

    `device`: where the model and the device cache live ("cuda" on a GPU machine: the dense part then takes a small
    share of a batch, and the ratio is the tiers'); a batch's time includes waiting for the device to finish it.

    Warm-up: `warm_batches` batches of the trace looked up through the ParameterServer (16 batches a call, no model;
    the device cache reaches the same steady hit rate as with one batch a call). Timed: `rounds` rounds of
    `timed_batches` further batches, each round through both paths (who goes first alternates). `preload`: the
    fraction of each table loaded into the volatile tier before the warm-up (`ParameterServer.preload`). `dtype`: the
    dense part's compute dtype, in both paths (`load_dlrm(dtype=...)`, the server's recommend.dtype)."""
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
        model = load_dlrm(save_dlrm(workdir / "model", config, seed), device=device, dtype=dtype)
        sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
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
            cache = DeviceCache(fraction, 16, policy, device)  # type: ignore[arg-type]
            volatile = VolatileTier(16, 1 << 20)
            server = ParameterServer(persistent, volatile, cache)
            preloaded = 0
            if preload:
                with Phase("preload") as phase:
                    preloaded = sum(server.preload(preload).values())
                log(f"  cache {fraction:.0%}: {preloaded:,} rows preloaded into the volatile tier in {phase.wall_s:.1f} s")
            via_server = TimedLookup(ServerLookup(server))
            with Phase("warm") as warm:
                for g in range(0, warm_batches, 16):
                    hi = min(warm_batches, g + 16)
                    server.lookup_many({f.table: torch.from_numpy(trace.keys[i][g * batch:hi * batch])
                                        for i, f in enumerate(config.sparse_features)})
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
                        scores[name] = [model(dense[b], sparse(b), fn) for b in chunk]
                        sync()
                        per_batch[name].append((time.perf_counter() - t0) / len(chunk))
                        lookup_s[name].append(fn.seconds / len(chunk))
                        ops.active = False
                    for a, b in zip(scores["server"], scores["persistent"]):
                        max_diff = max(max_diff, float((a - b).abs().max()))
            after = server.stats()
            for tier in (cache, volatile, persistent):  # drop the timing wrappers
                for method in METHODS:
                    vars(tier).pop(method, None)
            if max_diff > 1e-5:
                raise AssertionError(f"DLRM scores through the ParameterServer differ from the persistent path by {max_diff}")
            delta = {tier: {k: v - before[tier].get(k, 0) for k, v in after[tier].items()} for tier in after}
            n_timed = rounds * timed_batches
            med = {k: float(np.median(v)) for k, v in per_batch.items()}
            med_lookup = {k: float(np.median(v)) for k, v in lookup_s.items()}
            breakdown = {k: 1e3 * v / n_timed for k, v in ops.seconds.items() if ops.calls[k]}
            calls_per_batch = {k: v / n_timed for k, v in ops.calls.items() if v}
            breakdown["server own (dedup, gather, locks)"] = 1e3 * float(np.mean(lookup_s["server"])) - sum(breakdown.values())
            dev, vol = delta["device"], delta["volatile"]
            result = {
                "scale": scale, "dim": dim, "batch": batch, "alpha": alpha, "cache_fraction": fraction, "policy": policy,
                "device": str(cache.device), "device_name": _device_name(cache.device),
                "rows": int(cards.sum()), "largest_table": int(cards.max()), "bottom_mlp": [*bottom, dim],
                "top_mlp": [*top, 1], "warm_batches": warm_batches, "timed_batches": timed_batches, "rounds": rounds,
                "device_cache_bytes": cache.memory_bytes, "volatile_preload": preload, "dtype": dtype, "preloaded_rows": preloaded, "fill_s": round(fill.wall_s, 1), "warm_s": round(warm.wall_s, 1),
                "server_samples_per_s": batch / med["server"], "persistent_samples_per_s": batch / med["persistent"],
                "server_ms_per_batch": 1e3 * med["server"], "persistent_ms_per_batch": 1e3 * med["persistent"],
                "server_lookup_ms_per_batch": 1e3 * med_lookup["server"],
                "persistent_lookup_ms_per_batch": 1e3 * med_lookup["persistent"],
                "ratio": med["persistent"] / med["server"], "lookup_ratio": med_lookup["persistent"] / med_lookup["server"],
                "server_lookup_breakdown_ms_per_batch": breakdown, "tier_calls_per_batch": calls_per_batch,
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
