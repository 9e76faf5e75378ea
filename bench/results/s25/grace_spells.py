"""dp's late_grace on the recorded live runs' own speed spells (bench/sim_fidelity.py's `spells` replay): every
dp run of the folders simulated at late_grace 4 (the default), 2, 1 and 0.5; median p99 over the noise seeds and in
how many seeds the run passes. Also the same for the loads at which the baselines ran (dp simulated there).

    .venv/bin/python bench/results/s25/grace_spells.py FOLDER...
"""
import math
import random
import statistics
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from bench.host_load import fit_runs  # noqa: E402
from bench.live_server import sim_config, simulation_limits  # noqa: E402
from bench.sim_fidelity import load_folder, spells  # noqa: E402
from bench.slo_capacity import NOISE_SEEDS, holds_slo, offered_rate  # noqa: E402
from scheduler.simulator import Trace, simulate  # noqa: E402

GRACES = (4.0, 2.0, 1.0, 0.5)
totals = {g: [0, 0, []] for g in GRACES}
for folder in sys.argv[1:]:
    d = load_folder(Path(folder))
    fit = fit_runs([r["batches"] for r in d["runs"]], d["profile"])
    moves = [spells(r["batches"], d["profile"], s, fit.host, 3.0) for r, s in zip(d["runs"], fit.speeds)]
    spread = [x for _, logs in moves for x in logs]
    between = 1.4826 * statistics.median(abs(x - statistics.median(spread)) for x in spread)
    within = replace(fit.scatter, floor=math.sqrt(max(fit.scatter.floor ** 2 - between ** 2, 0.0)))
    slo = d["report"]["slo_s"]
    planning = statistics.median(r["live"]["plan_seconds_a_batch"] for r in d["runs"] if r["policy"] == "dp")
    print(folder)
    for run, speed, (speed_at, _) in zip(d["runs"], fit.speeds, moves):
        trace = Trace(d["arrivals_at"](run["load"] * d["unit"], len(d["lengths"]), random.Random(7)), d["lengths"])
        offered = offered_rate(trace.arrivals, trace.request_count)
        line = f"  {run['policy']:13} {run['load']:.3f} speed {speed:.3f}" + (
            f" live dp p99 {run['live']['p99']:.3f} {'P' if run['passed'] else 'f'}" if run["policy"] == "dp" else " " * 20)
        for g in GRACES:
            config = replace(sim_config("dp"), late_grace=g)
            rs = [simulate(trace, config, simulation_limits(), d["profile"].scaled(speed), slo, d["planner"],
                           replace(fit.host, per_batch=planning), refine=True, noise=within, seed=s, speed_at=speed_at)
                  for s in NOISE_SEEDS]
            passes = sum(holds_slo(r.p99, r.throughput, offered, slo) for r in rs)
            good = statistics.median(r.slo_attainment for r in rs)
            totals[g][0] += passes
            totals[g][1] += len(rs)
            totals[g][2].append(good)
            line += f" | g{g:g}: p99 {statistics.median(r.p99 for r in rs):.3f} {passes}/7 in {good:.4f}"
        print(line, flush=True)
for g, (p, n, good) in totals.items():
    print(f"late_grace {g:g}: passes {p} of {n} seed-runs; mean in-time share {statistics.mean(good):.4f}")
