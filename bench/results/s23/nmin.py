import sys, random, statistics, math
sys.path.insert(0, "/work/main")
import scheduler.simulator as S
from scheduler.planner import Plan, Batch, plan as real_plan
from scheduler.cost_model import CostModel
from bench import live_server as shared
from bench.workload import count_tokens, make_texts
from bench.simulate import NOISE_SEEDS
loads = [float(x) for x in sys.argv[1].split(",")]
overhead = float(sys.argv[2]); nseeds = int(sys.argv[3]); margin = float(sys.argv[4]) if len(sys.argv) > 4 else 1.1
N = int(sys.argv[7]) if len(sys.argv) > 7 else 1200
texts = make_texts(N, 8, 256, seed=11); lengths = count_tokens(texts)
limits = shared.simulation_limits()
prof = CostModel.load("/work/main/bench/results/s21/cost_amd.json")
unit = shared.full_batch_capacity(lengths, limits, prof.measured())
host = S.HostLoad(0.004581, 0.000818)
orig_end = S._batch_end
S._batch_end = lambda start, seconds, after, arrivals, first, h: orig_end(start, seconds + overhead, after, arrivals, first, h)
RATE = [0.0]
MODE = sys.argv[6] if len(sys.argv) > 6 else 'rate'
N = int(sys.argv[7]) if len(sys.argv) > 7 else 1200
BACKLOG = [float(sys.argv[5]) if len(sys.argv) > 5 else 1.0]
def nmin_plan(requests, limits, cost, now, config, next_only=False):
    p = real_plan(requests, limits, cost, now, config)
    if config.name != "dp" or len(p.batches) < 2 or p.wait_until is not None:
        return p
    mean = sum(r.length for r in requests) / len(requests)
    lam = RATE[0] * margin
    # smallest n whose batch of mean-length requests serves >= lam requests/s (incl. overhead)
    n_min = None
    full = limits.max_batch_requests
    per_full = (float(cost.predict(full, full * mean, full * mean * mean)) + overhead) / full
    for n in range(1, limits.max_batch_requests + 1):
        c = float(cost.predict(n, n * mean, n * mean * mean)) + overhead
        if (MODE == "rate" and n / c >= lam) or (MODE != "rate" and c / n <= per_full * (1 + float(MODE))):
            n_min = n; break
    if n_min is None: n_min = limits.max_batch_requests
    first = list(p.batches[0].indices)
    slo = statistics.median(r.deadline - r.arrival for r in requests)
    if len(first) >= n_min or p.cost < BACKLOG[0] * slo: return p
    rest = [i for b in p.batches[1:] for i in b.indices]
    tokens = sum(requests[i].length for i in first)
    for i in rest:
        if len(first) >= n_min: break
        if tokens + requests[i].length > limits.max_batch_tokens: break
        first.append(i); tokens += requests[i].length
    return Plan([Batch(tuple(first), tokens)], p.cost)
NAMES = sys.argv[8].split(',') if len(sys.argv) > 8 else ['dp', 'triton']
if MODE != 'off': S.plan = nmin_plan
for load in loads:
    arr = S.poisson_arrivals(load * unit, len(texts), random.Random(7))
    RATE[0] = load * unit
    for name in NAMES:
        rows = [S.simulate(S.Trace(arr, lengths), shared.sim_config(name), limits, prof.measured().scaled(1.079), 0.5, prof, host, refine=True, noise=0.157, seed=seed) for seed in NOISE_SEEDS[:nseeds]]
        med = lambda f: statistics.median(f(r) for r in rows)
        print(f"mode {MODE} N {N} backlog {BACKLOG[0]} nmin margin {margin} ovh {overhead*1e3:.0f}ms load {load:.3f} {name:10} thr {med(lambda r: r.throughput):6.2f} in-time {med(lambda r: r.slo_attainment):6.1%} p99 {med(lambda r: r.p99):6.3f} batch {med(lambda r: r.mean_batch):5.2f}", flush=True)
