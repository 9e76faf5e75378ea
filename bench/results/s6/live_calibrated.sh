#!/bin/bash
# Calibrated live runs with the new dp (host fitted on 600 live requests first), bursts, SLO 2 s:
# at the simulated SLO capacities of fifo and dp, then past capacity (load 0.55, as session 5).
R=${1:-bench/results/s6}  # where the results go (session 7 reran it into s7)
.venv/bin/python bench/live_policies.py --at-sim-capacity --arrivals bursts --slo-ms 2000 --requests 640 --calibrate 600 \
  --policies dp,fifo,sort_slice --out $R/live_bursts_at_capacity > $R/live_bursts_at_capacity.log 2>&1
.venv/bin/python bench/live_policies.py --loads 0.55 --arrivals bursts --slo-ms 2000 --requests 640 --calibrate 600 \
  --policies dp,fifo,sort_slice --out $R/live_bursts_055 > $R/live_bursts_055.log 2>&1
echo done
