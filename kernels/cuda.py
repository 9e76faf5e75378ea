"""Compiling and launching this package's CUDA kernels with CuPy, on torch's current stream.

Each op file holds its CUDA source; this module prepends the shared header, compiles one module per
(source, dtype) with NVRTC the first time a CUDA tensor needs it, and launches kernels with raw device
pointers from torch tensors: no copy, no CuPy array (CuPy has no bfloat16), the same stream as torch.
`compile_ptx` builds PTX without any device, which is what CI uses to prove every kernel compiles.
While emulation is on (`emulation()`, kernels/emulate.py), CPU tensors take the kernel path too and every
launch runs the same CUDA source on the CPU, so CI checks what the kernels compute and how they are called.
"""

from __future__ import annotations

import contextlib
import functools
import os

import numpy as np
import torch

# Scalar type of a module: float, __half or __nv_bfloat16, carried as raw bits so that no CUDA header
# is needed; math is always in fp32 (to_f / from_f convert with the PTX cvt instructions). The emulator
# (kernels/emulate.h) defines the same names for the CPU and shares WARP_HEADER.
SCALAR_HEADER = r"""
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif
#if SCALAR_KIND == 0
typedef float scalar_t;
__device__ __forceinline__ float to_f(scalar_t v) { return v; }
__device__ __forceinline__ scalar_t from_f(float v) { return v; }
#elif SCALAR_KIND == 1
typedef unsigned short scalar_t;
__device__ __forceinline__ float to_f(scalar_t v) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v)); return f; }
__device__ __forceinline__ scalar_t from_f(float v) { unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v)); return h; }
#else
typedef unsigned short scalar_t;
__device__ __forceinline__ float to_f(scalar_t v) { return __uint_as_float(((unsigned int)v) << 16); }
__device__ __forceinline__ scalar_t from_f(float v) { unsigned short h; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v)); return h; }
#endif
"""
WARP_HEADER = r"""
// 16 bytes of scalars, for vector loads and stores: 8 fp16/bf16 or 4 fp32 values a memory transaction.
#define PACK_VEC ((int)(16 / sizeof(scalar_t)))
struct alignas(16) Pack { scalar_t v[16 / sizeof(scalar_t)]; };
// The row of a kernel whose blocks' warps take one row each.
__device__ __forceinline__ long long warp_row() { return (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); }
__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}
"""
COMMON_HEADER = SCALAR_HEADER + WARP_HEADER

SCALAR_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
ARCHES = ("compute_80", "compute_90")


def _nvrtc():
    try:
        from cupy_backends.cuda.libs import nvrtc  # noqa: PLC0415 - CuPy >= 13
    except ImportError:  # pragma: no cover - older CuPy
        from cupy.cuda import nvrtc  # noqa: PLC0415
    return nvrtc


def _scalar_kind(dtype: torch.dtype) -> int:
    if dtype not in SCALAR_KIND:
        raise TypeError(f"no CUDA kernels for {dtype}; use float32, float16 or bfloat16")
    return SCALAR_KIND[dtype]


def full_source(source: str, dtype: torch.dtype) -> str:
    return f"#define SCALAR_KIND {_scalar_kind(dtype)}\n{COMMON_HEADER}\n{source}"


def full_source_emulated(source: str, dtype: torch.dtype) -> str:
    """The same kernel source for the CPU emulator: its header in place of the device's scalar header."""
    return f'#define SCALAR_KIND {_scalar_kind(dtype)}\n#include "emulate.h"\n{WARP_HEADER}\n{source}'


def compile_ptx(source: str, dtype: torch.dtype, arch: str, name: str = "kernel.cu") -> str:
    """Compile to PTX with NVRTC, needing no device; raise RuntimeError with NVRTC's log on failure."""
    nvrtc = _nvrtc()
    prog = nvrtc.createProgram(full_source(source, dtype), name, [], [])
    try:
        nvrtc.compileProgram(prog, [f"-arch={arch}", "-std=c++17"])
        ptx = nvrtc.getPTX(prog)
    except Exception as exc:
        raise RuntimeError(f"NVRTC failed on {name} for {dtype} {arch}:\n{nvrtc.getProgramLog(prog)}") from exc
    finally:
        nvrtc.destroyProgram(prog)
    return ptx.decode() if isinstance(ptx, bytes) else ptx


_emulating = os.environ.get("TURBOSERVE_EMULATE_CUDA", "") not in ("", "0")


@contextlib.contextmanager
def emulation(on: bool = True):
    """Within the block, CPU tensors take the kernel path and launches run on the CPU emulator
    (kernels/emulate.py); the environment variable TURBOSERVE_EMULATE_CUDA=1 turns it on for a process."""
    global _emulating
    before, _emulating = _emulating, on
    try:
        yield
    finally:
        _emulating = before


def emulating() -> bool:
    """Whether CPU tensors take the kernel path now (emulation() or TURBOSERVE_EMULATE_CUDA=1)."""
    return _emulating


def kernels_on(device: torch.device | str) -> bool:
    """Whether ops on `device` run the CUDA kernels: CUDA with CuPy present, or the CPU under emulation."""
    kind = torch.device(device).type
    if kind == "cuda":
        return available()
    return _emulating and kind == "cpu"


def use_kernels(t: torch.Tensor) -> bool:
    """Whether an op on `t` runs its CUDA kernel (kernels_on its device; asked by every entry check, so without
    building a device object)."""
    return available() if t.is_cuda else _emulating and t.device.type == "cpu"


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether CUDA kernels can run here: a CUDA device and CuPy (asked once: every kernel launch asks)."""
    if not torch.cuda.is_available():
        return False
    try:
        import cupy  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _module(source: str, dtype: torch.dtype):
    import cupy  # noqa: PLC0415

    return cupy.RawModule(code=full_source(source, dtype), options=("-std=c++17",))


def compile_module(source: str, dtype: torch.dtype):
    """Compile `source` for `dtype` now (once; later calls hit the cache). Needs a device."""
    return _module(source, dtype)


@functools.lru_cache(maxsize=None)
def kernel(source: str, name: str, dtype: torch.dtype):
    """The compiled kernel `name` of `source` for `dtype` (compiled once, then cached)."""
    return _module(source, dtype).get_function(name)


def launch(source: str, name: str, dtype: torch.dtype, grid: tuple, block: tuple, args: tuple, shared_mem: int = 0) -> None:
    """Launch on torch's current stream; tensors in `args` pass as raw device pointers.

    Every argument becomes a numpy scalar of the width the kernel's parameter must have: tensors a 64-bit
    pointer, Python floats float32, Python ints and bools int32 (pass np.int64 for a long long)."""
    converted = []
    on_cuda = False
    for a in args:
        if isinstance(a, torch.Tensor):
            converted.append(np.uint64(a.data_ptr()))
            on_cuda = on_cuda or a.is_cuda
        elif isinstance(a, float):
            converted.append(np.float32(a))
        elif isinstance(a, int):  # bools too
            converted.append(np.int32(a))
        else:
            converted.append(a)
    if not on_cuda:
        from kernels import emulate  # noqa: PLC0415

        emulate.launch(full_source_emulated(source, dtype), name, grid, block, converted)
        return
    kernel(source, name, dtype)(grid, block, tuple(converted), shared_mem=shared_mem,
                                stream=_cupy_stream(torch.cuda.current_stream().cuda_stream))


@functools.lru_cache(maxsize=64)
def _cupy_stream(handle: int):
    """torch's stream `handle` as a CuPy stream object (made once per stream)."""
    import cupy  # noqa: PLC0415

    return cupy.cuda.ExternalStream(handle)


def aligned(*tensors: torch.Tensor, to: int = 16) -> bool:
    """Whether every tensor's data starts on a `to`-byte boundary (what a kernel's Pack loads need)."""
    return all(t.data_ptr() % to == 0 for t in tensors)


def output(out: torch.Tensor | None, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A kernel's output: `out` after the entry checks when the caller gives one, else a new tensor."""
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    check_cuda_tensor(out, "out", like.dtype, shape)
    return out


def check_cuda_tensor(t: torch.Tensor, name: str, dtype: torch.dtype, shape: tuple | None = None) -> None:
    """Entry checks for a kernel argument: device, dtype, contiguity, optional shape."""
    if not use_kernels(t) or t.dtype != dtype or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous CUDA {dtype} tensor; got {t.dtype} on {t.device}, "
                         f"contiguous={t.is_contiguous()}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}; got {tuple(t.shape)}")
