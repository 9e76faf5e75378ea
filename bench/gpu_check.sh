#!/usr/bin/env bash
# Everything this project checks on a GPU, in one command that installs nothing:
#   the gpu-marked tests, then the kernel and encoder benchmark. Results land in $OUT (or bench/out).
# On the device machine:  PYTHONPATH=. bash bench/gpu_check.sh
set -uo pipefail
out=${OUT:-bench/out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
# Only the files that hold gpu tests: the rest of the suite needs packages the GPU machine lacks (fastapi,
# pydantic, redis, rocksdict, hypothesis), and one module that fails to import stops pytest's collection.
gpu_files=$(grep -rlE 'pytest\.mark\.gpu' tests --include='test_*.py' | sort)
echo "gpu test files:" $gpu_files
PYTHONPATH=. python3 -m pytest -q -m gpu -p no:cacheprovider $gpu_files 2>&1 | tee "$out/gpu_tests.txt"
tests=${PIPESTATUS[0]}
PYTHONPATH=. python3 bench/gpu_kernels.py --out "$out" 2>&1 | tee "$out/gpu_bench.txt"
bench=${PIPESTATUS[0]}
PYTHONPATH=. python3 bench/memory_arena.py --device cuda --dtype float16 --batches 1000 --run 200 --out "$out" 2>&1 | tee "$out/memory_arena.txt"
arena=${PIPESTATUS[0]}
bench=$(( bench != 0 || arena != 0 ))
echo "gpu tests exit $tests, benchmark exit $bench"
exit $(( tests != 0 || bench != 0 ))
