"""dp's deadline_margin under the noise and host fitted on live runs (session 25): SLO capacity of dp specs and a
baseline over bench/simulate.py's six traces at one SLO, per noise seed (paired with the first spec).
usage: margin_ab.py SLO_S NSEEDS SPEC [SPEC ...]   (SPEC: name[:field=value;...])"""
import dataclasses, statistics, sys, time
sys.path.insert(0, "/work/main")
from bench.simulate import length_families
from bench.slo_capacity import full_batch_rate, slo_capacity
from scheduler.cost_model import DEFAULT_ALPHA, CostModel
from scheduler.planner import Limits, PolicyConfig
from scheduler.simulator import HostLoad, Scatter, make_trace

slo, nseeds, specs = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
cost = CostModel.load("/work/main/bench/results/s21/cost_amd.json").measured()
cost.alpha = DEFAULT_ALPHA
limits = Limits(16384, 64)
# Default: bench/simulate.py --host-ms 1.74,0.27,0.82 --noise 0.06 --jitter 0.0125 (fitted on live runs, session 25);
# env HOST_MS=A,C,F NOISE=S JITTER=J FAMILY=prefix for another device model or one length family.
import os
host = HostLoad(*[float(x) / 1000 for x in os.environ.get("HOST_MS", "1.74,0.27,0.82").split(",")])
host = HostLoad(host.per_arrival, host.per_completion, per_forward=host.per_batch)  # third field: per forward
noise = Scatter(float(os.environ.get("NOISE", "0.06")), float(os.environ.get("JITTER", "0.0125")))


def config(spec):
    name, _, opts = spec.partition(":")
    c = PolicyConfig(name, fixed_batch_size=32, preferred_batch_sizes=(8, 16, 32), max_queue_delay=0.005, max_wait=0.005, late_grace=4.0)
    for kv in filter(None, opts.split(";")):
        k, v = kv.split("=")
        c = dataclasses.replace(c, **{k: v if isinstance(getattr(c, k), str) else type(getattr(c, k))(float(v))})
    return c


for dist, (draw, mean_len) in length_families().items():
    if not dist.startswith(os.environ.get("FAMILY", "")):
        continue
    capacity = full_batch_rate(mean_len, limits, cost)
    for bursty in (False, True):
        t0 = time.time()
        caps = {s: [slo_capacity(lambda x: make_trace(x * capacity, 3000, draw, seed=1, bursty=bursty), config(s), limits, cost,
                                 slo, 8, host=host, refine=True, noise=noise, seed=k) for k in range(1, nseeds + 1)] for s in specs}
        base = caps[specs[0]]
        parts = []
        for s in specs:
            d = [x / max(y, 1e-9) - 1 for x, y in zip(caps[s], base)]
            parts.append(f"{s} {statistics.median(caps[s]) * capacity:7.2f}" + ("" if s == specs[0] else
                         f" ({statistics.mean(d):+.1%} se {statistics.stdev(d) / len(d) ** 0.5:.1%})"))
        print(f"slo {slo} {dist[:18]:18} {'bursts' if bursty else 'poisson':7} " + " | ".join(parts) + f" ({time.time() - t0:.0f}s)", flush=True)
