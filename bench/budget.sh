# Sourced by bench/gpu_check.sh and bench/gpu_serve.sh: a part's time limit cut to what is left of the session.
# SESSION_END (epoch seconds; set by bench/gpu_session.sh) is when the device call must be done; RESERVE_S are kept
# for what runs after the parts (the summary, the packing of $OUT).
#   limit=$(capped_limit 150)   # 150, or less when less is left; 0 when under 10 s are left (the part is skipped)
capped_limit() {
    local limit=$1
    if [ -n "${SESSION_END:-}" ] && [ "$limit" != 0 ]; then
        local left=$(( SESSION_END - $(date +%s) - ${RESERVE_S:-25} ))
        [ "$left" -lt "$limit" ] && limit=$left
        [ "$limit" -lt 10 ] && limit=0
    fi
    echo "$limit"
}
