#!/usr/bin/env bash
# The server itself on the GPU machine, through its real entry point: `python -m server.cli serve --device cuda`
# on a model shaped like all-MiniLM-L6-v2 (seeded random weights, its real tokenizer), in float16 and bfloat16.
#   1. correctness over HTTP: /embed answers vs the CPU float32 forward of the same weights (bench/gpu_serve_check.py)
#   2. throughput: bench/loadgen.py (one text a request, concurrency 64) vs sentence-transformers on the same GPU,
#      dtype and weights, encode(batch_size=64) on the same texts; and the cost model's prediction error on live
#      batches after the load (issue 3).
# Prepared HERE with `bash bench/gpu_carry.sh`; on the device machine (carry [".gpu_carry"]):
#   bash bench/gpu_serve.sh            (GPU_SERVE_NO_INSTALL=1 DEVICE=cpu: the same steps on a CPU, checks the script)
set -uo pipefail
out=${OUT:-bench/out}
mkdir -p "$out"
if [ -z "${GPU_SERVE_NO_INSTALL:-}" ]; then
    source "$(dirname "$0")/carry_site.sh"
    carry_site || exit 1
    export PYTHONPATH=/tmp/site:.
else
    export PYTHONPATH=.
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
requests=${REQUESTS:-4000}
model=${MODEL_DIR:-/tmp/minilm_random}
$py bench/random_model.py --like .gpu_carry/minilm --out "$model" || exit 1
source "$(dirname "$0")/budget.sh"
status=0
for dtype in ${DTYPES:-float16 bfloat16}; do
    limit=$(capped_limit "${T_CHECK:-120}")
    [ "$limit" = 0 ] && { echo "serve $dtype: skipped (the session's time spent)"; status=1; break; }
    timeout -k 10 "$limit" $py bench/gpu_serve_check.py --model "$model" --device "$device" --dtype "$dtype" \
        2>&1 | tee "$out/serve_check_$dtype.txt" || status=1
    limit=$(capped_limit "${T_LOAD:-150}")
    [ "$limit" = 0 ] && { echo "serve load $dtype: skipped (the session's time spent)"; status=1; break; }
    timeout -k 10 "$limit" $py bench/loadgen.py --spawn --model "$model" --server-arg=--device --server-arg="$device" \
        --server-arg=--dtype --server-arg="$dtype" --concurrency 64 --requests "$requests" --warmup 100 \
        --baseline --baseline-device "$device" --baseline-dtype "$dtype" --baseline-batch-size 64 --baseline-runs 3 \
        --json "$out/serve_load_$dtype.json" 2>&1 | grep -v 'Writing model' | tee "$out/serve_load_$dtype.txt" || status=1
done
exit $status
