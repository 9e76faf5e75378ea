"""The emulated kernels under AddressSanitizer: the kernel library built with -fsanitize=address and Python run
with libasan preloaded, so a kernel that reads or writes past any tensor it was given (on a GPU: an illegal
address, or silent corruption of a neighbour) stops the run with the faulting line. A deliberately
out-of-bounds kernel first shows the check is live."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernels import emulate

ROOT = Path(__file__).resolve().parents[2]
OUT_OF_BOUNDS = """
import numpy as np, torch
from kernels import cuda, emulate
x = torch.ones(32)
src = 'extern "C" __global__ void k(float* x) { x[threadIdx.x] = x[threadIdx.x + 1]; }'
emulate.launch(cuda.full_source_emulated(src, torch.float32), "k", (1,), (32,), [np.uint64(x.data_ptr())])
"""


def libasan() -> str | None:
    cxx = emulate.compiler()
    if cxx is None:
        return None
    path = subprocess.run([cxx, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    return os.path.realpath(path) if os.path.isabs(path) and os.path.exists(path) else None


@pytest.fixture
def asan_env(tmp_path) -> dict:
    lib = libasan()
    if lib is None:
        pytest.skip("no libasan beside the C++ compiler")
    return {**os.environ, "LD_PRELOAD": lib, "ASAN_OPTIONS": "detect_leaks=0",
            "TURBOSERVE_EMULATE_CXXFLAGS": "-fsanitize=address -fno-omit-frame-pointer -g",
            "TURBOSERVE_EMULATE_CACHE": str(tmp_path / "asan-build"), "PYTHONPATH": str(ROOT)}


@pytest.mark.slow
def test_every_emulated_kernel_stays_within_its_tensors(asan_env):
    control = subprocess.run([sys.executable, "-c", OUT_OF_BOUNDS], cwd=ROOT, env=asan_env, capture_output=True,
                             text=True, timeout=120)
    assert control.returncode != 0 and "heap-buffer-overflow" in control.stderr, control.stderr[-2000:]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "emulated or random or agrees",
                          "tests/kernels/test_kernels.py", "tests/kernels/test_emulate.py", "tests/kernels/test_rmsnorm.py",
                          "tests/embeddings/test_device_cache_cuda.py"],
                         cwd=ROOT, env=asan_env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "AddressSanitizer" not in run.stderr, run.stdout[-3000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and " failed" not in run.stdout
