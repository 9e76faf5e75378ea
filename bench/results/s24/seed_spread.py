"""Per-seed SLO capacities of dp and the baselines on one trace family: is dp's shortfall at the ceiling beyond
the seed-to-seed spread? usage: seed_spread.py SLO_S DIST(english|lognormal|uniform) ARRIVALS(poisson|bursts) NSEEDS [REQUESTS [POLICIES]]
POLICIES: comma-separated, name:FIELD=VALUE;... sets PolicyConfig fields (an unknown KEY goes to extra, a float); the first is
compared with the rest. The figures in RESULTS were taken before length_families() replaced this script's own set-up (same lengths)."""
import argparse, dataclasses, statistics, sys
sys.path.insert(0, "/work/main")
from bench.simulate import POLICIES, length_families, policy_config
from bench.slo_capacity import full_batch_rate, slo_capacity
from scheduler.cost_model import CostModel
from scheduler.planner import Limits
from scheduler.simulator import make_trace

slo, dist, arr, nseeds = float(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
requests = int(sys.argv[5]) if len(sys.argv) > 5 else 3000
names = sys.argv[6].split(',') if len(sys.argv) > 6 else list(POLICIES)


def config(spec):
    name, _, opts = spec.partition(':')
    c = policy_config(name, args)
    for kv in filter(None, opts.split(';')):
        k, v = kv.split('=')
        if hasattr(c, k):
            c = dataclasses.replace(c, **{k: v if isinstance(getattr(c, k), str) else type(getattr(c, k))(float(v))})
        else:
            c.extra[k] = float(v)
    return c


args = argparse.Namespace(fixed_batch_size=32, delay_ms=5.0, late_grace=4.0)
cost = CostModel.load("bench/results/s21/cost_amd.json").measured()
limits = Limits(16384, 64)
draw, mean_len = next(v for k, v in length_families().items() if k.startswith(dist))
capacity = full_batch_rate(mean_len, limits, cost)
bursty = arr == "bursts"
trace_at = lambda x: make_trace(x * capacity, requests, draw, seed=1, bursty=bursty)
caps = {p: [slo_capacity(trace_at, config(p), limits, cost, slo, 8, refine=True, noise=0.15, seed=s)
            for s in range(1, nseeds + 1)] for p in names}
for p, c in caps.items():
    print(f"{p:12} median {statistics.median(c):.4f} mean {statistics.mean(c):.4f} sd {statistics.stdev(c):.4f}  " + " ".join(f"{x:.3f}" for x in c))
for p in names[1:]:
    d = [a / b - 1 for a, b in zip(caps[names[0]], caps[p])]
    print(f"{names[0]} vs {p:12}: paired mean {statistics.mean(d):+.2%} sd {statistics.stdev(d):.2%} (se {statistics.stdev(d) / len(d) ** 0.5:.2%}); "
          f"dp >= in {sum(x >= 0 for x in d)} of {len(d)} seeds")
