#!/usr/bin/env bash
# Everything a session lent a GPU should run, in ONE device call sized for 15 minutes of device time (the machine's
# start and a possible rerun of one part included): the gpu tests, the kernel/encoder benchmark, the device-cache
# lookups, the DLRM end to end through the ParameterServer (issue 6), then the server on the GPU in float16; each
# part under its own limit, most important first, all of them
# within BUDGET_S (default 450 s: a part's limit is cut to what is left), and a table against the issues' GPU
# targets at the end (bench/gpu_summary.py).
#   here, once:      bash bench/gpu_carry.sh            (fills the git-ignored .gpu_carry/: the server's wheels)
#   on the device:   bash bench/gpu_session.sh          run with carry [".gpu_carry"] and timeout_s 480
# Limits (seconds) can be changed per part: T_TESTS T_KERNELS T_CACHE T_ARENA (0 skips: the arena was measured in
# session 10 and is unchanged) T_DLRM T_CHECK T_LOAD; SERVE=0 skips the server.
# Results: every file in bench/out/session; in $OUT, when set (a device run), only three, as at most 8 files come
# back from one: session.tgz (all of them, packed after every part), parts.txt and summary.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
final=${OUT:-}
work=bench/out/session
rm -rf "$work" && mkdir -p "$work"
export OUT=$work PYTHONUNBUFFERED=1
export SESSION_END=${SESSION_END:-$(( $(date +%s) + ${BUDGET_S:-450} ))}
pack() {  # what has been written so far, into the device's $OUT (a call cut short still brings it back)
    [ -n "$final" ] || return 0
    tar czf "$final/session.tgz" -C "$work" . && cp "$work"/parts.txt "$work"/summary.txt "$final/" 2>/dev/null
    return 0
}
T_TESTS=${T_TESTS:-90} T_KERNELS=${T_KERNELS:-150} T_CACHE=${T_CACHE:-40} T_ARENA=${T_ARENA:-0} \
    PYTHONPATH=. bash bench/gpu_check.sh
check=$?
pack
dlrm=0
source bench/budget.sh
limit=$(capped_limit "${T_DLRM:-60}")  # with the volatile tier preloaded (DLRM_PRELOAD, HPS's initial cache rate)
if [ "$limit" != 0 ]; then  # RocksDB (rocksdict) and redis come with the carried wheels
    started=$SECONDS
    source bench/carry_site.sh
    if carry_site; then
        PYTHONPATH=/tmp/site:. timeout -k 10 "$limit" python3 bench/embedding_cache.py --only dlrm --dlrm-device "${DEVICE:-cuda}" \
            --dlrm-warm 400 --dlrm-preload "${DLRM_PRELOAD:-1.0}" --out "$work" 2>&1 | tee "$work/dlrm.txt"
        dlrm=${PIPESTATUS[0]}
    else
        dlrm=1
    fi
    echo "dlrm: exit $dlrm after $((SECONDS - started)) s (limit $limit s)" | tee -a "$work/parts.txt"
    pack
fi
serve=0
if [ "${SERVE:-1}" != 0 ]; then
    started=$SECONDS
    DTYPES=${DTYPES:-float16} REQUESTS=${REQUESTS:-2000} T_CHECK=${T_CHECK:-70} T_LOAD=${T_LOAD:-110} bash bench/gpu_serve.sh
    serve=$?
    echo "serve: exit $serve after $((SECONDS - started)) s" | tee -a "$work/parts.txt"
    pack
fi
python3 bench/gpu_summary.py "$work" | tee "$work/summary.txt"
pack
exit $(( check != 0 || dlrm != 0 || serve != 0 ))
