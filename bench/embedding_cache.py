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
   - LRU ref: `cache_bounds.lru_hits`, fully associative LRU (hits = whole trace minus the warm-up part: LRU is
     online, so its warm-up hits are the same either way). LFU ref (`--lfu-reference`): `lfu_hits`, likewise.
   - Belady: `cache_bounds.belady_hits` in batches of the same size, demand paging (every miss enters, like the
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
   --dlrm-cache of each table's rows, 16-way, --dlrm-policy (LRU); in-memory volatile tier), warmed on --dlrm-warm batches of the
   same trace (the device hit rate is steady by then), against the same model looking rows up straight from the
   persistent tier. Both see the same fresh batches each round; their scores must agree. One request = one sample
   scored. The time inside the ParameterServer is split by tier method (device lookup/insert, volatile ...).
   --dlrm-preload F first loads F of each table into the volatile tier (`ParameterServer.preload`, the server's
   embeddings.volatile_preload; HPS's initial cache rate): at 1.0 no lookup reaches RocksDB.
4. Fixed cost of one call: median ms of one lookup / insert of new random keys (dim 16): DeviceCache with 100
   keys in caches of 16k to 4M slots; VolatileTier and PersistentTier with 100, 1,000 and 16,384 keys.

torch runs with --threads intra-op threads (default 1): on a machine shared with other busy processes, two
OpenMP threads on two cores made every small torch op 10-60x slower (a thread waits at each op's barrier for
a partner the scheduler has descheduled). Each phase records how much CPU other processes took meanwhile.
"""


from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.embcache.calls import call_costs
from bench.embcache.common import LARGEST_CRITEO, UNIFORM, Phase, machine_info
from bench.embcache.dlrm import dlrm_end_to_end
from bench.embcache.hitrate import cache_slots, hit_rate_grid
from bench.embcache.report import format_report
from bench.embcache.throughput import throughput

__all__ = ["cache_slots", "call_costs", "dlrm_end_to_end", "hit_rate_grid", "main", "throughput"]


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
    p.add_argument("--dlrm-policy", default="lru", choices=("lru", "lfu", "tinylfu"), help="device cache policy")
    p.add_argument("--dlrm-device", default="cpu", help="the model's and the device cache's device (cuda on a GPU machine)")
    p.add_argument("--dlrm-dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="the DLRM's dense part's compute dtype, both paths (recommend.dtype)")
    p.add_argument("--dlrm-preload", type=float, default=0.0,
                   help="fraction of each table preloaded into the volatile tier before the warm-up (embeddings.volatile_preload)")
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
                                          timed_batches=3 if quick else 10, rounds=2 if quick else 3, seed=args.seed, log=log,
                                          policy=args.dlrm_policy, device=args.dlrm_device, preload=args.dlrm_preload,
                                          dtype=args.dlrm_dtype)
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
