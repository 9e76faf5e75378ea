#!/bin/bash
# Session 7: session 6's simulation grid, before (/tmp/old: a checkout of 92c54e3) and after (HEAD), into s7/sim.
exec bash "$(dirname "$0")/../s6/sims.sh" /work/main/bench/results/s7/sim
