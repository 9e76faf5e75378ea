"""Session 20: does planning deadlines with a margin (dp's `deadline_margin`: slack divided by the cost model's p90
overrun ** margin) hold the SLO better when batches scatter about the model, as they do live? SLO capacity (highest
load with p99 within the SLO, bisection) of fifo and of dp with margins 0, 0.5, 1, on a device whose batch times
are the profile times a log-normal factor (sigma 0 and 0.15; the planners' models learn from every batch).

    .venv/bin/python bench/results/s20/margin_sim.py bench/results/s20/cost_amd.json [--requests 2000] [--steps 8]

(cost_amd.json: this session's profile of the AMD EPYC VM; the script uses it as measured.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from bench.slo_capacity import slo_capacity  # noqa: E402
from scheduler.cost_model import CostModel  # noqa: E402
from scheduler.planner import Limits, PolicyConfig  # noqa: E402
from scheduler.simulator import lengths_lognormal, lengths_uniform, make_trace  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("cost")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--noises", default="0,0.15")
    ap.add_argument("--seeds", default="1,2")
    ap.add_argument("--margins", default="0,0.5,1")
    ap.add_argument("--dists", default="uniform 8-256,lognormal 64")
    args = ap.parse_args()
    cost = CostModel.load(args.cost).measured()
    limits = Limits(16384, 64)
    fifo = PolicyConfig("fifo", fixed_batch_size=32, max_queue_delay=0.005)
    dps = {m: PolicyConfig("dp", max_wait=0.005, deadline_margin=float(m)) for m in args.margins.split(",")}
    dists = {"uniform 8-256": (lengths_uniform(8, 256), 132), "lognormal 64": (lengths_lognormal(64, 0.7, 4, 256), 80)}
    dists = {k: v for k, v in dists.items() if k in args.dists.split(",")}
    print(f"{'trace':34} {'slo':>4} {'noise':>5} {'seed':>4} {'fifo':>6} " + " ".join(f"{'dp m=' + m:>8}" for m in dps))
    for dist, (draw, mean_len) in dists.items():
        n_full = max(1, min(64, int(16384 // mean_len)))
        unit = n_full / cost.predict_lengths([mean_len] * n_full)
        for bursty in (True, False):
            for slo in (1.0, 0.5):
                for noise in (float(x) for x in args.noises.split(",")):
                    for seed in (int(s) for s in args.seeds.split(",")) if noise else (0,):
                        at = lambda x: make_trace(x * unit, args.requests, draw, seed=seed + 10, bursty=bursty)  # noqa: E731
                        caps = [slo_capacity(at, c, limits, cost, slo, args.steps, refine=True, noise=noise, seed=seed)
                                for c in (fifo, *dps.values())]
                        print(f"{dist + (' bursts' if bursty else ' poisson'):34} {slo:4.1f} {noise:5.2f} {seed:4d} "
                              f"{caps[0]:6.3f} " + " ".join(f"{c:8.3f}" for c in caps[1:]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
