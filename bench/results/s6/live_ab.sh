#!/bin/bash
# Live A/B past capacity: new dp (HEAD) vs old dp (7863696), sort_slice and fifo as references; same trace
# /tmp/old: `git worktree add /tmp/old 7863696` (with .venv linked to this checkout's)
# (seeded, --rps), same starting cost model (profiled once into cost0, copied into every run's folder).
set -x
R=/work/main/bench/results/s6
ARGS="--rps 65 --arrivals poisson --slo-ms 2000 --requests 800"
cd /work/main
TURBOSERVE_SCHEDULER__COST_MODEL_DIR=$R/cost0 .venv/bin/turboserve profile > $R/profile.log 2>&1
for r in 1 2; do
  mkdir -p $R/live_new_r$r/cost-models && cp $R/cost0/cost-*.json $R/live_new_r$r/cost-models/
  cd /work/main && .venv/bin/python bench/live_policies.py $ARGS --policies dp,sort_slice,fifo --out $R/live_new_r$r > $R/live_new_r$r.log 2>&1
  mkdir -p $R/live_old_r$r/cost-models && cp $R/cost0/cost-*.json $R/live_old_r$r/cost-models/
  cd /tmp/old && PYTHONPATH=/tmp/old /work/main/.venv/bin/python bench/live_policies.py $ARGS --policies dp --out $R/live_old_r$r > $R/live_old_r$r.log 2>&1
done
echo done
