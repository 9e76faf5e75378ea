"""Fused set-associative cache lookup: the device cache's LRU lookup of a batch in one kernel.

For every key of a batch over one or more tables of a cache pool (embeddings/cache_pool.py's layout: table t
owns sets first[t] .. first[t] + sets[t] - 1 of `ways` slots; a key's set is first[t] + (high 32 bits of
key * 2^64/phi) mod sets[t]; an empty slot holds a key of another set, so a plain compare finds a key): find
the slot holding the key, copy its row (or the table's default row when the key is not cached), and record
the use (last[slot] = tick), and add the hits to a counter on the device (so the caller's hit count needs no
launch of its own and no read back). On a GPU the torch op sequence of the same lookup is about a dozen kernel
launches, which at a 16k-key batch cost more than the bytes moved; here it is one launch.

The kernel gives each key one warp (a warp takes KEYS_PER_WARP keys in turn): the lanes compare the key with up to 32
ways at a time (a ballot picks the first match), then copy the row, four floats at a time when the width allows. `cache_lookup_reference`
is the same computation in torch ops (what embeddings/cache_pool.py does for the LRU policy).
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch

from kernels import cuda

log = logging.getLogger(__name__)

GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)  # 2^64 / golden ratio as a signed int64 (products wrap)
INT64_MIN = -(1 << 63)


def set_of(keys: torch.Tensor, num_sets: int | torch.Tensor) -> torch.Tensor:
    """The set each key maps to within its table: high 32 bits of key * golden ratio, modulo num_sets (an int
    or [n]); the kernel below computes the same (multiplicative, Fibonacci hashing: sequential keys spread)."""
    h = keys * GOLDEN  # wraps modulo 2^64
    return ((h >> 32) & 0xFFFFFFFF) % num_sets

CUDA_SOURCE = r"""
__device__ __forceinline__ bool lookup_one(
    long long i, int lane, const long long* __restrict__ keys, const long long* __restrict__ parts, int tables,
    const long long* __restrict__ pool_keys, int ways, const float* __restrict__ values,
    const float* __restrict__ defaults, int dim, long long tick, long long* __restrict__ last, float* __restrict__ out,
    bool* __restrict__ found, long long* __restrict__ slot)
{
    int t = 0;
    while (t < tables - 1 && i >= parts[t]) ++t;
    const long long first = parts[tables + t], sets = parts[2 * tables + t], default_row = parts[3 * tables + t];
    const long long key = keys[i];
    const unsigned long long h = (unsigned long long)key * 0x9E3779B97F4A7C15ULL;
    const long long set = first + (long long)((h >> 32) % (unsigned long long)sets);
    int way = -1;
    for (int w0 = 0; w0 < ways && way < 0; w0 += 32) {  // `way` is the same in every lane: a uniform loop
        const int w = w0 + lane;
        const unsigned int match = __ballot_sync(0xffffffffu, w < ways && pool_keys[set * ways + w] == key);
        if (match) way = w0 + __ffs(match) - 1;
    }
    // A table of a single set marks empty slots with INT64_MIN, which is never cached.
    const bool hit = way >= 0 && !(sets == 1 && key == (long long)0x8000000000000000ULL);
    const long long at = set * ways + (way >= 0 ? way : 0);
    if (lane == 0) {
        found[i] = hit;
        slot[i] = at;
        if (hit) last[at] = tick;
    }
    const float* src = hit ? values + at * dim : defaults + default_row * dim;
    float* dst = out + i * dim;
    if ((dim & 3) == 0) {
        const float4* s4 = reinterpret_cast<const float4*>(src);
        float4* d4 = reinterpret_cast<float4*>(dst);
        for (int c = lane; c < (dim >> 2); c += 32) d4[c] = s4[c];
    } else {
        for (int c = lane; c < dim; c += 32) dst[c] = src[c];
    }
    return hit;
}

// Each warp looks up `per_warp` consecutive keys, one after another, and adds its hits to the counter once: one
// atomic a warp rather than one a hit (same-address atomics are serialised in L2).
extern "C" __global__ void cache_lookup(
    const long long* __restrict__ keys, long long n,
    const long long* __restrict__ parts, int tables,  // [4, tables]: end offset in the batch, first set, sets, default row
    const long long* __restrict__ pool_keys, int ways,
    const float* __restrict__ values, const float* __restrict__ defaults, int dim, long long tick,
    long long* __restrict__ last, float* __restrict__ out, bool* __restrict__ found, long long* __restrict__ slot,
    unsigned long long* __restrict__ hits, int per_warp)  // hits found are added to *hits
{
    const int lane = threadIdx.x & 31;
    const long long start = ((long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)) * per_warp;
    unsigned long long found_here = 0;
    for (long long i = start; i < start + per_warp && i < n; ++i)  // uniform across the warp
        found_here += lookup_one(i, lane, keys, parts, tables, pool_keys, ways, values, defaults, dim, tick, last, out,
                                 found, slot);
    if (lane == 0 && found_here) atomicAdd(hits, found_here);
}
"""
WARPS_PER_BLOCK = 8
KEYS_PER_WARP = 4


def _check(pool_keys: torch.Tensor, values: torch.Tensor, defaults: torch.Tensor, last: torch.Tensor,
           keys: torch.Tensor, parts: torch.Tensor) -> None:
    if pool_keys.dim() != 2 or last.shape != pool_keys.shape:
        raise ValueError(f"pool_keys and last must be [sets, ways]; got {tuple(pool_keys.shape)}, {tuple(last.shape)}")
    if values.dim() != 2 or values.shape[0] != pool_keys.numel() or defaults.dim() != 2 or defaults.shape[1] != values.shape[1]:
        raise ValueError(f"values must be [sets * ways, dim] and defaults [tables, dim]; got {tuple(values.shape)}, "
                         f"{tuple(defaults.shape)}")
    if keys.dim() != 1 or parts.dim() != 2 or parts.shape[0] != 4 or parts.shape[1] < 1:
        raise ValueError(f"keys must be [n] and parts [4, tables >= 1]; got {tuple(keys.shape)}, {tuple(parts.shape)}")


def cache_lookup_reference(pool_keys: torch.Tensor, values: torch.Tensor, defaults: torch.Tensor, last: torch.Tensor,
                           keys: torch.Tensor, parts: torch.Tensor, tick: int,
                           hits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows [n, dim], found [n] bool, slot [n] int64); sets last[slot] = tick where found, and adds the number
    found to `hits` (an int64 tensor of one element) when given.

    pool_keys, last: [sets, ways] int64; values: [sets * ways, dim] float32; defaults: [rows, dim] float32;
    keys: [n] int64, grouped by table; parts: [4, tables] int64 rows: end offset of each table's keys in the
    batch, its first set, its number of sets, its row of `defaults`."""
    _check(pool_keys, values, defaults, last, keys, parts)
    ways = pool_keys.shape[1]
    ends, first, sets, default_row = (parts[r] for r in range(4))
    table = torch.searchsorted(ends, torch.arange(keys.numel(), device=keys.device), right=True).clamp(max=parts.shape[1] - 1)
    size = sets.index_select(0, table)
    set_ = first.index_select(0, table) + set_of(keys, size)
    match = pool_keys.index_select(0, set_) == keys[:, None]  # [n, ways]
    hit, way = match.to(torch.uint8).max(dim=1)
    hit = hit.bool() & ~((size == 1) & (keys == INT64_MIN))
    slot = set_ * ways + way
    rows = torch.where(hit[:, None], values.index_select(0, slot), defaults.index_select(0, default_row.index_select(0, table)))
    last.view(-1).index_fill_(0, slot[hit], tick)
    if hits is not None:
        hits += hit.sum()
    return rows, hit, slot


def cache_lookup(pool_keys: torch.Tensor, values: torch.Tensor, defaults: torch.Tensor, last: torch.Tensor,
                 keys: torch.Tensor, parts: torch.Tensor, tick: int, hits: torch.Tensor | None = None,
                 checked: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dispatcher: the CUDA kernel for CUDA tensors, the reference otherwise (same arguments and results).
    checked: the caller vouches for the arguments' shapes, dtypes, device and contiguity (the device cache, whose
    pool made them), and the entry checks, a fifth of a lookup's host time at 16k keys, are skipped."""
    if not cuda.use_kernels(pool_keys):
        return cache_lookup_reference(pool_keys, values, defaults, last, keys, parts, tick, hits)
    if hits is None:
        hits = torch.zeros(1, dtype=torch.int64, device=keys.device)
    if not checked:
        _check(pool_keys, values, defaults, last, keys, parts)
        for name, t, dtype in (("pool_keys", pool_keys, torch.int64), ("last", last, torch.int64), ("keys", keys, torch.int64),
                               ("parts", parts, torch.int64), ("values", values, torch.float32),
                               ("defaults", defaults, torch.float32), ("hits", hits, torch.int64)):
            cuda.check_cuda_tensor(t, name, dtype)
    n, dim = keys.numel(), values.shape[1]
    rows = torch.empty(n, dim, dtype=torch.float32, device=keys.device)
    found = torch.empty(n, dtype=torch.bool, device=keys.device)
    slot = torch.empty(n, dtype=torch.int64, device=keys.device)
    if n:
        per_block = WARPS_PER_BLOCK * KEYS_PER_WARP
        cuda.launch(CUDA_SOURCE, "cache_lookup", torch.float32, ((n + per_block - 1) // per_block,),
                    (32 * WARPS_PER_BLOCK,), (keys, np.int64(n), parts, parts.shape[1], pool_keys, pool_keys.shape[1],
                                             values, defaults, dim, np.int64(tick), last, rows, found, slot, hits,
                                             KEYS_PER_WARP))
    return rows, found, slot


def verified(device: str) -> bool:
    """Whether the kernel runs on `device` and equals its reference there, checked once per device (and
    emulation state): callers use the kernel only then, so a kernel that fails to build or disagrees costs
    speed, never a wrong row."""
    return _verified(device, cuda.emulating())


@functools.lru_cache(maxsize=None)
def _verified(device: str, emulating: bool) -> bool:
    if not cuda.kernels_on(device):  # CUDA with CuPy, or the CPU under the emulator (`emulating`: the cache key)
        return False
    try:
        if agrees(device, cache_lookup):
            return True
        log.error("the fused cache lookup kernel disagrees with its reference on %s; using the torch ops", device)
    except Exception:  # a build or launch failure: fall back, loudly
        log.exception("the fused cache lookup kernel failed on %s; using the torch ops", device)
    return False


def agrees(device: str, impl) -> bool:
    """Does impl (cache_lookup's signature) on `device` give the reference's rows, found, slots and ticks on a
    small pool: tables of 8, 3 and 1 sets (the last with its empty marker looked up), 4 and 40 ways, widths 3
    and 64?"""
    gen = torch.Generator().manual_seed(0)
    for ways, dim in ((4, 3), (40, 64)):
        sets = [8, 3, 1]
        total = sum(sets)
        pool_keys = torch.randint(-50, 50, (total, ways), generator=gen)
        values = torch.randn(total * ways, dim, generator=gen)
        defaults = torch.randn(len(sets), dim, generator=gen)
        last = torch.zeros(total, ways, dtype=torch.int64)
        keys = torch.cat([torch.randint(-50, 50, (n,), generator=gen) for n in (40, 9, 3)] + [torch.tensor([INT64_MIN])])
        parts = torch.tensor([[40, 49, 53], [0, 8, 11], sets, [0, 1, 2]])
        ref_last, ref_hits = last.clone(), torch.tensor([5])
        ref = cache_lookup_reference(pool_keys, values, defaults, ref_last, keys, parts, 3, ref_hits)
        dev = [t.to(device) for t in (pool_keys, values, defaults, last, keys, parts)]
        got_hits = torch.tensor([5], device=device)
        got = impl(*dev, 3, hits=got_hits)
        if not all(torch.equal(r, g.cpu()) for r, g in zip(ref, got)) or not torch.equal(dev[3].cpu(), ref_last) \
                or not torch.equal(got_hits.cpu(), ref_hits):
            return False
    return True
