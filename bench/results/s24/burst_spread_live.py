"""burst_spread.py's question on the live bursts run's own setting (live_capacity_bursts/: its calibration's profile at
the runs' speed 1.146, host fit and scatter, its trace's lengths, the server's policy settings, planning a batch as
measured): simulated SLO capacities with each burst's k-th request k x GAP after the burst's instant.
usage: burst_spread_live.py GAP_MS[,GAP_MS...]"""
import json, sys
from pathlib import Path
sys.path.insert(0, "/work/main")
from bench import live_server as shared
from bench.host_load import calibration_fit
from bench.workload import count_tokens, make_texts
from scheduler.simulator import bursty_arrivals

folder = Path("bench/results/s24/live_capacity_bursts")
rep = json.loads((folder / "live_capacity.json").read_text())
profile, fit = calibration_fit(folder)
lengths = count_tokens(make_texts(1280, 8, 256, seed=11))
per = rep["sim_capacity_at_runs"]["plan_seconds_a_batch"]
for gap in [float(g) / 1000 for g in sys.argv[1].split(",")]:
    def arrivals_at(rate, count, rng, gap=gap):
        return [a + (i % 16) * gap for i, a in enumerate(bursty_arrivals(rate, count, rng))]
    out = {}
    shared.sim_capacities(lengths, arrivals_at, shared.simulation_limits(), rep["slo_s"], out, profile,
                          profile.scaled(1.146), fit.host, ("dp", "fifo", "triton", "token_budget"), fit.scatter, batch_seconds=per)
    print(f"gap {gap * 1e3:.1f} ms:", {p: round(v, 4) for p, v in out["sim_capacity"]["loads"].items()}, flush=True)
