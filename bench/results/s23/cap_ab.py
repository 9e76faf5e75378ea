"""SLO capacity, dp with keep_up (default) vs keep_up=0, over bench/simulate.py's six traces at one SLO (7 seeds)."""
import sys, time, dataclasses
sys.path.insert(0, "/work/main")
import random
from bench.simulate import corpus_lengths
from bench.slo_capacity import median_capacity
from scheduler.cost_model import CostModel
from scheduler.planner import Limits, PolicyConfig
from scheduler.simulator import lengths_empirical, lengths_lognormal, lengths_uniform, make_trace
slo = float(sys.argv[1]); steps = int(sys.argv[2]) if len(sys.argv) > 2 else 8
cost = CostModel.load("/work/main/bench/results/s21/cost_amd.json").measured()
limits = Limits(16384, 64)
corpus = corpus_lengths()
rng = random.Random(0); ln = lengths_lognormal(64, 0.7, 4, 256); sample = [ln(rng) for _ in range(5000)]
dists = {"uniform 8-256": (lengths_uniform(8, 256), 132), "lognormal median 64": (ln, sum(sample) / len(sample)),
         "english paragraphs": (lengths_empirical(corpus), sum(corpus) / len(corpus))}
base = PolicyConfig("dp", fixed_batch_size=32, preferred_batch_sizes=(8, 16, 32), max_queue_delay=0.005, max_wait=0.005, late_grace=4.0)
for dist, (draw, mean_len) in dists.items():
    n_full = max(1, min(limits.max_batch_requests, int(limits.max_batch_tokens // mean_len)))
    capacity = n_full / cost.predict_lengths([round(mean_len)] * n_full)
    for bursty in (False, True):
        out = {}
        for label, cfg in (("keep_up", base), ("off", dataclasses.replace(base, keep_up=0.0))):
            t0 = time.time()
            out[label] = median_capacity(lambda x: make_trace(x * capacity, 3000, draw, seed=1, bursty=bursty), cfg, limits, cost, slo, steps,
                                         refine=True, noise=0.15) * capacity
            t = time.time() - t0
        print(f"slo {slo} {dist:20} {'bursts' if bursty else 'poisson':8} dp keep_up {out['keep_up']:7.2f} off {out['off']:7.2f} ratio {out['keep_up'] / max(out['off'], 1e-9):.3f} ({t:.0f}s)", flush=True)
