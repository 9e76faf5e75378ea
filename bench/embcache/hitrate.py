"""Part 1 of bench/embedding_cache.py: device-cache hit rates against LRU/LFU references and Belady's optimum."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch

from bench.cache_bounds import belady_hits, lfu_hits, lru_hits
from bench.cache_trace import KeyHash, sample_keys
from bench.embcache.common import UNIFORM
from embeddings.device_cache import DeviceCache
from embeddings.tier import TableSpec


def cache_slots(rows: int, fraction: float, ways: int) -> int:
    """Slots of a cache of `fraction` of `rows`, rounded up to whole sets (what DeviceCache allocates)."""
    return math.ceil(math.ceil(fraction * rows) / ways) * ways


def device_cache_hits(keys: np.ndarray, batch: int, warm_batches: int, slots: int, ways: int, policy: str) -> tuple[int, int]:
    """(hits, lookups) of a DeviceCache on the batches after the warm-up; lookups = distinct keys per batch."""
    cache = DeviceCache(slots, ways, policy, "cpu")  # type: ignore[arg-type]
    cache.create_table(TableSpec("t", 1, rows=slots))
    assert cache.slots("t") == slots, "cache_slots must match DeviceCache's rounding"
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


def static_frequency_hits(keys: np.ndarray, batch: int, warm_batches: int, slots: int) -> tuple[int, int]:
    """(hits, lookups) after the warm-up of a cache frozen with the `slots` keys the warm-up used most (counted per
    batch's distinct keys): what knowing every key's frequency (from the past only) buys an online policy."""
    def distinct(lo: int, hi: int) -> np.ndarray:
        return np.concatenate([np.unique(keys[b * batch:(b + 1) * batch]) for b in range(lo, hi)])

    warm = distinct(0, warm_batches)
    measured = distinct(warm_batches, keys.size // batch)
    uniq, counts = np.unique(warm, return_counts=True)
    top = uniq[np.argsort(-counts, kind="stable")[:slots]]
    return int(np.isin(measured, top).sum()), int(measured.size)


def static_oracle_hits(keys: np.ndarray, batch: int, warm_batches: int, slots: int, rows: int, seed: int) -> tuple[int, int]:
    """(hits, lookups) after the warm-up of the best online policy for these traces: a cache holding, before each
    batch, the `slots` most probable keys among those looked up so far (a key's first lookup misses, as it must
    for every policy, Belady included). sample_keys draws rank r with probability ∝ (r + 1)^-alpha, independently,
    and hashes it with KeyHash(rows, seed), so the most probable keys are those of the lowest ranks. Under such
    independent draws no online policy (one that does not see the future) expects more hits (Aho, Denning and
    Ullman 1971: the best online policy keeps the most probable pages); Belady sees the future. For uniform keys
    the ranks are arbitrary and any preference among seen keys is as good: still the bound in expectation."""
    ranks = KeyHash(rows, seed).inverse(keys)
    held = np.empty(0, dtype=np.int64)  # the ranks cached before the current batch (the `slots` lowest seen)
    hits = lookups = 0
    for b in range(keys.size // batch):
        batch_ranks = np.unique(ranks[b * batch:(b + 1) * batch])
        if b >= warm_batches:
            hits += int(np.isin(batch_ranks, held, assume_unique=True).sum())
            lookups += batch_ranks.size
        seen = np.union1d(held, batch_ranks)
        held = seen if seen.size <= slots else np.partition(seen, slots - 1)[:slots]
    return hits, lookups


def ideal_lfu_hits(keys: np.ndarray, batch: int, warm_batches: int, slots: int, rows: int) -> tuple[int, int]:
    """(hits, lookups) after the warm-up of an ideal frequency policy: fully associative, exact counts of every key
    ever looked up (no sketch, no ageing), holding before each batch the `slots` keys counted most so far (per
    batch's distinct keys; ties in any order). What learning popularity from the trace can reach at best on
    independent draws, where static_oracle_hits knows it."""
    counts = np.zeros(rows, dtype=np.int64)
    held = np.zeros(rows, dtype=bool)
    hits = lookups = 0
    for b in range(keys.size // batch):
        distinct = np.unique(keys[b * batch:(b + 1) * batch])
        if b >= warm_batches:
            hits += int(held[distinct].sum())
            lookups += distinct.size
        counts[distinct] += 1
        top = np.argpartition(-counts, slots - 1)[:slots] if slots < rows else np.arange(rows)
        held[:] = False
        held[top[counts[top] > 0]] = True
    return hits, lookups


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
                "device_tinylfu": device_cache_hits(keys, batch, warm_batches, slots, ways, "tinylfu"),
                "lru_ref": online_reference_hits(lru_hits, keys, batch, warm_batches, slots),
                "belady": belady_measured_hits(keys, batch, warm_batches, slots, bypass=False),
                "belady_bypass": belady_measured_hits(keys, batch, warm_batches, slots, bypass=True),
                "static_frequency": static_frequency_hits(keys, batch, warm_batches, slots),
                "static_oracle": static_oracle_hits(keys, batch, warm_batches, slots, rows, seed),
                "ideal_lfu": ideal_lfu_hits(keys, batch, warm_batches, slots, rows),
            }
            if lfu_reference:
                runs["lfu_ref"] = online_reference_hits(lfu_hits, keys, batch, warm_batches, slots)
            lookups = {n for _, n in runs.values()}
            assert len(lookups) == 1, f"policies counted different lookups: {runs}"
            cell["lookups"] = lookups.pop()
            for name, (hits, n) in runs.items():
                cell[name] = hits / n if n else 0.0
            best = max(cell["device_lru"], cell["device_lfu"], cell["device_tinylfu"])
            for policy in ("lru", "lfu", "tinylfu"):
                cell[f"device_{policy}_vs_belady"] = cell[f"device_{policy}"] / cell["belady"] if cell["belady"] else 1.0
            cell["best_device_vs_belady"] = best / cell["belady"] if cell["belady"] else 1.0
            cell["seconds"] = round(time.perf_counter() - t0, 2)
            cells.append(cell)
            log(f"  {cell['distribution']:8} {fraction:5.0%}: device LRU {cell['device_lru']:.4f} LFU "
                f"{cell['device_lfu']:.4f} TinyLFU {cell['device_tinylfu']:.4f}, LRU ref {cell['lru_ref']:.4f}, Belady {cell['belady']:.4f} "
                f"(bypass {cell['belady_bypass']:.4f}), ideal LFU {cell['ideal_lfu']:.4f}, oracle {cell['static_oracle']:.4f} "
                f"[{cell['seconds']} s]")
    return cells
