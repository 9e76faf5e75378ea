"""A CPU emulator for this package's CUDA kernels, so that CI checks what they compute, not only that they compile.

`launch` compiles the kernel's own CUDA source with the host C++ compiler after emulate.h (which gives
each thread of a warp a fiber and resolves warp shuffles and ballots the way the hardware does, refusing
undefined uses), then runs the grid on the CPU over CPU tensors' memory. kernels/cuda.py routes a launch
here when its tensors are on the CPU, which happens only under `cuda.emulation()` (or
TURBOSERVE_EMULATE_CUDA=1): the dispatchers and the encoder then take their CUDA code path on the CPU.

It checks the kernels' indexing, reductions, masking, rounding to fp16/bf16 and the launch arguments
(count and width of each) against the plain-torch references, with no GPU; it says nothing about speed,
and a GPU still has the last word on what the hardware's own math functions return.

Built libraries are cached by a hash of their source under $TURBOSERVE_EMULATE_CACHE (default: a
`turboserve-emulate` folder in the temp dir).
"""

from __future__ import annotations

import collections
import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

HEADER_DIR = Path(__file__).parent
KERNEL_NAME = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(')
_lock = threading.Lock()  # the emulator's state (the warp's fibers) is process-wide
launches: collections.Counter = collections.Counter()  # kernel name -> launches run, for tests to see the path taken


class EmulationError(RuntimeError):
    """A launch the emulator refused: wrong arguments, or a kernel that breaks a warp intrinsic's rules."""


def compiler() -> str | None:
    """The C++ compiler the emulator builds with ($CXX, else g++ or c++), or None when there is none."""
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _launchers(source: str) -> str:
    """One C entry point a kernel: `emu_<name>(grid, block, params, sizes, n, err, errlen)`."""
    entries = []
    for name in KERNEL_NAME.findall(source):
        entries.append(
            f'extern "C" int emu_{name}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, '
            f"void** params, const int* sizes, int n, char* err, int errlen) {{\n"
            f"    return emu::launch({name}, dim3{{gx, gy, gz}}, dim3{{bx, by, bz}}, params, sizes, n, err, errlen);\n}}\n")
    return "\n".join(entries)


def _cache_dir() -> Path:
    path = Path(os.environ.get("TURBOSERVE_EMULATE_CACHE") or Path(tempfile.gettempdir()) / "turboserve-emulate")
    path.mkdir(parents=True, exist_ok=True)
    return path


@functools.lru_cache(maxsize=None)
def library(full_source: str) -> ctypes.CDLL:
    """Build (or load from the cache) the shared library of one kernel module; raise EmulationError with
    the compiler's output when it does not build."""
    cxx = compiler()
    if cxx is None:
        raise EmulationError("no C++ compiler (g++) to build the CUDA emulator with")
    text = full_source + "\n" + _launchers(full_source)
    header = (HEADER_DIR / "emulate.h").read_bytes()
    extra = os.environ.get("TURBOSERVE_EMULATE_CXXFLAGS", "").split()  # e.g. -fsanitize=address (see README)
    digest = hashlib.sha256(header + text.encode() + " ".join(extra).encode()).hexdigest()[:20]
    so = _cache_dir() / f"kernels-{digest}.so"
    if not so.exists():
        with tempfile.TemporaryDirectory(dir=so.parent) as tmp:
            src = Path(tmp) / "kernel.cpp"
            src.write_text(text)
            out = Path(tmp) / so.name
            cmd = [cxx, "-std=c++17", "-O2", "-fPIC", "-shared", "-fno-fast-math", *extra, "-I", str(HEADER_DIR), str(src),
                   "-o", str(out)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                raise EmulationError(f"the emulator could not build the kernel:\n{proc.stderr[-4000:]}")
            os.replace(out, so)  # atomic: a concurrent build of the same source wins or loses whole
    return ctypes.CDLL(str(so))


def launch(full_source: str, name: str, grid: tuple, block: tuple, args: list) -> None:
    """Run kernel `name` of `full_source` (kernels/cuda.py's emulated source) over `grid` x `block`.

    args: numpy scalars, as kernels/cuda.launch converts them (pointers as uint64); each is passed as
    CUDA's kernelParams are, with its width, which must match the kernel's parameter.
    """
    values = [np.asarray(a) for a in args]
    if any(v.ndim or v.dtype.kind not in "iufb" for v in values):
        raise EmulationError(f"kernel arguments must be numpy scalars; got {[type(a).__name__ for a in args]}")
    buffers = [ctypes.create_string_buffer(v.tobytes(), v.nbytes) for v in values]
    params = (ctypes.c_void_p * max(len(values), 1))(*[ctypes.addressof(b) for b in buffers])
    launch_params(full_source, name, grid, block, params, [v.nbytes for v in values])


def launch_params(full_source: str, name: str, grid: tuple, block: tuple, params: ctypes.Array, sizes: list[int]) -> None:
    """The same with the arguments as cuLaunchKernel takes them: `params`, an array of pointers to each argument's
    value, and each one's size in bytes (which must match the kernel's parameter)."""
    entry = getattr(library(full_source), f"emu_{name}", None)
    if entry is None:
        raise EmulationError(f"no kernel named {name!r} in the source")
    count = len(sizes)
    widths = (ctypes.c_int * max(count, 1))(*sizes)
    g = tuple(grid) + (1,) * (3 - len(grid))
    b = tuple(block) + (1,) * (3 - len(block))
    err = ctypes.create_string_buffer(512)
    with _lock:
        rc = entry(*(ctypes.c_uint(int(x)) for x in g + b), params, widths, ctypes.c_int(count), err, ctypes.c_int(len(err)))
    launches[name] += 1
    if rc:
        raise EmulationError(f"{name}: {err.value.decode(errors='replace')}")
