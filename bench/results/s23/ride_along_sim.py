import sys, random, statistics
sys.path.insert(0, "/work/main")
from unittest.mock import patch
import scheduler.simulator as S
from scheduler import dp
from scheduler.cost_model import CostModel
from bench import live_server as shared
from bench.workload import count_tokens, make_texts
from bench.slo_capacity import NOISE_SEEDS
loads = [float(x) for x in sys.argv[1].split(",")]
arrivals_kind = sys.argv[2] if len(sys.argv) > 2 else "poisson"
slo = float(sys.argv[3]) if len(sys.argv) > 3 else 0.5
texts = make_texts(1200, 8, 256, seed=11); lengths = count_tokens(texts)
limits = shared.simulation_limits()
prof = CostModel.load("/work/main/bench/results/s21/cost_amd.json")
unit = shared.full_batch_capacity(lengths, limits, prof.measured())
host = S.HostLoad(0.004581, 0.000818)
arrive = S.poisson_arrivals if arrivals_kind == "poisson" else S.bursty_arrivals
for load in loads:
    arr = arrive(load * unit, len(texts), random.Random(7))
    for name in ("dp", "dp-noride", "triton", "fifo"):
        rows = []
        ctx = patch.object(dp, "_ride_along", lambda *a: []) if name == "dp-noride" else patch.object(dp, "EXACT_LIMIT", dp.EXACT_LIMIT)
        with ctx:
            for seed in NOISE_SEEDS:
                r = S.simulate(S.Trace(arr, lengths), shared.sim_config(name.split("-")[0]), limits, prof.measured().scaled(1.079), slo, prof, host, refine=True, noise=0.157, seed=seed)
                rows.append(r)
        med = lambda f: statistics.median(f(r) for r in rows)
        print(f"{arrivals_kind} slo {slo} load {load:.3f} {name:10} in-time {med(lambda r: r.slo_attainment):6.1%} p50 {med(lambda r: r.p50):.3f} p99 {med(lambda r: r.p99):6.3f} p99s " + " ".join(f"{r.p99:.2f}" for r in rows), flush=True)
