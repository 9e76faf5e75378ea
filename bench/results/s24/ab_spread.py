"""SLO capacity of two policy specs over bench/simulate.py's six traces at one SLO, per noise seed (paired):
the 7-seed median (the table's statistic) and the paired mean difference with its standard error over NSEEDS.
usage: ab_spread.py SLO_S NSEEDS SPEC_A SPEC_B   (SPEC: name[:field=value;...], as seed_spread.py's)"""
import dataclasses, statistics, sys, time
sys.path.insert(0, "/work/main")
from bench.simulate import length_families
from bench.slo_capacity import full_batch_rate, slo_capacity
from scheduler.cost_model import CostModel
from scheduler.planner import Limits, PolicyConfig
from scheduler.simulator import make_trace

slo, nseeds, specs = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3:5]
cost = CostModel.load("/work/main/bench/results/s21/cost_amd.json").measured()
limits = Limits(16384, 64)


def config(spec):
    name, _, opts = spec.partition(":")
    c = PolicyConfig(name, fixed_batch_size=32, preferred_batch_sizes=(8, 16, 32), max_queue_delay=0.005, max_wait=0.005, late_grace=4.0)
    for kv in filter(None, opts.split(";")):
        k, v = kv.split("=")
        c = dataclasses.replace(c, **{k: v if isinstance(getattr(c, k), str) else type(getattr(c, k))(float(v))})
    return c


for dist, (draw, mean_len) in length_families().items():
    capacity = full_batch_rate(mean_len, limits, cost)
    for bursty in (False, True):
        t0 = time.time()
        caps = {s: [slo_capacity(lambda x: make_trace(x * capacity, 3000, draw, seed=1, bursty=bursty), config(s), limits, cost, slo, 8,
                                 refine=True, noise=0.15, seed=k) for k in range(1, nseeds + 1)] for s in specs}
        a, b = caps[specs[0]], caps[specs[1]]
        d = [x / max(y, 1e-9) - 1 for x, y in zip(a, b)]
        med = lambda v: statistics.median(v[:7])
        print(f"slo {slo} {dist:20} {'bursts' if bursty else 'poisson':8} 7-seed median {med(a) * capacity:7.2f} vs {med(b) * capacity:7.2f} "
              f"({med(a) / max(med(b), 1e-9):.3f}); {nseeds} seeds paired {statistics.mean(d):+.2%} se {statistics.stdev(d) / len(d) ** 0.5:.2%}, "
              f"A >= B in {sum(x >= 0 for x in d)} ({time.time() - t0:.0f}s)", flush=True)
