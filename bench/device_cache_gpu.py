"""Device-cache lookup throughput on its own, for issue 6's "16k keys, dim 64, fully cached: >= 100 GB/s on an
H100": batched lookups of keys the cache holds, as keys/s and GB/s of rows returned, beside the device's
measured copy bandwidth. Only torch and embeddings/device_cache.py: it runs on the GPU machine (no RocksDB,
no Redis there), from bench/gpu_check.sh.

    PYTHONPATH=. python3 bench/device_cache_gpu.py [--device cuda] [--out DIR]

Each cell: a cache of 2x the rows (16-way sets at half load keep all but the keys of overfull sets), filled
with seeded random rows; batches drawn from the keys it holds; the median of --repeats timed lookups
(CUDA events on a GPU), after warm-up, each lookup waited for; and "b2b": 16 lookups issued back to back, per
lookup. GB/s counts the rows returned (keys x dim x 4 bytes); the copy column is that figure over a device-to-device
copy's (read + write) bandwidth.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_kernels import copy_bandwidth, timer  # noqa: E402
from embeddings.device_cache import DeviceCache  # noqa: E402
from embeddings.tier import TableSpec  # noqa: E402
from kernels.cache_lookup import verified as fused_lookup_ok  # noqa: E402


def cell(device: str, rows: int, dim: int, batch: int, policy: str, repeats: int, copy_gbs: float, seed: int = 0,
         fused: bool = True) -> dict:
    """One row of the table; fused=False makes an lru cache run the torch op sequence instead of the kernel."""
    rng = np.random.default_rng(seed)
    keys = torch.from_numpy(rng.choice(1 << 40, rows, replace=False).astype(np.int64))
    cache = DeviceCache(2 * rows, 16, policy, device, fused=fused)
    cache.create_table(TableSpec("t", dim, rows=rows))
    for start in range(0, rows, 1 << 16):
        part = keys[start:start + (1 << 16)]
        cache.insert("t", part.to(device), torch.randn(part.numel(), dim, generator=torch.Generator().manual_seed(start)).to(device))
    held = keys[cache.contains("t", keys.to(device)).cpu()]
    repeat = batch > held.numel()  # small --rows (a smoke run): keys repeat within a batch
    batches = [held[torch.from_numpy(rng.choice(held.numel(), batch, replace=repeat))].to(device) for _ in range(8)]
    _, found = cache.lookup("t", batches[0])
    assert bool(found.all()), "not fully cached"
    turn = iter(range(1 << 62))
    seconds = timer(lambda: cache.lookup("t", batches[next(turn) % len(batches)]), device, repeats)
    gbs = batch * dim * 4 / seconds / 1e9
    # Back to back: 16 lookups issued with no wait between them (a caller that keeps the device busy), per lookup.
    stream_seconds = timer(lambda: [cache.lookup("t", batches[next(turn) % len(batches)]) for _ in range(16)],
                           device, max(3, repeats // 8)) / 16
    path = "fused kernel" if fused and policy == "lru" and fused_lookup_ok(device) else "torch ops"
    return {"rows": rows, "dim": dim, "batch": batch, "policy": policy, "path": path, "seconds": seconds,
            "mkeys_s": batch / seconds / 1e6, "gbs": gbs, "of_copy": gbs / copy_gbs, "cache_bytes": cache.memory_bytes,
            "back_to_back_seconds": stream_seconds, "back_to_back_gbs": batch * dim * 4 / stream_seconds / 1e9}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rows", type=int, default=1 << 20)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--out", default="bench/out")
    args = ap.parse_args()
    copy_gbs = copy_bandwidth(args.device, 256 if args.device == "cuda" else 64, 10)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"{name}: device-to-device copy {copy_gbs:.0f} GB/s; cache of {2 * args.rows:,} slots, {args.rows:,} rows held")
    print(f"{'dim':>4} {'batch':>8} {'policy':8} {'path':13} {'us':>9} {'M keys/s':>9} {'GB/s':>7} {'of copy':>8} "
          f"{'b2b us':>8} {'b2b GB/s':>9}")
    results = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # The target's cell (16k keys, dim 64) first, and the file rewritten after every cell: a run cut short by its
    # time limit still leaves what it measured.
    cells = [(64, 16384)] + [(d, b) for d in (16, 64, 128) for b in (16384, 131072) if (d, b) != (64, 16384)]
    for dim, batch in cells:
        variants = [("lru", True)] + ([("lru", False), ("tinylfu", True)] if (dim, batch) == (64, 16384) else [])
        for policy, fused in variants:
            r = cell(args.device, args.rows, dim, batch, policy, args.repeats, copy_gbs, fused=fused)
            results.append(r)
            print(f"{dim:4d} {batch:8d} {policy:8} {r['path']:13} {r['seconds'] * 1e6:9.1f} {r['mkeys_s']:9.1f} "
                  f"{r['gbs']:7.1f} {r['of_copy']:8.1%} {r['back_to_back_seconds'] * 1e6:8.1f} {r['back_to_back_gbs']:9.1f}",
                  flush=True)
            (out / "device_cache_gpu.json").write_text(json.dumps({"device": name, "copy_gbs": copy_gbs, "cells": results},
                                                                  indent=1))
    print(f"wrote {out / 'device_cache_gpu.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
