"""Live proof of the scheduler: the real server with each policy over the same recorded trace, beside
the simulator's prediction for that trace with the server's own cost model.

    .venv/bin/python bench/live_policies.py --loads 0.9,1.1 --requests 300 --slo-ms 2000
    .venv/bin/python bench/live_policies.py --at-sim-capacity --arrivals bursts --slo-ms 2000

The trace (Poisson arrivals, or Poisson bursts of 16, at load x capacity; texts of 8-256 tokens from
bench/workload.py) is written to --out/trace-<load>.json and replayed open-loop: request i is sent at its
arrival time whatever happened to the earlier ones. Each policy gets a fresh server (the cost model is
measured once and loaded by the others). Loopback only; every run is bounded by the trace and --timeout.

--at-sim-capacity replaces --loads by the issue's own measure: the simulator's SLO capacity of fifo and of
dp on this very trace (the highest load each keeps p99 within the SLO, by bisection with the server's cost
model), so the live runs check whether dp holds the SLO at its capacity where fifo does not.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench.harness import machine_info  # noqa: E402
from bench.host_load import simulate_at_run_speed  # noqa: E402
from bench.live_server import (  # noqa: E402
    ARRIVAL_SEED,
    POLICIES,
    file_label,
    full_batch_capacity,
    policy_spec,
    prepare_models,
    serve_trace,
    sim_capacities,
    sim_config,
    simulation_limits,
)
from bench.samples import CLIENTS  # noqa: E402
from bench.slo_capacity import NOISE_SEEDS  # noqa: E402
from bench.workload import count_tokens, make_texts  # noqa: E402
from scheduler.simulator import Trace, bursty_arrivals, poisson_arrivals, simulate  # noqa: E402


def print_medians(runs: list[dict]) -> None:
    """Median over repeats of each (load, policy): live and simulated goodput, SLO attainment, p99; the
    simulation with the device alone beside it."""
    import statistics  # noqa: PLC0415

    print("\nmedians over repeats:")
    print(f"{'load':>5} {'policy':12} {'runs':>4} {'live good/s':>11} {'sim good/s':>10} {'live slo':>8} {'sim slo':>8} "
          f"{'live p99':>8} {'sim p99':>8} {'cost err':>8} {'live/sim good':>13} {'device-only good/s':>18} "
          f"{'device-only slo':>15} {'sim@run good/s':>14} {'learning good/s':>15}")
    for load in sorted({r["load"] for r in runs}):
        for policy in dict.fromkeys(r["live"]["policy"] for r in runs):
            mine = [r for r in runs if r["load"] == load and r["live"]["policy"] == policy]
            med = lambda f: statistics.median(f(r) for r in mine)  # noqa: E731
            print(f"{load:5.2f} {policy:12} {len(mine):4d} {med(lambda r: r['live']['goodput']):11.2f} "
                  f"{med(lambda r: r['sim']['goodput']):10.2f} {med(lambda r: r['live']['slo_attainment']):8.1%} "
                  f"{med(lambda r: r['sim']['slo_attainment']):8.1%} {med(lambda r: r['live']['p99']):8.2f} "
                  f"{med(lambda r: r['sim']['p99']):8.2f} "
                  f"{med(lambda r: r['live']['cost_model_error'].get('median_abs', float('nan'))):8.1%} "
                  f"{med(lambda r: r['live']['goodput'] / max(r['sim']['goodput'], 1e-9)):13.2f} "
                  f"{med(lambda r: r['sim_device']['goodput']):18.2f} "
                  f"{med(lambda r: r['sim_device']['slo_attainment']):15.1%} "
                  f"{med(lambda r: r['sim_run']['goodput'] if 'sim_run' in r else float('nan')):14.2f} "
                  f"{med(lambda r: r['sim_learn']['goodput'] if 'sim_learn' in r else float('nan')):15.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loads", default="0.9,1.1")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--inputs", type=int, default=1,
                    help="texts per request (`inputs` as a list): a request is in time when its last sequence is")
    ap.add_argument("--slo-ms", type=float, default=2000.0)
    ap.add_argument("--policies", default=",".join(POLICIES),
                    help="comma-separated; a policy may carry scheduler settings of its own: dp:deadline_margin=0+max_wait_ms=2")
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--repeats", type=int, default=1, help="rounds over all policies, interleaved; medians reported")
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--arrivals", choices=("poisson", "bursts"), default="poisson")
    ap.add_argument("--rps", type=float, default=0.0,
                    help="offer this many requests/s (one load), whatever the cost model's capacity (to compare setups)")
    ap.add_argument("--client", choices=CLIENTS, default="raw",
                    help="the load generator's HTTP client: raw (bench/rawclient.py) or httpx (every run before session 19)")
    ap.add_argument("--calibrate", type=int, default=0, metavar="N",
                    help="before the runs, refine the cost model with N live requests (see bench/live_server.calibrate)")
    ap.add_argument("--device-only", action="store_true",
                    help="simulate the device alone (default with --calibrate: the device plus the host's request "
                         "handling as fitted on the calibration's batches, see bench/host_load.py)")
    ap.add_argument("--no-scatter", action="store_true",
                    help="simulate batches at the fitted times exactly (default with --calibrate: scattered as the "
                         "calibration's were, in --at-sim-capacity and the `learning` column)")
    ap.add_argument("--fresh-profile", action="store_true",
                    help="measure a new cost model (default: reuse the one of an earlier run in --out)")
    ap.add_argument("--arrival-seed", type=int, default=ARRIVAL_SEED,
                    help="seed of the arrival times (another trace; the calibration's are its own)")
    ap.add_argument("--at-sim-capacity", action="store_true",
                    help="loads: the simulated SLO capacities of fifo and dp on this trace (instead of --loads)")
    args = ap.parse_args()
    try:
        [policy_spec(p) for p in args.policies.split(",")]
    except ValueError as exc:
        ap.error(f"--policies: {exc}")
    if args.inputs < 1:
        ap.error(f"--inputs must be at least 1, got {args.inputs}")
    if args.inputs > 1 and (args.calibrate or args.at_sim_capacity):
        ap.error("--inputs above 1 is not supported with --calibrate or --at-sim-capacity")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slo = args.slo_ms / 1000
    k = args.inputs
    texts = make_texts(args.requests * k, 8, 256, seed=11)
    lengths = count_tokens(texts)  # per sequence
    bodies = texts if k == 1 else [texts[i:i + k] for i in range(0, len(texts), k)]

    def trace_of(arrivals: list[float]) -> Trace:
        """The simulator's trace of requests sent at `arrivals`: every sequence arrives with its request."""
        if k == 1:
            return Trace(arrivals, lengths)
        return Trace([a for a in arrivals for _ in range(k)], lengths, [i for i in range(len(arrivals)) for _ in range(k)])

    report = {"machine": machine_info(), "command": " ".join(sys.argv), "runs": []}
    limits = simulation_limits()
    report["slo_s"] = slo
    arrivals_at = bursty_arrivals if args.arrivals == "bursts" else poisson_arrivals
    models = prepare_models(args, out, texts, lengths, limits, arrivals_at, report)
    host, device, profiled = models.host, models.device, models.profiled
    loads = [float(ld) for ld in args.loads.split(",")] if not args.rps else [args.rps]
    if args.at_sim_capacity:
        loads = sim_capacities(lengths, arrivals_at, limits, slo, report, models.start, device or models.start, host,
                               scatter=models.scatter, arrival_seed=args.arrival_seed)
    plan_runs = [(ld, p) for ld in loads for _ in range(args.repeats) for p in args.policies.split(",")]
    traces: dict[float, tuple[float, list[float]]] = {}
    for load, policy in plan_runs:
        if load not in traces:  # one trace a load, replayed to every policy and round alike
            capacity = full_batch_capacity(lengths, limits, models.start) / k  # requests/s
            rate = args.rps if args.rps else load * capacity
            traces[load] = (capacity, arrivals_at(rate, len(bodies), random.Random(args.arrival_seed)))
            (out / f"trace-{load}.json").write_text(json.dumps({"arrivals": traces[load][1], "lengths": lengths,
                                                                "texts": texts, "inputs": k}))
        capacity, arrivals = traces[load]
        results, live, cost, end_cost = serve_trace(policy, models, arrivals, bodies, args)
        (out / f"answers-{load}-{file_label(policy)}-{len(report['runs'])}.json").write_text(json.dumps(results))
        sim = simulate(trace_of(arrivals), sim_config(policy), limits, device or cost, slo, cost, host).row()
        sim_device = simulate(trace_of(arrivals), sim_config(policy), limits, cost, slo).row()  # no host, as fitted
        # As `sim`, with the planner's model learning from every simulated batch as the server's does (EWMA knots,
        # and the overrun dp's shedding plans with) and batch times scattered as the calibration's were: the server
        # as it runs, where `sim` keeps its starting model and exact times.
        sim_learn = simulate(trace_of(arrivals), sim_config(policy), limits, device or cost, slo, cost, host,
                             refine=True, noise=models.scatter, seed=NOISE_SEEDS[0]).row()
        # The same trace with the model as this run left it: how much of a gap is the machine's speed
        # during the run (this VM drifts) rather than the policy.
        sim_end = simulate(trace_of(arrivals), sim_config(policy), limits, end_cost, slo).row()
        run = {"load": load, "offered_rps": args.rps or load * capacity, "live": live, "sim": sim,
               "sim_device": sim_device, "sim_learn": sim_learn, "sim_end": sim_end, "start_model": cost.to_json()}
        if device is not None:  # and at the speed the machine ran during this run (see bench/host_load.py)
            own = replace(host, per_batch=live["plan_seconds_a_batch"])  # this run's planning, a batch
            run["speed"], sim_run = simulate_at_run_speed(trace_of(arrivals), sim_config(policy), limits, results,
                                                          profiled, own, cost, slo)
            run["sim_run"] = sim_run.row()
        report["runs"].append(run)
        err = live["cost_model_error"]
        print(f"load {load:4.2f} {policy:12} live: thr {live['throughput']:6.2f}/s good {live['goodput']:6.2f}/s "
              f"p50 {live['p50']:6.3f}s p99 {live['p99']:6.3f}s slo {live['slo_attainment']:6.1%} "
              f"errors {live['errors']} batch {live['mean_batch']:5.1f} cost-err med {err.get('median_abs', float('nan')):.1%} "
              f"plan {live.get('plan_ms_mean', float('nan')):.2f} ms ({live.get('plan_share', float('nan')):.1%}) "
              f"overrun {live.get('overrun', float('nan')):.2f} | sim: good {sim['goodput']:6.2f}/s p50 {sim['p50']:6.3f}s p99 {sim['p99']:6.3f}s "
              f"slo {sim['slo_attainment']:6.1%} | learning: good {sim_learn['goodput']:6.2f}/s | device only: good {sim_device['goodput']:6.2f}/s "
              f"slo {sim_device['slo_attainment']:6.1%} | sim@end: good {sim_end['goodput']:6.2f}/s"
              + (f" | sim@run (speed {run['speed']:.2f}): good {run['sim_run']['goodput']:6.2f}/s" if "sim_run" in run else ""),
              flush=True)
    (out / "live_policies.json").write_text(json.dumps(report, indent=1))
    print_medians(report["runs"])
    print(f"wrote {out / 'live_policies.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
