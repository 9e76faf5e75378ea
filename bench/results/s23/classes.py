import sys, random, time, statistics, collections
sys.path.insert(0, "/work/main")
import numpy as np
import scheduler.simulator as S
import scheduler.dp as D
from scheduler.planner import plan
from scheduler.cost_model import CostModel
from bench import live_server as shared
from bench.workload import count_tokens, make_texts
texts = make_texts(1200, 8, 256, seed=11); lengths = count_tokens(texts)
limits = shared.simulation_limits()
prof = CostModel.load("/work/main/bench/results/s21/cost_amd.json")
unit = shared.full_batch_capacity(lengths, limits, prof.measured())
load = float(sys.argv[1])
# record the classes plan_dp builds: wrap _plan_class and note members' kinds
rec = []
orig_pc = D._plan_class
cur = {}
def pc(members, pending, limits, start, late_cost=float("inf")):
    out = orig_pc(members, pending, limits, start, late_cost)
    cur.setdefault("classes", []).append((len(members), len(out[0]) if out else 0, late_cost != float("inf"), float(np.min(pending.deadline_arr[members]) - start) if members else 0))
    return out
D._plan_class = pc
orig = S.plan
def wrapped(requests, limits, cost, now, config, next_only=False):
    cur.clear()
    out = orig(requests, limits, cost, now, config, next_only)
    rec.append((len(requests), list(cur.get("classes", [])), len(out.batches[0].indices)))
    return out
S.plan = wrapped
arr = S.poisson_arrivals(load * unit, 1200, random.Random(7))
r = S.simulate(S.Trace(arr, lengths), shared.sim_config("dp"), limits, prof.measured().scaled(1.079), 0.5, prof, S.HostLoad(0.004581, 0.000818), refine=True, noise=0.157, seed=1)
print(f"thr {r.throughput:.2f} in-time {r.slo_attainment:.1%} batch {r.mean_batch:.2f}")
kinds = collections.Counter()
for n, cls, first in rec:
    if not cls: kinds["single"] += 1; continue
    size, fb, shed, slack = cls[0]
    kind = "first class late (overdue/hopeless)" if slack < 0 else "first class in time"
    kinds[kind] += 1
print(kinds)
sizes = collections.defaultdict(list)
for n, cls, first in rec:
    if cls:
        sizes["late" if cls[0][3] < 0 else "ok"].append((n, cls[0][0], first))
for k, v in sizes.items():
    print(k, "plans", len(v), "median pending", statistics.median(a for a, _, _ in v), "median first-class size", statistics.median(b for _, b, _ in v), "mean first batch", round(statistics.mean(c for *_, c in v), 2))
