"""bench/gpu_check.sh runs the gpu tests on the GPU machine, which has torch, cupy, triton, transformers,
tokenizers, safetensors, prometheus-client, httpx and pytest, and none of this project's other dependencies.
Every file with gpu tests must collect there: one import error stops pytest's collection, and the session's
GPU time is lost. This collects them with those packages made unimportable (here, without a GPU: the tests
themselves skip)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ABSENT_ON_DEVICE = ("fastapi", "uvicorn", "starlette", "pydantic", "pydantic_settings", "redis", "rocksdict", "hypothesis",
                    "openai", "tritonclient", "schemathesis", "sentence_transformers", "yaml", "matplotlib")


def gpu_files() -> list[str]:
    """What gpu_check.sh passes to pytest (same rule: test files that use the gpu marker)."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                  if re.search(r"pytest\.mark\.gpu", p.read_text()))


def test_gpu_check_selects_the_files_with_gpu_tests():
    script = (ROOT / "bench" / "gpu_check.sh").read_text()
    assert "grep -rlE 'pytest\\.mark\\.gpu' tests --include='test_*.py'" in script
    files = gpu_files()
    assert "tests/kernels/test_gpu_kernels.py" in files and "tests/models/test_gpu_encoder.py" in files


def test_every_gpu_test_file_collects_without_the_packages_the_device_lacks(tmp_path):
    for name in ABSENT_ON_DEVICE:
        (tmp_path / f"{name}.py").write_text(f"raise ImportError('{name} is not on the GPU machine')\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                          *gpu_files()], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    collected = int(re.search(r"(\d+)/\d+ tests collected|(\d+) tests collected", out.stdout).group(0).split()[0].split("/")[0])
    assert collected >= 100, out.stdout[-2000:]
