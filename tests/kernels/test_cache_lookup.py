"""kernels/cache_lookup.py: its torch reference is the device cache's LRU lookup (checked here against
DeviceCache on the CPU, tables of several sizes including a single-set one); the CUDA kernel is checked
against the reference in tests/embeddings/test_device_cache_cuda.py (gpu marker)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embeddings.device_cache import DeviceCache
from embeddings.tier import TableSpec
from kernels.cache_lookup import INT64_MIN, cache_lookup, cache_lookup_reference


def filled_cache(ways: int, dims: dict[str, int], seed: int = 0) -> DeviceCache:
    """An LRU cache with tables a (40 rows), b (7 rows), c (one set), d (other dim), partly filled."""
    gen = torch.Generator().manual_seed(seed)
    cache = DeviceCache(40, ways, "lru", device="cpu")
    for name, rows in (("a", 40), ("b", 7), ("c", ways), ("d", 25)):
        cache.create_table(TableSpec(name, dims.get(name, 4), default=torch.full((dims.get(name, 4),), -float(ord(name))),
                                     rows=rows))
    for _ in range(6):
        for name in ("a", "b", "c", "d"):
            keys = torch.randint(-300, 300, (20,), generator=gen)
            cache.insert(name, keys, torch.randn(20, dims.get(name, 4), generator=gen))
    return cache


@pytest.mark.parametrize("ways", [1, 4, 16, 40])
def test_reference_equals_the_device_cache_lookup(ways):
    cache = filled_cache(ways, {"d": 6})
    gen = torch.Generator().manual_seed(1)
    batch = {name: torch.randint(-300, 300, (int(torch.randint(1, 50, (1,), generator=gen)),), generator=gen)
             for name in ("a", "b", "c")}
    batch["c"] = torch.cat([batch["c"], torch.tensor([INT64_MIN])])  # the single-set table's empty marker
    pool = cache._pools[4]
    idx = [cache._where[name][1] for name in batch]
    counts = [k.numel() for k in batch.values()]
    parts = torch.tensor([np.cumsum(counts).tolist(), [pool.bases[t] for t in idx], [pool.sizes[t] for t in idx], idx])
    last = pool.last.clone()
    rows, found, slot = cache_lookup_reference(pool.keys, pool.values, pool.defaults, last, torch.cat(list(batch.values())),
                                               parts, pool.tick + 1)
    expected = cache.lookup_many(batch)  # the op sequence (CPU path); ticks the pool as the reference did
    assert torch.equal(rows, torch.cat([v for v, _ in expected.values()]))
    assert torch.equal(found, torch.cat([f for _, f in expected.values()]))
    assert found.any() and not found.all()
    assert not found[-1]  # the marker is never found
    assert torch.equal(last, pool.last)  # the same slots got the same tick
    assert (slot[found] // ways < pool.num_sets).all()


def test_dispatcher_uses_the_reference_off_cuda_and_checks_shapes():
    cache = filled_cache(4, {})
    pool = cache._pools[4]
    keys = torch.tensor([1, 2, 3])
    parts = torch.tensor([[3], [pool.bases[0]], [pool.sizes[0]], [0]])
    a = cache_lookup(pool.keys, pool.values, pool.defaults, pool.last.clone(), keys, parts, 7)
    b = cache_lookup_reference(pool.keys, pool.values, pool.defaults, pool.last.clone(), keys, parts, 7)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="parts"):
        cache_lookup(pool.keys, pool.values, pool.defaults, pool.last, keys, parts[:3], 7)


def test_the_self_check_accepts_the_reference_and_rejects_a_wrong_kernel():
    from kernels.cache_lookup import agrees, verified  # noqa: PLC0415

    assert agrees("cpu", cache_lookup_reference)

    def wrong_tick(*args, hits):
        rows, found, slot = cache_lookup_reference(*args[:-1], args[-1] + 1, hits)
        return rows, found, slot

    def wrong_default(*args, hits):
        rows, found, slot = cache_lookup_reference(*args, hits=hits)
        return torch.where(found[:, None], rows, 0.0), found, slot

    def no_count(*args, hits):
        return cache_lookup_reference(*args)

    assert not any(agrees("cpu", wrong) for wrong in (wrong_tick, wrong_default, no_count))
    assert not verified("cpu")  # the kernel is only for CUDA devices
