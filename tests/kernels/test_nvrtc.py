"""Every CUDA source compiles to PTX for sm_80 and sm_90 in every dtype: no device needed, so CI
fails on a kernel that does not compile."""

from __future__ import annotations

import pytest
import torch

from kernels import activation, cache_lookup, cuda, layernorm, qkv, rmsnorm, softmax
from kernels.cuda import ARCHES, compile_ptx

KERNELS = {
    "bias_residual_layernorm": layernorm.CUDA_SOURCE,
    "residual_rmsnorm": rmsnorm.CUDA_SOURCE,
    "masked_softmax": softmax.CUDA_SOURCE,
    "bias_activation": activation.CUDA_SOURCE,
    "split_qkv": qkv.CUDA_SOURCE,
    "cache_lookup": cache_lookup.CUDA_SOURCE,
    "launch_probe": cuda.PROBE_SOURCE,
}
PACKED = {"bias_residual_layernorm", "residual_rmsnorm", "masked_softmax", "bias_activation", "split_qkv"}  # sources with a 16-byte packed `_vec` entry too


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", sorted(KERNELS))
def test_kernel_compiles_to_ptx(name, dtype, arch):
    ptx = compile_ptx(KERNELS[name], dtype, arch, f"{name}.cu")
    assert f".entry {name}(" in ptx
    if name in PACKED:  # its packed entry loads and stores 16 bytes at a time and keeps its row in registers
        packed = ptx[ptx.index(f".entry {name}_vec("):]
        packed = packed[:packed.find(".entry", 1)] if ".entry" in packed[1:] else packed
        assert "ld.global.nc.v4" in packed and "st.global.v4" in packed
        assert "ld.local" not in packed and "st.local" not in packed
    assert f".target sm_{arch.split('_')[1]}" in ptx


def test_a_broken_kernel_fails_with_nvrtcs_log():
    broken = 'extern "C" __global__ void k(float* x) { x[0] = undefined_function(); }'
    with pytest.raises(RuntimeError, match="undefined_function"):
        compile_ptx(broken, torch.float16, "compute_80")
