"""Do bursts that reach the server over ~16 ms (as live: median spread 8-17 ms, p90 19-33 ms, measured from the
bursts run's answers as received - x-total-time) move the simulated SLO capacities of fifo and triton apart, as live
(fifo 0.32, triton 0.14 where instant bursts simulate them level)? English paragraphs, bursts of 16, SLO 1 s, the table's
profile and noise. usage: burst_spread.py GAP_MS[,GAP_MS...] NSEEDS"""
import argparse, statistics, sys
sys.path.insert(0, "/work/main")
from bench.simulate import length_families, policy_config
from bench.slo_capacity import full_batch_rate, slo_capacity
from scheduler.cost_model import CostModel
from scheduler.planner import Limits
from scheduler.simulator import Trace, make_trace

gaps, nseeds = [float(g) / 1000 for g in sys.argv[1].split(",")], int(sys.argv[2])
args = argparse.Namespace(fixed_batch_size=32, delay_ms=5.0, late_grace=4.0)
cost = CostModel.load("/work/main/bench/results/s21/cost_amd.json").measured()
limits = Limits(16384, 64)
draw, mean_len = next(v for k, v in length_families().items() if k.startswith("english"))
unit = full_batch_rate(mean_len, limits, cost)


def spread(trace: Trace, gap: float) -> Trace:
    """Each burst's k-th request (k = 0..15) arrives k x gap after the burst's instant."""
    return Trace([a + (i % 16) * gap for i, a in enumerate(trace.arrivals)], trace.lengths)


for gap in gaps:
    caps = {p: [slo_capacity(lambda x: spread(make_trace(x * unit, 3000, draw, seed=1, bursty=True), gap), policy_config(p, args),
                             limits, cost, 1.0, 8, refine=True, noise=0.15, seed=s) for s in range(1, nseeds + 1)]
            for p in ("dp", "fifo", "triton", "token_budget")}
    print(f"gap {gap * 1e3:.1f} ms: " + " ".join(f"{p} {statistics.median(v):.3f}" for p, v in caps.items()), flush=True)
