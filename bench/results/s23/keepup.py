"""dp's keep_up in the simulator: the live-like Poisson trace (English paragraphs, SLO 0.5 s), a per-batch overhead."""
import sys, random, statistics
sys.path.insert(0, "/work/main")
import scheduler.simulator as S
from scheduler.cost_model import CostModel
from bench import live_server as shared
from bench.workload import count_tokens, make_texts
from bench.slo_capacity import NOISE_SEEDS
loads = [float(x) for x in sys.argv[1].split(",")]
variants = sys.argv[2].split(",")
overhead = float(sys.argv[3]); nseeds = int(sys.argv[4]); N = int(sys.argv[5])
arrivals_kind = sys.argv[6] if len(sys.argv) > 6 else "poisson"
slo = float(sys.argv[7]) if len(sys.argv) > 7 else 0.5
texts = make_texts(N, 8, 256, seed=11); lengths = count_tokens(texts)
limits = shared.simulation_limits()
prof = CostModel.load("/work/main/bench/results/s21/cost_amd.json")
unit = shared.full_batch_capacity(lengths, limits, prof.measured())
host = S.HostLoad(0.004581, 0.000818)
orig_end = S._batch_end
S._batch_end = lambda start, seconds, after, arrivals, first, h: orig_end(start, seconds + overhead, after, arrivals, first, h)
arrive = S.poisson_arrivals if arrivals_kind == "poisson" else S.bursty_arrivals
for load in loads:
    arr = arrive(load * unit, len(texts), random.Random(7))
    for v in variants:
        rows = [S.simulate(S.Trace(arr, lengths), shared.sim_config(v), limits, prof.measured().scaled(1.079), slo, prof, host,
                           refine=True, noise=0.157, seed=seed) for seed in NOISE_SEEDS[:nseeds]]
        med = lambda f: statistics.median(f(r) for r in rows)
        print(f"{arrivals_kind} slo {slo} ovh {overhead*1e3:.0f}ms N {N} load {load:.3f} ({load*unit:5.1f}/s) {v:16} thr {med(lambda r: r.throughput):6.2f} "
              f"in-time {med(lambda r: r.slo_attainment):6.1%} p99 {med(lambda r: r.p99):6.3f} batch {med(lambda r: r.mean_batch):5.2f}", flush=True)
