"""How much the planning charged a batch (HostLoad.per_batch) moved dp's sim@runs capacity in live_capacity/:
dp's simulated SLO capacity at the runs' speed with its measured planning a batch and with none (the calibration's
start model as profile and planner, the calibration's host fit; an approximation of live_capacity.py's own call)."""
import json, sys
from pathlib import Path
sys.path.insert(0, "/work/main")
from bench import live_server as shared
from bench.host_load import calibration_fit
from scheduler.simulator import poisson_arrivals
from bench.workload import count_tokens, make_texts

folder = Path("bench/results/s24/live_capacity")
rep = json.loads((folder / "live_capacity.json").read_text())
profile, fit = calibration_fit(folder)
speed = 1.078  # the live runs' median, as printed
lengths = count_tokens(make_texts(1200, 8, 256, seed=11))  # the live trace's, as live_capacity.py's
per = rep["sim_capacity_at_runs"]["plan_seconds_a_batch"]
for label, extra in (("with planning", per), ("without", {})):
    r = {}
    shared.sim_capacities(lengths, poisson_arrivals, shared.simulation_limits(), rep["slo_s"], r, profile,
                          profile.scaled(speed), fit.host, ("fifo", "dp"), fit.scatter, batch_seconds=extra)
    print(label, r["sim_capacity"]["loads"], flush=True)
