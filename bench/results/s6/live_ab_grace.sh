#!/bin/bash
# The live A/B of live_ab.sh again at ace4be4 (late_grace honoured), dp only, against 7863696 alternating;
# same trace and starting cost model (cost0 from live_ab.sh).
# /tmp/old: `git worktree add /tmp/old 7863696` (with .venv linked to this checkout's)
R=/work/main/bench/results/s6
ARGS="--rps 65 --arrivals poisson --slo-ms 2000 --requests 800 --policies dp"
for r in 1 2; do
  mkdir -p $R/live_grace_r$r/cost-models && cp $R/cost0/cost-*.json $R/live_grace_r$r/cost-models/
  cd /work/main && .venv/bin/python bench/live_policies.py $ARGS --out $R/live_grace_r$r > $R/live_grace_r$r.log 2>&1
  mkdir -p $R/live_grace_old_r$r/cost-models && cp $R/cost0/cost-*.json $R/live_grace_old_r$r/cost-models/
  cd /tmp/old && PYTHONPATH=/tmp/old /work/main/.venv/bin/python bench/live_policies.py $ARGS --out $R/live_grace_old_r$r > $R/live_grace_old_r$r.log 2>&1
done
