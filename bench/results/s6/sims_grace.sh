#!/bin/bash
# The simulation again at ace4be4 (late_grace honoured: overdue requests run first), same setup as sims.sh.
COST=bench/results/sim_s4/cost_model_cpu_s4.json
OUT=bench/results/s6/sim
DEV=0.5,0.7,0.9,1.0,1.1,1.2,1.4
HOST=0.3,0.42,0.54,0.6,0.66,0.72,0.84
run() { .venv/bin/python bench/simulate.py --cost $COST --slo-ms $2 --requests 3000 --loads $4 $3 --out $OUT/$1 > $OUT/$1.log 2>&1; }
run grace_dev_slo2000 2000 "" $DEV & run grace_dev_slo500 500 "" $DEV; wait
run grace_host_slo2000 2000 "--host-ms 4,0 --refine" $HOST & run grace_host_slo500 500 "--host-ms 4,0 --refine" $HOST; wait
