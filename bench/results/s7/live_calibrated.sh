#!/bin/bash
# Session 7 repeat of session 6's calibrated live runs (dp (host fitted on 600 live requests first), bursts, SLO 2 s:
# at the simulated SLO capacities of fifo and dp, then past capacity (load 0.55, as session 5).
R=bench/results/s7
.venv/bin/python bench/live_policies.py --at-sim-capacity --arrivals bursts --slo-ms 2000 --requests 640 --calibrate 600 \
  --policies dp,fifo,sort_slice --out $R/live_bursts_at_capacity > $R/live_bursts_at_capacity.log 2>&1
.venv/bin/python bench/live_policies.py --loads 0.55 --arrivals bursts --slo-ms 2000 --requests 640 --calibrate 600 \
  --policies dp,fifo,sort_slice --out $R/live_bursts_055 > $R/live_bursts_055.log 2>&1
echo done
