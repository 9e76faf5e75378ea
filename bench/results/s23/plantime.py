"""Does the planner's own time (serial with the batches) reproduce dp's live cliff? Sim with plan wall time x K added."""
import math, random, sys, time, statistics
sys.path.insert(0, "/work/main")
import scheduler.simulator as S
from scheduler.cost_model import CostModel
from bench import live_server as shared
from bench.workload import count_tokens, make_texts
from bench.slo_capacity import NOISE_SEEDS

K = float(sys.argv[1]) if len(sys.argv) > 1 else 0.0
loads = [float(x) for x in sys.argv[2].split(",")] if len(sys.argv) > 2 else [0.55, 0.6, 0.65, 0.7, 0.75]
pols = sys.argv[3].split(',') if len(sys.argv) > 3 else ['dp']
texts = make_texts(1200, 8, 256, seed=11)
lengths = count_tokens(texts)
limits = shared.simulation_limits()
prof = CostModel.load("/work/main/bench/results/s21/cost_amd.json")
device = prof.measured().scaled(1.079)
start = prof
host = S.HostLoad(0.004581, 0.000818)
unit = shared.full_batch_capacity(lengths, limits, prof.measured())
print("unit", unit)
orig_plan = S.plan
acc = [0.0]
def timed_plan(*a, **k):
    t = time.perf_counter(); out = orig_plan(*a, **k); acc[0] += time.perf_counter() - t
    return out
S.plan = timed_plan
# shift clock: wrap _batch_end to add the plan time accrued since the last batch
orig_end = S._batch_end
def end(start, seconds, after, arrivals, first, h):
    extra = acc[0] * K; acc[0] = 0.0
    return orig_end(start, seconds + extra, after, arrivals, first, h)
S._batch_end = end
for load in loads:
    arr = S.poisson_arrivals(load * unit, len(texts), random.Random(7))
    for p in pols:
        rows = []
        for seed in NOISE_SEEDS[:3]:
            acc[0] = 0.0
            t0 = time.perf_counter()
            r = S.simulate(S.Trace(arr, lengths), shared.sim_config(p), limits, device, 0.5, start, host, refine=True, noise=0.157, seed=seed)
            rows.append((r.slo_attainment, r.p99, r.mean_batch, time.perf_counter() - t0))
        print(f"K={K} load {load:.3f} {p:7} in-time " + " ".join(f"{a:.1%}" for a, *_ in rows) +
              f" p99 " + " ".join(f"{b:.2f}" for _, b, *_ in rows) + f" batch {statistics.mean(c for *_, c, _ in rows):.1f} wall {sum(d for *_, d in rows):.1f}s", flush=True)
