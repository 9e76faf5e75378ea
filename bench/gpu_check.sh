#!/usr/bin/env bash
# Everything this project checks on a GPU, in one command that installs nothing:
#   the gpu-marked tests, the kernel and encoder benchmark, the device-cache lookups, the memory arena.
# Results land in $OUT (or bench/out), written as each part runs (a part cut short still leaves its output).
# On the device machine:  PYTHONPATH=. bash bench/gpu_check.sh
# Each part has its own time limit (seconds, overridable), most important first, so that one slow part cannot
# use up a session's device time: 8.5 minutes in all by default; a limit of 0 skips the part.
# A session lent 15 minutes of device time runs bench/gpu_session.sh instead (these parts, shorter, and the server).
set -uo pipefail
out=${OUT:-bench/out}
mkdir -p "$out"
t_tests=${T_TESTS:-150} t_kernels=${T_KERNELS:-210} t_cache=${T_CACHE:-60} t_arena=${T_ARENA:-90}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
source "$(dirname "$0")/budget.sh"
part() {  # part NAME LIMIT_S LOG COMMAND...: run it under its limit, log it, record exit status and seconds
    local name=$1 asked=$2 log=$3; shift 3
    local limit
    limit=$(capped_limit "$asked")
    if [ "$limit" = 0 ]; then echo "$name: skipped (limit $asked, or the session's time spent)" | tee -a "$out/parts.txt"; return 0; fi
    local started=$SECONDS
    PYTHONPATH=. timeout -k 10 "$limit" "$@" 2>&1 | tee "$out/$log"
    local rc=${PIPESTATUS[0]}
    echo "$name: exit $rc after $((SECONDS - started)) s (limit $limit s)" | tee -a "$out/parts.txt"
    return "$rc"
}
# Only the files that hold gpu tests: the rest of the suite needs packages the GPU machine lacks (fastapi,
# pydantic, redis, rocksdict, hypothesis), and one module that fails to import stops pytest's collection.
gpu_files=$(grep -rlE 'pytest\.mark\.gpu' tests --include='test_*.py' | sort)
echo "gpu test files:" $gpu_files
part tests "$t_tests" gpu_tests.txt python3 -m pytest -v -m gpu -p no:cacheprovider $gpu_files; tests=$?
part kernels "$t_kernels" gpu_bench.txt python3 bench/gpu_kernels.py --out "$out"; kernels=$?
part device_cache "$t_cache" device_cache_gpu.txt python3 bench/device_cache_gpu.py --out "$out"; cache=$?
part arena "$t_arena" memory_arena.txt python3 bench/memory_arena.py --device cuda --dtype float16 --batches 1000 --run 200 --out "$out"; arena=$?
bench=$(( kernels != 0 || cache != 0 || arena != 0 ))
echo "gpu tests exit $tests, benchmarks exit $bench (kernels $kernels, device cache $cache, arena $arena)"
exit $(( tests != 0 || bench != 0 ))
