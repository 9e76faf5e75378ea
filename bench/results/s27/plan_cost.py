"""What dp's live planning costs it in simulation: a live_capacity folder's policies simulated at the runs' median speed
(the runs fit, as sim_fidelity's capacities) with each policy's planning a batch as measured live, and with none.
usage: plan_cost.py FOLDER"""
import statistics
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, "/work/main")
from bench.host_load import fit_runs
from bench.live_server import sim_capacity, simulation_limits
from bench.sim_fidelity import load_folder

d = load_folder(Path(sys.argv[1]))
fit = fit_runs([r["batches"] for r in d["runs"]], d["profile"])
ref = statistics.median(s for s in fit.speeds if s == s)
device = d["profile"].scaled(ref)
slo = d["report"]["slo_s"]
for policy in dict.fromkeys(r["policy"] for r in d["runs"]):
    planning = statistics.median(r["live"].get("plan_seconds_a_batch", 0.0) for r in d["runs"] if r["policy"] == policy)
    caps = [sim_capacity(policy, d["lengths"], d["arrivals_at"], d["unit"], simulation_limits(), slo, d["planner"], device,
                         replace(fit.host, per_batch=p), fit.scatter) for p in (planning, 0.0)]
    print(f"{policy:18} planning {planning * 1000:5.2f} ms a batch: capacity {caps[0]:.3f}, with no planning {caps[1]:.3f} "
          f"({caps[1] / caps[0] - 1:+.1%})", flush=True)
