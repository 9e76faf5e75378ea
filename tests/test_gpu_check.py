"""bench/gpu_check.sh runs the gpu tests on the GPU machine, which has torch, cupy, triton, transformers,
tokenizers, safetensors, prometheus-client, httpx and pytest, and few of this project's other dependencies
(bench/device_env.py lists them). Every file with gpu tests must collect there: one import error stops pytest's
collection, and the session's GPU time is lost. This collects them, and runs the benchmarks and the server's
check, with the packages the device lacks made unimportable (here, without a GPU: the tests themselves skip)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Not yaml: the device has transformers, whose huggingface_hub requires PyYAML.
def device_like_env(tmp_path: Path, carried: bool = False) -> dict[str, str]:
    """The environment with every module the GPU machine lacks made unimportable (stub modules first on the path):
    bench/device_env.py's list, the one gpu_carry.sh carries by; with carried, as bench/gpu_serve.sh has it once the
    carried wheels are installed (gpu_check.sh's parts run before that, without them)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import device_env  # noqa: PLC0415
    finally:
        sys.path.pop(0)
    stubs = tmp_path / ("stubs-carried" if carried else "stubs")
    stubs.mkdir()
    for name in device_env.absent(carried):
        (stubs / f"{name}.py").write_text(f"raise ModuleNotFoundError('{name} is not on the GPU machine')\n")
    return {**os.environ, "PYTHONPATH": f"{stubs}{os.pathsep}{ROOT}"}


def gpu_files() -> list[str]:
    """What gpu_check.sh passes to pytest (same rule: test files that use the gpu marker)."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                  if re.search(r"pytest\.mark\.gpu", p.read_text()))


def test_gpu_check_selects_the_files_with_gpu_tests():
    script = (ROOT / "bench" / "gpu_check.sh").read_text()
    assert "grep -rlE 'pytest\\.mark\\.gpu' tests --include='test_*.py'" in script
    files = gpu_files()
    assert {"tests/kernels/test_kernels.py", "tests/models/test_gpu_encoder.py", "tests/embeddings/test_device_cache_cuda.py",
            "tests/kernels/test_arena.py"} <= set(files)


def test_every_gpu_test_file_collects_without_the_packages_the_device_lacks(tmp_path):
    env = {**device_like_env(tmp_path), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                          *gpu_files()], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    collected = int(re.search(r"(\d+)(?:/\d+)? tests? collected", out.stdout).group(1))
    assert collected >= 100, out.stdout[-2000:]


def test_the_device_cache_benchmark_runs_with_only_what_the_device_has(tmp_path):
    out = subprocess.run([sys.executable, "bench/device_cache_gpu.py", "--device", "cpu", "--rows", "32768", "--repeats", "2",
                          "--out", str(tmp_path / "out")], cwd=ROOT, env=device_like_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    import json  # noqa: PLC0415

    cells = json.loads((tmp_path / "out" / "device_cache_gpu.json").read_text())["cells"]
    assert {(c["dim"], c["batch"], c["policy"]) for c in cells} >= {(64, 16384, "lru"), (64, 16384, "tinylfu")}
    assert all(c["mkeys_s"] > 0 and c["gbs"] == pytest.approx(c["batch"] * c["dim"] * 4 / c["seconds"] / 1e9) for c in cells)


@pytest.mark.timeout(900)  # above its subprocesses' own limits (the suite's default is 300 s)
def test_the_kernel_benchmark_runs_with_only_what_the_device_has(tmp_path):
    """bench/gpu_kernels.py's --smoke mode (tiny shapes on the CPU): every part of the script runs and writes its
    JSON, so a GPU session is not spent finding a script error."""
    out = subprocess.run([sys.executable, "bench/gpu_kernels.py", "--smoke", "--repeats", "1", "--no-compile", "--out",
                          str(tmp_path / "out")], cwd=ROOT, env=device_like_env(tmp_path), capture_output=True, text=True,
                         timeout=400)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    import json  # noqa: PLC0415

    report = json.loads((tmp_path / "out" / "gpu_kernels.json").read_text())
    ops = {row["op"] for rows in report["kernels"].values() for row in rows}
    assert ops == {"bias+residual+layernorm", "residual+rmsnorm", "masked softmax", "bias+gelu(erf)", "qkv split+bias"}
    assert report["attention"] and all(r["per_sequence_us"] > 0 for r in report["attention"])
    assert report["encoders"] and all(r["ours_s"] > 0 and r["hf_eager_sdpa_s"] > 0 for r in report["encoders"])


def test_every_file_with_gpu_tests_is_selected(tmp_path):
    """gpu_check.sh finds the files by the literal marker; a gpu test reached some other way (a parameter list
    imported from elsewhere) would silently not run on the GPU machine."""
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    with_gpu_tests = {line.split("::")[0] for line in out.stdout.splitlines() if "::" in line}
    assert with_gpu_tests and with_gpu_tests <= set(gpu_files()), with_gpu_tests - set(gpu_files())


@pytest.mark.timeout(900)  # above its subprocesses' own limits (the suite's default is 300 s)
def test_the_gpu_serve_check_runs_on_a_cpu(tmp_path):
    """bench/gpu_serve.sh's steps, on the CPU: a random-weight model shaped like the embedded one, served through
    `turboserve serve`, its /embed and /v1/embeddings answers equal to sentence-transformers on the same weights."""
    from models.config import default_model_path  # noqa: PLC0415

    model = tmp_path / "model"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    made = subprocess.run([sys.executable, "bench/random_model.py", "--like", str(default_model_path()), "--out", str(model)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    # The server as the device runs it: only its packages and the carried wheels (fastapi's opentelemetry-api and
    # uvicorn's httptools were missed by a hand-made list, so the server could not have started there).
    env = {**device_like_env(tmp_path, carried=True), "HF_HUB_OFFLINE": "1"}
    assert made.returncode == 0, made.stderr[-2000:]
    assert (model / "model.safetensors").exists() and (model / "tokenizer.json").exists()
    checked = subprocess.Popen([sys.executable, "bench/gpu_serve_check.py", "--model", str(model), "--device", "cpu",
                                "--dtype", "float32", "--texts", "8"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        checked.stdout, checked.stderr = checked.communicate(timeout=480)
    except subprocess.TimeoutExpired:  # SIGTERM, not run()'s SIGKILL: the check stops the server it spawned
        checked.terminate()
        checked.communicate(timeout=60)
        raise
    assert checked.returncode == 0 and "OK" in checked.stdout, checked.stdout[-2000:] + checked.stderr[-2000:]
    cosine = float(re.search(r"min (\d\.\d+) mean", checked.stdout).group(1))
    assert cosine > 0.9999


def test_the_session_summary_reads_a_gpu_run_with_only_what_the_device_has(tmp_path):
    """bench/gpu_summary.py on session 10's recorded H100 files (renamed as gpu_session.sh leaves them) and a server
    part made up here: the verdicts follow the targets, and a part that did not run is a row, not a stop."""
    import json  # noqa: PLC0415
    import shutil  # noqa: PLC0415

    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(ROOT / "bench/results/s10/run2_gpu_kernels.json", out / "gpu_kernels.json")
    (out / "serve_check_float16.txt").write_text("cuda graphs: 9 buckets, 40 replays\ncuda float16: /embed 64 texts, "
                                                 "cosine to sentence-transformers float32 on CPU: min 0.999712 mean 0.99\n")
    (out / "serve_load_float16.json").write_text(json.dumps({"throughput_ratio": 2.5, "load": {"requests_per_s": 900.0},
        "cost_model_error_after_load": {"batches": 80, "median_abs": 0.07, "p90_abs": 0.2, "median_signed": -0.01}}))
    done = subprocess.run([sys.executable, "bench/gpu_summary.py", str(out)], cwd=ROOT, env=device_like_env(tmp_path),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {line.split("  ")[0].strip(): line for line in done.stdout.splitlines()[2:] if line.strip()}
    assert rows["bias+residual+layernorm 4096x768 fp16"].endswith("missed")  # 12% of copy in session 10
    assert "0.54x eager, 0.43x compile" in rows["encoder all-MiniLM-L6-v2 size 71103 tokens"]
    assert "not run" in rows["device cache 16k x 64 (issue 6)"]
    assert rows["server float16 vs ST fp32 (cosine >= 0.999)"].endswith("met")
    assert "2.5x (900 req/s)" in rows["server float16 vs ST on the GPU (req/s)"]
    assert rows["cost model live error float16 (issue 3, median <= 10%)"].endswith("met")


def test_the_dlrm_part_runs_with_what_the_device_has_once_the_wheels_are_carried(tmp_path):
    """gpu_session.sh's DLRM part (issue 6 end to end), small and on the CPU, with only the device's packages and the
    carried ones (rocksdict and redis are not on the GPU machine): it writes embedding_cache.json, and the session's
    summary turns it into a row against the 5x target."""
    script = (ROOT / "bench" / "gpu_session.sh").read_text()
    assert "bench/embedding_cache.py --only dlrm --dlrm-device" in script and "carry_site" in script
    assert "--dlrm-preload" in script
    env = device_like_env(tmp_path, carried=True)
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "bench/embedding_cache.py", "--only", "dlrm", "--quick", "--dlrm-device", "cpu",
                           "--dlrm-cache", "0.2", "--dlrm-preload", "1.0", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    import json  # noqa: PLC0415

    (result,) = json.loads((out / "embedding_cache.json").read_text())["dlrm"]
    assert result["device"] == "cpu" and result["max_score_diff"] <= 1e-5 and result["ratio"] > 0
    assert result["preloaded_rows"] == result["rows"]  # the volatile tier holds every row, as the session runs it
    summary = subprocess.run([sys.executable, "bench/gpu_summary.py", str(out)], cwd=ROOT, env=device_like_env(tmp_path),
                             capture_output=True, text=True, timeout=60)
    assert summary.returncode == 0, summary.stderr[-2000:]
    row = next(line for line in summary.stdout.splitlines() if line.startswith("DLRM end to end, device cache 20% on cpu"))
    assert f"{result['ratio']:.2f}x" in row and row.rstrip().endswith("met" if result["ratio"] >= 5 else "missed")
