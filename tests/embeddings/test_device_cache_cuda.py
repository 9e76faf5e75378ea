"""The device cache's CUDA path (the fused lookup kernel) against the plain cache on the CPU: on a GPU (gpu
marker) and on the CPU emulator (kernels/emulate.py), everywhere. Its own file with only torch and pytest
imports, so that it collects on the GPU machine, which has no hypothesis, redis or rocksdict."""

from __future__ import annotations

import pytest
import torch

from embeddings.device_cache import DeviceCache
from embeddings.tier import TableSpec
from kernels import emulate

# On a GPU (gpu marker: bench/gpu_check.sh selects the files that spell it out) and on the CPU emulator, everywhere.
WHERE = [pytest.param("cuda", marks=pytest.mark.gpu), "emulated"]


def rows(keys, dim=3):
    """A distinct, checkable vector per key: [key, key + 0.5, ...]."""
    k = torch.as_tensor(keys, dtype=torch.float32)[:, None]
    return k + 0.5 * torch.arange(dim, dtype=torch.float32)


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_cuda_cache_behaves_as_the_cpu_cache(kernel_device, where, policy):
    dev = kernel_device
    cpu = DeviceCache(64, 8, policy, device="cpu", fused=False)
    gpu = DeviceCache(64, 8, policy, device=dev)
    for cache in (cpu, gpu):
        cache.create_table(TableSpec("t", 3))
    gen = torch.Generator().manual_seed(3)
    for _ in range(50):
        keys = torch.randint(-50, 200, (int(torch.randint(1, 40, (1,), generator=gen)),), generator=gen)
        if torch.rand(1, generator=gen) < 0.5:
            cpu.insert("t", keys, rows(keys.tolist()))
            gpu.insert("t", keys.to(dev), rows(keys.tolist()).to(dev))
        else:
            (cv, cf), (gv, gf) = cpu.lookup("t", keys), gpu.lookup("t", keys.to(dev))
            assert gv.device.type == dev and torch.equal(cf, gf.cpu()) and torch.equal(cv, gv.cpu())
        assert torch.equal(cpu.cached_keys("t"), gpu.cached_keys("t"))
    assert cpu.memory_bytes == gpu.memory_bytes


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("ways", [1, 4, 16, 40])
@pytest.mark.parametrize("dim", [3, 16, 64])
def test_fused_lookup_kernel_equals_its_reference(kernel_device, where, ways, dim):
    """kernels/cache_lookup.py's kernel against its torch reference on the same pool (several tables, one of a
    single set with the empty marker looked up), then the last-use ticks."""
    from kernels.cache_lookup import INT64_MIN, cache_lookup, cache_lookup_reference  # noqa: PLC0415

    dev = kernel_device
    cache = DeviceCache(64, ways, "lru", device=dev)
    gen = torch.Generator().manual_seed(ways * 100 + dim)
    for name, rows_ in (("a", 64), ("b", 9), ("c", ways)):
        cache.create_table(TableSpec(name, dim, default=torch.full((dim,), -1.0 - ord(name)), rows=rows_))
    for _ in range(5):
        for name in ("a", "b", "c"):
            keys = torch.randint(-500, 500, (30,), generator=gen)
            cache.insert(name, keys.to(dev), torch.randn(30, dim, generator=gen).to(dev))
    pool = cache._pools[dim]
    batch = [torch.randint(-500, 500, (n,), generator=gen) for n in (700, 33, 5)] + [torch.tensor([INT64_MIN])]
    idx = [0, 1, 2, 2]
    parts = torch.tensor([torch.tensor([b.numel() for b in batch]).cumsum(0).tolist(), [pool.bases[t] for t in idx],
                          [pool.sizes[t] for t in idx], idx]).to(dev)
    keys = torch.cat(batch).to(dev)
    last_ref, last_gpu = pool.last.clone(), pool.last.clone()
    hits_ref, hits_gpu = torch.tensor([7]), torch.tensor([7], device=dev)
    ref = cache_lookup_reference(pool.keys, pool.values, pool.defaults, last_ref, keys, parts, 99, hits_ref)
    before = emulate.launches["cache_lookup"]
    got = cache_lookup(pool.keys, pool.values, pool.defaults, last_gpu, keys, parts, 99, hits_gpu)
    for r, g in zip(ref, got):
        assert g.device.type == dev and torch.equal(r, g)
    assert int(hits_ref) == 7 + int(ref[1].sum()) and int(hits_gpu) == int(hits_ref)  # the kernel counts its hits
    assert where == "cuda" or emulate.launches["cache_lookup"] == before + 1  # the kernel ran, not the reference
    assert ref[1].any() and not ref[1].all() and not ref[1][-1]
    assert torch.equal(last_ref, last_gpu)


@pytest.mark.parametrize("where", WHERE)
def test_the_kernel_passes_its_own_start_up_check(kernel_device, where):
    from kernels.cache_lookup import verified  # noqa: PLC0415

    assert verified(kernel_device)  # else the cache runs the op sequence and logs why


@pytest.mark.parametrize("where", WHERE)
def test_the_cuda_lru_cache_runs_the_fused_kernel_and_keeps_the_cpu_caches_ticks(kernel_device, where, monkeypatch):
    import embeddings.device_cache as dc  # noqa: PLC0415

    calls = []
    real = dc.cache_lookup
    monkeypatch.setattr(dc, "cache_lookup", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    dev = kernel_device
    cpu = DeviceCache(64, 8, "lru", device="cpu", fused=False)
    gpu = DeviceCache(64, 8, "lru", device=dev)
    for cache in (cpu, gpu):
        cache.create_table(TableSpec("t", 5))
        cache.create_table(TableSpec("u", 5))
    gen = torch.Generator().manual_seed(5)
    for _ in range(30):
        keys = {t: torch.randint(-40, 100, (int(torch.randint(1, 30, (1,), generator=gen)),), generator=gen) for t in "tu"}
        for t, k in keys.items():
            cpu.insert(t, k, rows(k.tolist(), 5))
            gpu.insert(t, k.to(dev), rows(k.tolist(), 5).to(dev))
        a, b = cpu.lookup_many(keys), gpu.lookup_many({t: k.to(dev) for t, k in keys.items()})
        for t in "tu":
            assert torch.equal(a[t][0], b[t][0].cpu()) and torch.equal(a[t][1], b[t][1].cpu())
        assert torch.equal(cpu._pools[5].last, gpu._pools[5].last.cpu())
    assert len(calls) == 30
    assert cpu.counters() == gpu.counters()


@pytest.mark.parametrize("where", WHERE)
def test_the_kernel_is_built_and_checked_when_the_cache_is_made(kernel_device, where, monkeypatch):
    """At start-up, not in the first request's lookup (a first NVRTC build takes about a second)."""
    import kernels.cache_lookup as cl  # noqa: PLC0415

    checked = []
    monkeypatch.setattr(cl, "agrees", lambda device, impl: checked.append(device) or True)
    cl._verified.cache_clear()
    try:
        DeviceCache(64, 8, "lru", device=kernel_device)
        assert checked == [kernel_device]
        DeviceCache(64, 8, "lfu", device=kernel_device)  # no fused path for LFU: nothing to build
        assert checked == [kernel_device]
    finally:
        cl._verified.cache_clear()


@pytest.mark.parametrize("where", WHERE)
def test_fused_lookups_count_their_own_hits_whatever_callers_do_with_found(kernel_device, where):
    """The fused path counts hits on the device (the kernel adds them up): the counters stay exact over many
    lookups, and a caller marking rows of `found` afterwards (as the hierarchy does for rows found lower) does
    not change them."""
    cache = DeviceCache(64, 8, "lru", device=kernel_device)
    cache.create_table(TableSpec("t", 3))
    held = torch.arange(20)
    cache.insert("t", held.to(kernel_device), rows(held.tolist()).to(kernel_device))
    hits = looked = 0
    for i in range(70):
        keys = torch.arange(i % 7, i % 7 + 30)  # 20 - i % 7 of them held
        _, found = cache.lookup("t", keys.to(kernel_device))
        found.fill_(True)  # the caller's own business from here on
        hits, looked = hits + int((keys < 20).sum()), looked + keys.numel()
    counters = cache.counters()
    assert (counters["hits"], counters["misses"]) == (hits, looked - hits)


@pytest.mark.gpu
def test_a_batchs_tensors_move_to_and_from_the_gpu_together():
    from embeddings.tier import moved_together  # noqa: PLC0415

    tensors = [torch.arange(6).view(2, 3), torch.rand(4, 2), torch.tensor([True, False]), torch.arange(3), torch.rand(1, 5)]
    on = moved_together(tensors, torch.device("cuda"))
    assert [(t.shape, t.dtype, t.device.type) for t in on] == [(t.shape, t.dtype, "cuda") for t in tensors]
    assert moved_together(on, torch.device("cuda:0"))[1] is on[1]  # already there: not copied again
    back = moved_together(on, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(back, tensors))
