#!/bin/bash
# Session 7: session 6's calibrated live runs (at the simulated capacities, then load 0.55) again, into s7.
exec bash "$(dirname "$0")/../s6/live_calibrated.sh" bench/results/s7
