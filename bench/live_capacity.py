"""The issue's own measure, live: the highest offered load at which the real server keeps p99 within the SLO,
found per policy by bisection on the live server, beside the simulator's SLO capacity on the same trace.

    .venv/bin/python bench/live_capacity.py --arrivals bursts --slo-ms 1000 --requests 1280 --calibrate 400 \\
        --policies dp,fifo --steps 5 --out /tmp/live_capacity

bench/live_policies.py --at-sim-capacity runs every policy at the loads the simulator names; this script asks
the live server the simulator's question itself. The trace at load x is the one the simulator bisects over
(seeded arrivals at x times the cost model's full-batch capacity, texts of 8-256 tokens from bench/workload.py, or with
--texts english the corpus's paragraphs as written, mostly short).
Each policy is bisected over [sim x (1 - span), sim x (1 + span)] around its own simulated capacity (or over
--bracket LO,HI, the same for all), the policies' steps interleaved so that a slow spell of the machine falls on all of them. A load passes when every
request is answered, p99 is within the SLO and the server keeps up (throughput >= 0.97 x offered, as the
simulator's criterion). A capacity at either end of the bracket is reported as such (the ends are not run).
With --calibrate the simulation scatters batch times as the calibration's scattered (bench/live_server.sim_capacities),
and after the live runs bench/sim_fidelity.py reads the folder: one host fit over all the runs' batches (each run's
speed: this VM's moves by 10-40% between runs, and a calibration of 13 s catches one spell), every run simulated
at its own speed against its live p99, and per policy the live capacity at the runs' median speed beside the
simulated one there (`sim@runs`), each policy's planning time a batch as its runs measured it (the device idles
meanwhile: dp 1.1-2.6 ms a batch here, the baselines 0.04-0.08). Loopback only; every run is bounded by the trace
and --timeout.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench import live_server as shared  # noqa: E402
from bench.harness import machine_info  # noqa: E402
from bench.samples import CLIENTS  # noqa: E402
from bench.sim_fidelity import fidelity  # noqa: E402
from bench.slo_capacity import NOISE_SEEDS, holds_slo, offered_rate  # noqa: E402
from bench.workload import count_tokens, make_texts, paragraph_texts  # noqa: E402
from scheduler.simulator import Trace, bursty_arrivals, poisson_arrivals, simulate  # noqa: E402


def passes(live: dict, offered_rps: float, slo: float) -> bool:
    """The simulator's SLO-capacity criterion on a live run (bench/slo_capacity.holds_slo), and no failed request."""
    return live["errors"] == 0 and holds_slo(live["p99"], live["throughput"], offered_rps, slo)


def bisect_live(policies: list[str], brackets: dict[str, tuple[float, float]], steps: int, run) -> dict[str, dict]:
    """Per policy, bisection of the load over its bracket (lo, hi); run(policy, load) -> passed. The policies' steps
    are interleaved. Returns per policy the capacity found (the highest load that passed; the bracket's low end if
    none did, flagged) and the bracket."""
    state = {p: {"lo": brackets[p][0], "hi": brackets[p][1], "passed_any": False, "failed_any": False} for p in policies}
    for _ in range(steps):
        for policy in policies:
            s = state[policy]
            mid = (s["lo"] + s["hi"]) / 2
            if run(policy, mid):
                s["lo"], s["passed_any"] = mid, True
            else:
                s["hi"], s["failed_any"] = mid, True
    return {p: {"capacity": s["lo"], "below_bracket": not s["passed_any"], "above_bracket": not s["failed_any"],
                "bracket": list(brackets[p])} for p, s in state.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1280)
    ap.add_argument("--slo-ms", type=float, default=1000.0)
    ap.add_argument("--arrivals", choices=("poisson", "bursts"), default="bursts")
    ap.add_argument("--texts", choices=("uniform", "english"), default="uniform",
                    help="uniform: 8-256 tokens, uniformly spread; english: the corpus's paragraphs as written (mostly short)")
    ap.add_argument("--text-seed", type=int, default=11,
                    help="which texts, in which order (the arrival times are --arrival-seed's): another trace")
    ap.add_argument("--arrival-seed", type=int, default=shared.ARRIVAL_SEED,
                    help="the arrival times' seed (the same at every load, scaled): another trace")
    ap.add_argument("--policies", default="dp,fifo", help="as bench/live_policies.py's (dp:deadline_margin=0: a knob's A/B)")
    ap.add_argument("--steps", type=int, default=5, help="bisection steps a policy (one live run each)")
    ap.add_argument("--span", type=float, default=0.5, help="bracket: the simulated capacity x (1 -/+ span)")
    ap.add_argument("--bracket", default="", metavar="LO,HI",
                    help="bisect every policy over these loads instead (where the simulated capacities are unreliable: "
                         "on a bursty trace one cluster of bursts decides them, and the host fit moves them 2-3x)")
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--out", default="bench/out/live_capacity")
    ap.add_argument("--client", choices=CLIENTS, default="raw")
    ap.add_argument("--calibrate", type=int, default=400, metavar="N",
                    help="refine the cost model with N live requests first (bench/live_server.calibrate); 0: none")
    ap.add_argument("--device-only", action="store_true", help="simulate the device alone (no fitted host term)")
    ap.add_argument("--no-scatter", action="store_true",
                    help="simulate batches at the fitted times exactly (default: scattered as the calibration's were)")
    ap.add_argument("--fresh-profile", action="store_true", help="measure a new cost model first")
    args = ap.parse_args()
    policies = args.policies.split(",")
    try:
        [shared.policy_spec(p) for p in policies]
    except ValueError as exc:
        ap.error(f"--policies: {exc}")
    if "fifo" not in policies or len(set(policies)) < len(policies):
        ap.error("--policies: each once, fifo among them (the ratios' base)")
    if not 0 < args.span < 1 or args.steps < 1:
        ap.error("--span must be in (0, 1) and --steps at least 1")
    bracket = None  # the same for every policy, else around each one's simulated capacity
    if args.bracket:
        try:
            bracket = tuple(float(x) for x in args.bracket.split(","))
        except ValueError:
            ap.error(f"--bracket: two loads LO,HI, got {args.bracket!r}")
        if len(bracket) != 2 or not 0 < bracket[0] < bracket[1]:
            ap.error(f"--bracket: 0 < LO < HI, got {args.bracket!r}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slo = args.slo_ms / 1000
    texts = (make_texts(args.requests, 8, 256, seed=args.text_seed) if args.texts == "uniform"
             else paragraph_texts(args.requests, seed=args.text_seed))
    lengths = count_tokens(texts)
    limits = shared.simulation_limits()
    arrivals_at = bursty_arrivals if args.arrivals == "bursts" else poisson_arrivals
    report = {"machine": machine_info(), "command": " ".join(sys.argv), "slo_s": slo, "lengths": lengths, "runs": []}
    models = shared.prepare_models(args, out, texts, lengths, limits, arrivals_at, report)
    device = models.device or models.start
    shared.sim_capacities(lengths, arrivals_at, limits, slo, report, models.start, device, models.host, tuple(policies),
                          models.scatter, args.arrival_seed)
    unit = report["sim_capacity"]["unit_rps"]
    report["start_model"] = models.start.to_json()  # what every server plans with first (bench/sim_fidelity.py)

    def run(policy: str, load: float) -> bool:
        arrivals = arrivals_at(load * unit, len(texts), random.Random(args.arrival_seed))
        offered = offered_rate(arrivals, len(arrivals))
        results, live, _, _ = shared.serve_trace(policy, models, arrivals, texts, args)
        sim = simulate(Trace(arrivals, lengths), shared.sim_config(policy), limits, device, slo, models.start, models.host,
                       refine=models.scatter > 0, noise=models.scatter, seed=NOISE_SEEDS[0]).row()
        ok = passes(live, offered, slo)
        report["runs"].append({"policy": policy, "load": load, "offered_rps": offered, "passed": ok, "live": live,
                               "sim": sim})
        (out / f"answers-{shared.file_label(policy)}-{len(report['runs'])}.json").write_text(json.dumps(results))
        err = live["cost_model_error"].get("median_abs", float("nan"))
        print(f"{policy:12} load {load:.4f} ({offered:6.2f}/s): {'PASS' if ok else 'fail'} p99 {live['p99']:6.3f}s "
              f"in time {live['slo_attainment']:6.1%} thr {live['throughput']:6.2f}/s good {live['goodput']:6.2f}/s "
              f"errors {live['errors']} batch {live['mean_batch']:5.1f} cost-err {err:.1%} plan {live['plan_share']:.1%} | sim: p99 {sim['p99']:6.3f}s "
              f"in time {sim['slo_attainment']:6.1%} good {sim['goodput']:6.2f}/s", flush=True)
        return ok

    sim_loads = report["sim_capacity"]["loads"]
    brackets = {p: bracket or (sim_loads[p] * (1 - args.span), sim_loads[p] * (1 + args.span)) for p in policies}
    found = bisect_live(policies, brackets, args.steps, run)
    report["live_capacity"] = found
    (out / "live_capacity.json").write_text(json.dumps(report, indent=1))
    at_runs = None  # the simulated capacities at the runs' median speed, and the live ones there
    if models.profiled is not None and not args.device_only:
        try:
            report["fidelity"] = fidelity(out)
            at_runs = report["fidelity"]["capacities"]
        except ValueError as exc:  # too few batches answered to fit the host over the runs
            print(f"no per-run simulation: {exc}")
    print(f"\nSLO capacity (p99 <= {args.slo_ms:.0f} ms), load and requests/s; {args.arrivals}, {args.requests} requests:")
    print(f"{'policy':12} {'sim load':>8} {'sim req/s':>9} {'live load':>9} {'live req/s':>10} {'live/sim':>8} "
          f"{'sim / fifo':>10} {'live / fifo':>11}" + (f" {'sim@runs':>8} {'live/sim@runs':>13}" if at_runs else ""))
    for p in policies:
        live_load, flag = found[p]["capacity"], " (below bracket)" if found[p]["below_bracket"] else (
            " (at bracket top)" if found[p]["above_bracket"] else "")
        print(f"{p:12} {sim_loads[p]:8.4f} {sim_loads[p] * unit:9.2f} {live_load:9.4f} {live_load * unit:10.2f} "
              f"{live_load / max(sim_loads[p], 1e-9):8.2f} {sim_loads[p] / max(sim_loads['fifo'], 1e-9):10.2f} "
              f"{live_load / max(found['fifo']['capacity'], 1e-9):11.2f}"
              + (f" {at_runs[p]['simulated']:8.4f} {at_runs[p]['live_over_sim']:13.2f}" if at_runs else "") + flag)
    if at_runs:
        print("(sim@runs: simulated at the runs' median speed; live/sim@runs: the middle of the live bracket there, "
              "bench/sim_fidelity.py)")
    (out / "live_capacity.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out / 'live_capacity.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
