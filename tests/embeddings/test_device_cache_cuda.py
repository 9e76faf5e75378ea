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
