"""One op a file: a plain-torch `<op>_reference` beside a dispatcher `<op>` that runs a fused CUDA
kernel (CuPy, compiled with NVRTC) for CUDA tensors and the reference otherwise."""

from __future__ import annotations


def compile_all(dtype) -> int:
    """Compile every CUDA kernel for `dtype` now (warm-up, before the server reports ready);
    returns how many modules were built. Needs a CUDA device and CuPy."""
    from kernels import activation, cuda, layernorm, qkv, rmsnorm, softmax  # noqa: PLC0415

    sources = [layernorm.CUDA_SOURCE, softmax.CUDA_SOURCE, activation.CUDA_SOURCE, qkv.CUDA_SOURCE, rmsnorm.CUDA_SOURCE]
    for source in sources:
        cuda.compile_module(source, dtype)
    return len(sources)
