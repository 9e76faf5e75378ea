"""Why dp trailed token_budget on English bursts at 2 s: p99, mean batch, in-time share and throughput over 7 noise seeds at
fixed loads (requests/s), fitted noise or spells. usage: shed_probe.py fitted|spells RPS[,RPS] SPEC...  (SPEC as bench/policy_ab.py)"""
import sys, statistics
sys.path.insert(0, "/work/main")
from bench.policy_ab import spec_config, DEFAULT_COST
from bench.simulate import length_families
from bench.slo_capacity import full_batch_rate
from scheduler.cost_model import DEFAULT_ALPHA, CostModel
from scheduler.planner import Limits
from scheduler.simulator import Scatter, Spells, HostLoad, make_trace, simulate
cost = CostModel.load(DEFAULT_COST).measured(); cost.alpha = DEFAULT_ALPHA
limits = Limits(16384, 64)
host = HostLoad(0.00174, 0.00027, per_forward=0.00082)
noise = Scatter(0.06, 0.0125) if sys.argv[1] == "fitted" else Scatter(0.0, 0.0125, Spells((0.082, 0.115), (0.37, 40.0)))
fam = [v for k, v in length_families().items() if k.startswith("english")][0]
draw, mean_len = fam
unit = full_batch_rate(mean_len, limits, cost)
print("unit", unit, "mean len", mean_len)
for rps in map(float, sys.argv[2].split(",")):
    trace = make_trace(rps, 3000, draw, seed=1, bursty=True)
    for spec in sys.argv[3:]:
        rs = [simulate(trace, spec_config(spec), limits, cost, 2.0, host=host, refine=True, noise=noise, seed=s) for s in range(1, 8)]
        print(f"{rps:6.1f} {spec:32} p99 " + " ".join(f"{r.p99:5.2f}" for r in rs) + f" | batch {statistics.mean(r.mean_batch for r in rs):5.1f} att {statistics.mean(r.slo_attainment for r in rs):.4f} thr {statistics.mean(r.throughput for r in rs):.1f}")
