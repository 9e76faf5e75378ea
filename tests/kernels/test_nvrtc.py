"""Every CUDA source compiles to PTX for sm_80 and sm_90 in every dtype: no device needed, so CI
fails on a kernel that does not compile."""

from __future__ import annotations

import pytest
import torch

from kernels import activation, cache_lookup, layernorm, qkv, softmax
from kernels.cuda import ARCHES, compile_ptx

KERNELS = {
    "bias_residual_layernorm": layernorm.CUDA_SOURCE,
    "masked_softmax": softmax.CUDA_SOURCE,
    "bias_activation": activation.CUDA_SOURCE,
    "split_qkv": qkv.CUDA_SOURCE,
    "cache_lookup": cache_lookup.CUDA_SOURCE,
}


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", sorted(KERNELS))
def test_kernel_compiles_to_ptx(name, dtype, arch):
    ptx = compile_ptx(KERNELS[name], dtype, arch, f"{name}.cu")
    assert f".entry {name}(" in ptx
    assert f".target sm_{arch.split('_')[1]}" in ptx


def test_a_broken_kernel_fails_with_nvrtcs_log():
    broken = 'extern "C" __global__ void k(float* x) { x[0] = undefined_function(); }'
    with pytest.raises(RuntimeError, match="undefined_function"):
        compile_ptx(broken, torch.float16, "compute_80")
