#!/usr/bin/env bash
# Session 29's DLRM end-to-end A/B: the session's starting commit (415753e, checked out at $OLD) against this
# checkout, without and with the volatile tier preloaded; three interleaved rounds, one JSON per run.
#   OLD=/tmp/old bash bench/results/s29/dlrm_ab.sh bench/results/s29/ab
set -u
out=${1:-bench/results/s29/ab}
mkdir -p "$out"
py=$(pwd)/.venv/bin/python
for r in 1 2 3; do
    (cd "$OLD" && $py bench/embedding_cache.py --only dlrm --out "$OLDPWD/$out/old_$r") > "$out/old_$r.txt" 2>&1
    $py bench/embedding_cache.py --only dlrm --out "$out/new_$r" > "$out/new_$r.txt" 2>&1
    $py bench/embedding_cache.py --only dlrm --dlrm-preload 1.0 --out "$out/preload_$r" > "$out/preload_$r.txt" 2>&1
    $py bench/embedding_cache.py --only dlrm --dlrm-preload 1.0 --dlrm-dtype bfloat16 --out "$out/bf16_$r" > "$out/bf16_$r.txt" 2>&1
done
