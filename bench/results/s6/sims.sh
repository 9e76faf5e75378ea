#!/bin/bash
# before (7863696) and after (HEAD) on the same traces, device-only and host-modelled, SLO 2 s and 0.5 s, 3000 requests a trace
# /tmp/old: `git worktree add /tmp/old 7863696` (with .venv linked to this checkout's)
COST=/work/main/bench/results/sim_s4/cost_model_cpu_s4.json
OUT=${1:-/work/main/bench/results/s6/sim}  # where the results go (session 7 reran it into s7/sim)
run() {  # tree tag slo hostargs loads
  (cd $1 && /work/main/.venv/bin/python bench/simulate.py --cost $COST --slo-ms $3 --requests 3000 --loads $5 $4 --out $OUT/$2 > $OUT/$2.log 2>&1)
}
mkdir -p $OUT
DEV=0.5,0.7,0.9,1.0,1.1,1.2,1.4
HOST=0.3,0.42,0.54,0.6,0.66,0.72,0.84
for slo in 2000 500; do
  run /tmp/old before_dev_slo$slo $slo "" $DEV &
  run /work/main after_dev_slo$slo $slo "" $DEV
  wait
  run /tmp/old before_host_slo$slo $slo "--host-ms 4,0 --refine" $HOST &
  run /work/main after_host_slo$slo $slo "--host-ms 4,0 --refine" $HOST
  wait
done
echo done
