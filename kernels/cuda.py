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
import ctypes
import functools
import logging
import os
import threading

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

log = logging.getLogger(__name__)

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

    Every argument takes the width the kernel's parameter must have: tensors a 64-bit pointer, Python floats
    float32, Python ints and bools int32 (pass np.int64 for a long long); numpy scalars their own. The values
    go into this thread's parameter block for the arguments' types (`ParamBlock`), which cuLaunchKernel reads
    (through CuPy's driver binding: CuPy's own launcher converts every argument again, ~10 us of host time a
    launch) and the emulator reads the same way."""
    params = _param_block(tuple(map(type, args)))
    if not params.fill(args):
        from kernels import emulate  # noqa: PLC0415

        emulate.launch_params(full_source_emulated(source, dtype), name, grid, block, params.pointers, params.sizes)
        return
    fn = kernel(source, name, dtype)
    stream = torch.cuda.current_stream().cuda_stream
    device = torch.cuda.current_device()
    if _direct_launch_ok(device):
        g, b = tuple(grid) + (1,) * (3 - len(grid)), tuple(block) + (1,) * (3 - len(block))
        try:
            _driver().launchKernel(_function_ptr(source, name, dtype, device), *g, *b, shared_mem, stream, params.address, 0)
            return
        except Exception:  # noqa: BLE001 - e.g. a thread whose CUDA context is not current yet: CuPy's launcher makes it so
            log.debug("direct launch of %s failed; through CuPy's launcher", name, exc_info=True)
    fn(grid, block, tuple(params.numpy()), shared_mem=shared_mem, stream=_cupy_stream(stream))


@functools.lru_cache(maxsize=None)
def _param_type(kind: type):
    if issubclass(kind, torch.Tensor):
        return ctypes.c_uint64
    if issubclass(kind, (bool, int)) and not issubclass(kind, np.generic):
        return ctypes.c_int32
    if kind is float:
        return ctypes.c_float
    try:
        return np.ctypeslib.as_ctypes_type(np.dtype(kind))
    except (TypeError, NotImplementedError) as exc:
        raise TypeError(f"a kernel argument of type {kind.__name__}: pass a tensor, int, float, bool or numpy scalar") from exc


class ParamBlock:
    """cuLaunchKernel's kernelParams for one signature (the arguments' types): a ctypes value an argument and the
    array of their addresses, built once per thread and signature, refilled at every launch."""

    def __init__(self, kinds: tuple[type, ...]):
        self.values = [_param_type(k)() for k in kinds]
        self.pointers = (ctypes.c_void_p * max(len(kinds), 1))(*[ctypes.addressof(v) for v in self.values])
        self.address = ctypes.addressof(self.pointers)
        self.sizes = [ctypes.sizeof(v) for v in self.values]

    def fill(self, args: tuple) -> bool:
        """Write the arguments' values; returns whether any tensor is on a CUDA device."""
        on_cuda = False
        for slot, a in zip(self.values, args):
            if isinstance(a, torch.Tensor):
                slot.value = a.data_ptr()
                on_cuda = on_cuda or a.is_cuda
            else:
                slot.value = a
        return on_cuda

    def numpy(self) -> list:
        """The values as numpy scalars of their widths (what CuPy's launcher takes)."""
        return [np.frombuffer(bytes(v), dtype=np.dtype(type(v)))[0] for v in self.values]


_threads = threading.local()


def _param_block(kinds: tuple[type, ...]) -> ParamBlock:
    blocks = getattr(_threads, "blocks", None)
    if blocks is None:
        blocks = _threads.blocks = {}
    block = blocks.get(kinds)
    if block is None:
        block = blocks[kinds] = ParamBlock(kinds)
    return block


@functools.lru_cache(maxsize=None)
def _function_ptr(source: str, name: str, dtype: torch.dtype, device: int) -> int:
    """The CUfunction handle of a compiled kernel on `device` (a RawKernel's `.kernel` is its cupy Function there)."""
    return kernel(source, name, dtype).kernel.ptr


def _driver():
    from cupy_backends.cuda.api import driver  # noqa: PLC0415

    return driver


PROBE_SOURCE = r"""
extern "C" __global__ void launch_probe(const long long* in, int a, long long b, float c, int d, unsigned long long e,
                                        long long* out) {
    if (threadIdx.x == 0 && blockIdx.x == 0) {
        out[0] = in[0]; out[1] = a; out[2] = b; out[3] = (long long)(c * 4.0f); out[4] = d; out[5] = (long long)e;
    }
}
"""


@functools.lru_cache(maxsize=None)
def _direct_launch_ok(device: int) -> bool:
    """Whether launching through cuLaunchKernel with a ParamBlock passes every argument as CuPy's launcher does, on
    this device: a probe kernel echoes one argument of each width (checked once; otherwise CuPy's launcher)."""
    try:
        with torch.cuda.device(device):
            torch.cuda.synchronize()  # this thread's CUDA context is current from here on
            inp = torch.tensor([123456789], dtype=torch.int64, device="cuda")
            out = torch.zeros(6, dtype=torch.int64, device="cuda")
            args = (inp, 7, np.int64(-3 << 40), 2.5, True, np.uint64((1 << 63) + 5), out)
            params = _param_block(tuple(map(type, args)))
            params.fill(args)
            fn = _function_ptr(PROBE_SOURCE, "launch_probe", torch.float32, device)
            _driver().launchKernel(fn, 1, 1, 1, 32, 1, 1, 0, torch.cuda.current_stream().cuda_stream, params.address, 0)
            got = out.tolist()
        want = [123456789, 7, -3 << 40, 10, 1, (1 << 63) + 5 - (1 << 64)]
        if got == want:
            return True
        log.error("direct kernel launches pass wrong arguments on cuda:%d (%s, not %s): using CuPy's launcher", device, got, want)
    except Exception:  # noqa: BLE001 - an older CuPy without the binding, a driver error: CuPy's launcher
        log.exception("direct kernel launches failed on cuda:%d: using CuPy's launcher", device)
    return False


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
