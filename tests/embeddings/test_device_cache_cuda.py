"""The device cache on CUDA against the same cache on the CPU (gpu marker). Its own file with only torch and
pytest imports, so that it collects on the GPU machine, which has no hypothesis, redis or rocksdict."""

from __future__ import annotations

import pytest
import torch

from embeddings.device_cache import DeviceCache
from embeddings.tier import TableSpec


def rows(keys, dim=3):
    """A distinct, checkable vector per key: [key, key + 0.5, ...]."""
    k = torch.as_tensor(keys, dtype=torch.float32)[:, None]
    return k + 0.5 * torch.arange(dim, dtype=torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_cuda_cache_behaves_as_the_cpu_cache(policy):
    cpu = DeviceCache(64, 8, policy, device="cpu")
    gpu = DeviceCache(64, 8, policy, device="cuda")
    for cache in (cpu, gpu):
        cache.create_table(TableSpec("t", 3))
    gen = torch.Generator().manual_seed(3)
    for _ in range(50):
        keys = torch.randint(-50, 200, (int(torch.randint(1, 40, (1,), generator=gen)),), generator=gen)
        if torch.rand(1, generator=gen) < 0.5:
            cpu.insert("t", keys, rows(keys.tolist()))
            gpu.insert("t", keys.cuda(), rows(keys.tolist()).cuda())
        else:
            (cv, cf), (gv, gf) = cpu.lookup("t", keys), gpu.lookup("t", keys.cuda())
            assert gv.is_cuda and torch.equal(cf, gf.cpu()) and torch.equal(cv, gv.cpu())
        assert torch.equal(cpu.cached_keys("t"), gpu.cached_keys("t"))
    assert cpu.memory_bytes == gpu.memory_bytes


@pytest.mark.gpu
@pytest.mark.parametrize("ways", [1, 4, 16, 40])
@pytest.mark.parametrize("dim", [3, 16, 64])
def test_fused_lookup_kernel_equals_its_reference(ways, dim):
    """kernels/cache_lookup.py on CUDA against its torch reference on the same pool (several tables, one of a
    single set with the empty marker looked up, outputs poisoned first), then the last-use ticks."""
    from kernels.cache_lookup import INT64_MIN, cache_lookup, cache_lookup_reference  # noqa: PLC0415

    cache = DeviceCache(64, ways, "lru", device="cuda")
    gen = torch.Generator().manual_seed(ways * 100 + dim)
    for name, rows_ in (("a", 64), ("b", 9), ("c", ways)):
        cache.create_table(TableSpec(name, dim, default=torch.full((dim,), -1.0 - ord(name)), rows=rows_))
    for _ in range(5):
        for name in ("a", "b", "c"):
            keys = torch.randint(-500, 500, (30,), generator=gen)
            cache.insert(name, keys.cuda(), torch.randn(30, dim, generator=gen).cuda())
    pool = cache._pools[dim]
    batch = [torch.randint(-500, 500, (n,), generator=gen) for n in (700, 33, 5)] + [torch.tensor([INT64_MIN])]
    idx = [0, 1, 2, 2]
    parts = torch.tensor([torch.tensor([b.numel() for b in batch]).cumsum(0).tolist(), [pool.bases[t] for t in idx],
                          [pool.sizes[t] for t in idx], idx]).cuda()
    keys = torch.cat(batch).cuda()
    last_ref, last_gpu = pool.last.clone(), pool.last.clone()
    ref = cache_lookup_reference(pool.keys, pool.values, pool.defaults, last_ref, keys, parts, 99)
    got = cache_lookup(pool.keys, pool.values, pool.defaults, last_gpu, keys, parts, 99)
    for r, g in zip(ref, got):
        assert g.is_cuda and torch.equal(r, g)
    assert ref[1].any() and not ref[1].all() and not ref[1][-1]
    assert torch.equal(last_ref, last_gpu)


@pytest.mark.gpu
def test_the_kernel_passes_its_own_start_up_check():
    from kernels.cache_lookup import verified  # noqa: PLC0415

    assert verified("cuda")  # else the cache runs the op sequence and logs why


@pytest.mark.gpu
def test_the_cuda_lru_cache_runs_the_fused_kernel_and_keeps_the_cpu_caches_ticks(monkeypatch):
    import embeddings.device_cache as dc  # noqa: PLC0415

    calls = []
    real = dc.cache_lookup
    monkeypatch.setattr(dc, "cache_lookup", lambda *a: calls.append(1) or real(*a))
    cpu = DeviceCache(64, 8, "lru", device="cpu")
    gpu = DeviceCache(64, 8, "lru", device="cuda")
    for cache in (cpu, gpu):
        cache.create_table(TableSpec("t", 5))
        cache.create_table(TableSpec("u", 5))
    gen = torch.Generator().manual_seed(5)
    for _ in range(30):
        keys = {t: torch.randint(-40, 100, (int(torch.randint(1, 30, (1,), generator=gen)),), generator=gen) for t in "tu"}
        for t, k in keys.items():
            cpu.insert(t, k, rows(k.tolist(), 5))
            gpu.insert(t, k.cuda(), rows(k.tolist(), 5).cuda())
        a, b = cpu.lookup_many(keys), gpu.lookup_many({t: k.cuda() for t, k in keys.items()})
        for t in "tu":
            assert torch.equal(a[t][0], b[t][0].cpu()) and torch.equal(a[t][1], b[t][1].cpu())
        assert torch.equal(cpu._pools[5].last, gpu._pools[5].last.cpu())
    assert len(calls) == 30
    assert cpu.counters() == gpu.counters()
