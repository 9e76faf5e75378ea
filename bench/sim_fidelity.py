"""Does the simulator predict each live run? A finished bench/live_capacity.py folder, every run simulated again on
its own trace at the speed the machine ran during it, against what the live run measured.

    .venv/bin/python bench/sim_fidelity.py bench/results/s24/live_capacity [more folders]

The VM's speed moves by 10-40% between runs of one bisection, and near an SLO capacity p99 is a cliff, so a
capacity measured live mixes the policy with the spell it ran in. Here each run is compared with its own
simulation instead, two ways:

- `calibration`: the host fit of the run's calibration (bench/host_load.fit_host: speed from the quiet batches,
  per-arrival and per-answer terms, one scatter sigma), the run's speed by run_speed;
- `runs`: bench/host_load.fit_runs over every run of the folder (each run's speed, a fixed cost a forward, the
  per-arrival and per-answer terms, a scatter that falls with the batch's length). Fitted on batch times only,
  never on latencies: the p99s it predicts are still predictions;
- `spells`: the same, and the machine's speed as it moved during the run: the median of observed / fitted over
  the batches that started in each window of --window seconds (a VM's slow spells last seconds, and one in the
  middle of a run near capacity decides its p99). A diagnostic: it replays the run's speed, not only its mean.
- `synthetic` (with --spells SIGMA:TAU,...): the runs fit, its scatter's floor partly moved into spells of that
  kind (bench/spell_fit.py fits them; the simulator's Spells draws a path per noise seed): the speed moving as it
  does live, but not the run's own moves.

Per run: live p99 and the simulated p99 (median over bench/slo_capacity.NOISE_SEEDS), and whether both pass (p99
within the SLO and keeping up). Then per policy the live capacity on a common speed: each run's load times its
speed over the folder's median speed (a run at load x on a machine 10% slow offers what load 1.1x does at the
median speed), the highest such load that passed and the lowest that failed, beside the simulated capacity at
the median speed. Simulation only: nothing is served.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
from dataclasses import replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench.host_load import calibration_fit, fit_runs, host_seconds, live_batches, run_speed  # noqa: E402
from bench.live_server import ARRIVAL_SEED, file_label, sim_capacity, sim_config, simulation_limits  # noqa: E402
from bench.simulate import spells as spells_option  # noqa: E402
from bench.slo_capacity import NOISE_SEEDS, holds_slo, offered_rate  # noqa: E402
from bench.workload import count_tokens, make_texts  # noqa: E402
from scheduler.cost_model import CostModel  # noqa: E402
from scheduler.simulator import Spells, Trace, bursty_arrivals, poisson_arrivals, simulate  # noqa: E402


def command_option(command: str, name: str, default: str) -> str:
    words = command.split()
    return words[words.index(name) + 1] if name in words[:-1] else default


def load_folder(folder: Path) -> dict:
    """A live_capacity folder's report, trace maker, lengths, profile and each run's answers and batches."""
    report = json.loads((folder / "live_capacity.json").read_text())
    arrivals_at = bursty_arrivals if command_option(report["command"], "--arrivals", "bursts") == "bursts" else poisson_arrivals
    count = int(command_option(report["command"], "--requests", "1280"))
    if "lengths" in report:
        lengths = report["lengths"]
    else:  # a folder from before session 26: its trace was always make_texts' uniform lengths
        lengths = count_tokens(make_texts(count, 8, 256, seed=11))
    profile, calibration = calibration_fit(folder)
    runs = []
    for i, run in enumerate(report["runs"], 1):
        answers = json.loads((folder / f"answers-{file_label(run['policy'])}-{i}.json").read_text())
        runs.append(run | {"answers": answers, "batches": live_batches(answers, lengths)})
    planner = CostModel.from_json(report["start_model"]) if "start_model" in report else profile.scaled(calibration.speed)
    seed = int(command_option(report["command"], "--arrival-seed", str(ARRIVAL_SEED)))
    return {"report": report, "arrivals_at": arrivals_at, "arrival_seed": seed, "lengths": lengths, "profile": profile,
            "calibration": calibration, "runs": runs, "planner": planner, "unit": report["sim_capacity"]["unit_rps"]}


def simulated_p99(trace: Trace, policy: str, device: CostModel, planner: CostModel, host, noise, slo: float,
                  speed_at=None) -> tuple[float, int]:
    """The median p99 over the noise seeds, and in how many of them the run passes."""
    limits = simulation_limits()
    offered = offered_rate(trace.arrivals, trace.request_count)
    results = [simulate(trace, sim_config(policy), limits, device, slo, planner, host, refine=True, noise=noise, seed=s,
                        speed_at=speed_at) for s in NOISE_SEEDS]
    return statistics.median(r.p99 for r in results), sum(holds_slo(r.p99, r.throughput, offered, slo) for r in results)


def spells(batches: list, profile: CostModel, speed: float, host, window: float):
    """The run's speed over time relative to its mean: per window of `window` seconds (the replay's clock, which
    is the trace's), the median observed / fitted of the batches that started in it (1 where fewer than 5 did)."""
    ratios: dict[int, list[float]] = {}
    for b in batches:
        fitted = speed * profile.predict_lengths(b.lengths) + host_seconds(b, host)
        ratios.setdefault(int(b.start // window), []).append((b.end - b.start) / fitted)
    factor = {k: statistics.median(v) for k, v in ratios.items() if len(v) >= 5}
    return (lambda t: factor.get(int(t // window), 1.0)), [math.log(f) for f in factor.values()]


def fidelity(folder: Path, window: float = 3.0, synthetic: Spells | None = None) -> dict:
    d = load_folder(folder)
    slo, runs, profile = d["report"]["slo_s"], d["runs"], d["profile"]
    pooled = fit_runs([r["batches"] for r in runs], profile)
    cal = d["calibration"]
    print(f"\n{folder}: {len(runs)} runs, SLO {slo * 1000:.0f} ms")
    print(f"  calibration fit: speed {cal.speed:.3f}, {cal.host.per_arrival * 1e3:.2f} ms an arrival, "
          f"{cal.host.per_completion * 1e3:.2f} ms an answer, sigma {cal.scatter:.3f}")
    speeds = [v for v in pooled.speeds if not math.isnan(v)]
    print(f"  runs fit ({pooled.batches} batches, median error {pooled.median_error:.1%}): speeds "
          f"{min(speeds):.3f}-{max(speeds):.3f}, {pooled.host.per_forward * 1e3:.2f} ms a forward, "
          f"{pooled.host.per_arrival * 1e3:.2f} ms an arrival, {pooled.host.per_completion * 1e3:.2f} ms an answer, "
          f"sigma floor {pooled.scatter.floor:.3f} jitter {pooled.scatter.jitter:.4f} "
          f"(10 ms: {pooled.scatter.sigma(0.01):.3f}, 300 ms: {pooled.scatter.sigma(0.3):.3f})")
    moves = {i: spells(run["batches"], profile, speed, pooled.host, window)
             for i, (run, speed) in enumerate(zip(runs, pooled.speeds)) if not math.isnan(speed)}
    spread = [x for _, logs in moves.values() for x in logs]
    between = (1.4826 * statistics.median(abs(x - statistics.median(spread)) for x in spread)) if spread else 0.0
    within = pooled.scatter.less_floor(between ** 2)
    print(f"  spells: windows' speeds scatter by sigma {between:.3f}; the batches' floor within a window "
          f"{within.floor:.3f} (of {pooled.scatter.floor:.3f})")
    columns = ["calibration", "runs", "spells"] + (["synthetic"] if synthetic else [])
    print(f"  {'policy':13} {'load':>6} {'speed':>6} {'live p99':>8}    | " + " | ".join(f"{c + ' sim':>17}" for c in columns))
    rows = []
    for i, (run, speed) in enumerate(zip(runs, pooled.speeds)):
        policy, load = run["policy"], run["load"]
        if math.isnan(speed):
            print(f"  {policy:13} {load:6.3f}: no batch answered, not simulated")
            continue
        trace = Trace(d["arrivals_at"](load * d["unit"], len(d["lengths"]), random.Random(d["arrival_seed"])), d["lengths"])
        planning = run["live"].get("plan_seconds_a_batch", 0.0)
        old_speed = run_speed(run["batches"], profile, cal.host)
        old = simulated_p99(trace, policy, profile.scaled(old_speed), d["planner"], replace(cal.host, per_batch=planning),
                            cal.scatter, slo)
        host = replace(pooled.host, per_batch=planning)
        new = simulated_p99(trace, policy, profile.scaled(speed), d["planner"], host, pooled.scatter, slo)
        moved = simulated_p99(trace, policy, profile.scaled(speed), d["planner"], host, within, slo,
                              moves[i][0])
        sims = [old, new, moved]
        if synthetic:
            sims.append(simulated_p99(trace, policy, profile.scaled(speed), d["planner"], host,
                                      pooled.scatter.with_spells(synthetic), slo))
        live_p99, passed = run["live"]["p99"], run["passed"]
        row = {"policy": policy, "load": load, "speed": speed, "live_p99": live_p99, "passed": passed,
               **{c: {"p99": p99, "passes": n} for c, (p99, n) in zip(columns, sims)}}
        rows.append(row)
        print(f"  {policy:13} {load:6.3f} {speed:6.3f} {live_p99:8.3f} {'P' if passed else 'f'}  | " + " | ".join(
            f"{p99:8.3f} {n}/{len(NOISE_SEEDS)} {'ok' if (n * 2 > len(NOISE_SEEDS)) == passed else '--'}  "
            for p99, n in sims))
    summary = {}
    for key in columns:
        agree = sum((r[key]["passes"] * 2 > len(NOISE_SEEDS)) == r["passed"] for r in rows)
        ratios = [r[key]["p99"] / r["live_p99"] for r in rows]
        close = sum(abs(x - 1) <= 0.15 for x in ratios)
        summary[key] = {"agree": agree, "runs": len(rows), "p99_within_15pct": close,
                        "median_p99_ratio": statistics.median(ratios),
                        "median_abs_p99_error": statistics.median(abs(x - 1) for x in ratios)}
        print(f"  {key:11}: pass/fail agrees on {agree} of {len(rows)} runs; simulated p99 within 15% of live on {close}; "
              f"median sim/live p99 {statistics.median(ratios):.3f}, median |error| {summary[key]['median_abs_p99_error']:.1%}")
    capacities = common_speed_capacities(d, rows, pooled, slo)
    return {"folder": str(folder), "rows": rows, "summary": summary, "capacities": capacities,
            "runs_fit": {"speeds": pooled.speeds, "per_forward_s": pooled.host.per_forward,
                         "per_arrival_s": pooled.host.per_arrival, "per_completion_s": pooled.host.per_completion,
                         "scatter_floor": pooled.scatter.floor, "scatter_jitter": pooled.scatter.jitter,
                         "median_error": pooled.median_error}}


def common_speed_capacities(d: dict, rows: list[dict], pooled, slo: float) -> dict:
    """Per policy the live capacity bracket at the folder's median speed and the runs fit's simulated capacity
    there (median over the noise seeds, planning charged as the runs measured it)."""
    ref = statistics.median(r["speed"] for r in rows)
    device = d["profile"].scaled(ref)
    print(f"  live capacity at the median speed {ref:.3f} (each run's load x its speed / {ref:.3f}) and simulated there:")
    out = {}
    for policy in dict.fromkeys(r["policy"] for r in rows):
        mine = [r for r in rows if r["policy"] == policy]
        passed = [r["load"] * r["speed"] / ref for r in mine if r["passed"]]
        failed = [r["load"] * r["speed"] / ref for r in mine if not r["passed"]]
        lo, hi = max(passed, default=0.0), min(failed, default=float("inf"))
        planning = statistics.median(r_live["live"].get("plan_seconds_a_batch", 0.0)
                                     for r_live in d["runs"] if r_live["policy"] == policy)
        sim = sim_capacity(policy, d["lengths"], d["arrivals_at"], d["unit"], simulation_limits(), slo, d["planner"], device,
                           replace(pooled.host, per_batch=planning), pooled.scatter, d["arrival_seed"])
        live = float("nan") if not passed else (lo if not failed else (lo + hi) / 2)  # the bracket's middle
        out[policy] = {"passed_up_to": lo, "failed_from": hi, "consistent": lo < hi, "simulated": sim,
                       "live_over_sim": live / sim if sim else float("nan")}
        print(f"    {policy:13} live passed up to {lo:.3f}{' (none passed)' if not passed else ''}, failed from {hi:.3f}"
              f"{'' if lo < hi else ' (overlap)'}; "
              f"simulated {sim:.3f}; live midpoint / sim {out[policy]['live_over_sim']:.2f}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", help="bench/live_capacity.py --calibrate output folders")
    ap.add_argument("--out", default="", help="write the results as JSON here")
    ap.add_argument("--window", type=float, default=3.0, help="seconds a window of the `spells` replay")
    ap.add_argument("--spells", type=spells_option, default="", metavar="SIGMA:TAU[,SIGMA:TAU]",
                    help="add the `synthetic` column: spells of this kind (bench/spell_fit.py)")
    args = ap.parse_args()
    results = [fidelity(Path(f), args.window, args.spells or None) for f in args.folders]
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
