"""The host's request handling as the simulator's HostLoad, measured from a live run's responses.

    .venv/bin/python bench/host_load.py bench/out/RUN     # re-simulate a finished live_policies.py --calibrate run

A live replay records, per request, when it was sent and answered (client clock) and the server's
x-inference-time (the batch's forward). Requests of one batch share that value, so the batches can be put
back together: a batch ends just before its first answer arrives and starts x-inference-time earlier. For
each batch, against the cost model's prediction p for its lengths:

    observed = speed * p + per_arrival * (requests the server took in while it ran)
                         + per_completion * (requests the batch just before it answered)

`speed` is the machine's against the model at the time (the VM drifts), measured on the batches that ran
with neither beside them; the other two are what request handling costs the batches on this host.

`run_speed` measures, with the host terms known, how fast the machine ran during one live run (one number:
the median over its batches). Simulating each run at its own speed (`sim@run` in bench/live_policies.py, and
this file's command line for a finished run folder) separates what the simulator gets wrong from how this
VM's speed changed between the calibration and the run.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from scheduler.cost_model import CostModel, nonnegative_fit
from scheduler.planner import Limits, PolicyConfig
from scheduler.simulator import HostLoad, Result, Scatter, Trace, simulate

BACK_TO_BACK_S = 0.01  # a batch that starts this soon after the one before runs while that one's answers go out


@dataclass(frozen=True)
class LiveBatch:
    start: float
    end: float
    lengths: list[int]
    arrivals: int  # requests the server took in while it ran
    after: int  # requests of the batch just before it, if that one ended right before it started


def live_batches(records: list[dict], lengths: list[int]) -> list[LiveBatch]:
    """Batches put back together from one replay's records (dicts with received, inference, total: seconds,
    and status; index i is request i of the trace). A request was taken in by the server x-total-time before
    its answer came back: a burst sent at once is taken in one by one, over the batch that runs meanwhile."""
    groups: dict[float, list[int]] = {}
    for i, r in enumerate(records):
        if r["status"] == 200 and r.get("inference"):
            groups.setdefault(r["inference"], []).append(i)
    spans = []
    for inference, members in groups.items():
        # Two batches that took the same time to the microsecond end at least that time apart.
        members.sort(key=lambda i: records[i]["received"])
        cut = [k for k in range(1, len(members))
               if records[members[k]]["received"] - records[members[k - 1]]["received"] >= inference]
        for part in (members[a:b] for a, b in zip([0, *cut], [*cut, len(members)])):
            end = records[part[0]]["received"]
            spans.append((end - inference, end, sorted(part)))
    spans.sort()
    taken_in = np.sort(np.array([r["received"] - r["total"] for r in records if r["status"] == 200]))
    out: list[LiveBatch] = []
    for k, (start, end, members) in enumerate(spans):
        arrived = int(np.searchsorted(taken_in, end) - np.searchsorted(taken_in, start))
        before = spans[k - 1] if k else None
        after = len(before[2]) if before is not None and 0 <= start - before[1] <= BACK_TO_BACK_S else 0
        out.append(LiveBatch(start, end, [lengths[i] for i in members], arrived, after))
    return out


@dataclass(frozen=True)
class HostFit:
    host: HostLoad
    speed: float  # observed / predicted for a batch with no host work beside it (median)
    batches: int
    median_error_before: float  # |predicted - observed| / observed, the cost model alone
    median_error_after: float  # the same with the fitted speed and host terms
    # How far single batches scatter about the fit: the robust standard deviation (1.4826 x the median absolute
    # deviation) of log(observed / fitted). The simulator's `noise` (a log-normal factor on each batch's time).
    scatter: float = 0.0


def fit_host(batches: list[LiveBatch], cost: CostModel, min_quiet: int = 5) -> HostFit:
    """The machine's speed against `cost` (the profile, taken on an idle machine), from the batches that ran
    with no host work beside them (no arrival, no answers of a batch before); then the two host terms,
    least squares (absolute seconds, >= 0) on what every batch took beyond that. Not in one fit: the requests
    that arrive during a batch grow with its length, so a joint fit can trade the speed for the host terms."""
    if len(batches) < 8:
        raise ValueError(f"{len(batches)} batches are too few to fit the host's load")
    predicted = np.array([cost.predict_lengths(b.lengths) for b in batches])
    observed = np.array([b.end - b.start for b in batches])
    quiet = np.array([b.arrivals == 0 and b.after == 0 for b in batches])
    if quiet.sum() < min_quiet:
        raise ValueError(f"{int(quiet.sum())} of {len(batches)} batches ran with no host work beside them: too few "
                         "to measure the machine's speed")
    speed = float(np.median(observed[quiet] / predicted[quiet]))
    x = np.column_stack([[b.arrivals for b in batches], [b.after for b in batches]]).astype(np.float64)
    coef = nonnegative_fit(x, observed - speed * predicted, relative=False) if x.any() else np.zeros(2)
    fitted = speed * predicted + x @ coef
    log_ratio = np.log(observed / fitted)
    return HostFit(HostLoad(float(coef[0]), float(coef[1])), speed, len(batches),
                   float(np.median(np.abs(predicted - observed) / observed)),
                   float(np.median(np.abs(fitted - observed) / observed)),
                   float(1.4826 * np.median(np.abs(log_ratio - np.median(log_ratio)))))


@dataclass(frozen=True)
class RunsFit:
    host: HostLoad  # per_forward, per_arrival, per_completion (per_batch: 0, the policy's own)
    speeds: list[float]  # each run's against the profile (nan for a run with no batch)
    scatter: Scatter
    batches: int
    median_error: float  # |fitted - observed| / observed


def _host_terms(batches: list[LiveBatch]) -> np.ndarray:
    return np.array([[1.0, b.arrivals, b.after] for b in batches])


def _scatter(fitted: np.ndarray, observed: np.ndarray, bins: int = 12) -> Scatter:
    """Scatter's floor and jitter from the robust variance of log(observed / fitted) in bins of the fitted time
    (equal counts), least squares (>= 0, weighted by count) of variance on 1 / time."""
    order = np.argsort(fitted)
    parts = [part for part in np.array_split(order, bins) if len(part) >= 10]
    if len(parts) < 2:
        lr = np.log(observed / fitted)
        return Scatter(float(1.4826 * np.median(np.abs(lr - np.median(lr)))))
    var, inv_t, weight = [], [], []
    for part in parts:
        lr = np.log(observed[part] / fitted[part])
        var.append((1.4826 * np.median(np.abs(lr - np.median(lr)))) ** 2)
        inv_t.append(float(np.mean(1.0 / fitted[part])))
        weight.append(np.sqrt(len(part)))
    w = np.array(weight)
    coef = nonnegative_fit(np.column_stack([np.ones(len(var)), inv_t]) * w[:, None], np.array(var) * w, relative=False)
    return Scatter(float(np.sqrt(coef[0])), float(np.sqrt(coef[1])))


def fit_runs(runs: list[list[LiveBatch]], cost: CostModel, rounds: int = 40) -> RunsFit:
    """One host fit over many live runs' batches: each run its own speed (the VM's speed moves between runs),
    the host terms shared, and how batches scatter about the fit as a function of their length.

        observed = speed[run] * p + per_forward + per_arrival * arrivals + per_completion * after

    One regression, least absolute relative deviations (every batch counts alike; iteratively reweighted),
    coefficients >= 0. Runs at several loads span batches of a few to hundreds of milliseconds, which separates a
    batch's fixed cost from the speed (one calibration at one load does not: session 25 fitted 2.3 to 11.9 ms on
    calibrations alone)."""
    given, runs = runs, [r for r in runs if r]
    if sum(len(r) for r in runs) < 8:
        raise ValueError("too few batches to fit the host's load")
    pred = np.concatenate([[cost.predict_lengths(b.lengths) for b in r] for r in runs])
    y = np.concatenate([[b.end - b.start for b in r] for r in runs])
    run_of = np.concatenate([np.full(len(r), k) for k, r in enumerate(runs)])
    x = np.column_stack([np.where(run_of == k, pred, 0.0) for k in range(len(runs))]
                        + [np.concatenate([_host_terms(r) for r in runs])])
    coef = np.zeros(x.shape[1])
    w = 1.0 / y
    for _ in range(rounds):
        coef = nonnegative_fit(x * w[:, None], y * w, relative=False)
        w = 1.0 / np.sqrt(np.maximum(np.abs(y - x @ coef), 1e-4 * y) * y)
    fitted = x @ coef
    fitted_speeds = iter(coef[:len(runs)])
    speeds = [float(next(fitted_speeds)) if r else math.nan for r in given]
    per_forward, per_arrival, per_completion = coef[len(runs):]
    return RunsFit(HostLoad(float(per_arrival), float(per_completion), per_forward=float(per_forward)), speeds,
                   _scatter(fitted, y), len(y), float(np.median(np.abs(fitted - y) / y)))


def host_seconds(batch: LiveBatch, host: HostLoad) -> float:
    """What `host` adds to this batch's time beyond the device's: the forward's fixed cost, its arrivals, the
    answers of the batch before."""
    return host.per_forward + host.per_arrival * batch.arrivals + host.per_completion * batch.after


def run_speed(batches: list[LiveBatch], cost: CostModel, host: HostLoad) -> float:
    """How fast the machine ran against `cost` during these batches, the host's work taken out: the median of
    (observed - host terms) / predicted."""
    if not batches:
        raise ValueError("no batches to measure the machine's speed on")
    return float(np.median([((b.end - b.start) - host_seconds(b, host)) / cost.predict_lengths(b.lengths)
                            for b in batches]))


def simulate_at_run_speed(trace: Trace, config: PolicyConfig, limits: Limits, answers: list[dict], profile: CostModel,
                          host: HostLoad, planner: CostModel, slo: float) -> tuple[float, Result]:
    """One live run (its trace and answers) simulated again at the speed the machine ran during it: the profile
    at `run_speed`, plus `host`; the planner sees `planner` (the model the run's server started with)."""
    speed = run_speed(live_batches(answers, trace.lengths), profile, host)
    return speed, simulate(trace, config, limits, profile.scaled(speed), slo, planner, host)


def calibration_fit(folder: Path) -> tuple[CostModel, HostFit]:
    """A finished `--calibrate` run folder's calibration: the model its server started from (the profile) and the
    host fit on its batches."""
    calibration = json.loads((folder / "calibration.json").read_text())
    profile = CostModel.from_json(calibration["start_model"])
    return profile, fit_host(live_batches(calibration["results"], calibration["lengths"]), profile)


def resimulate(folder: Path) -> list[dict]:
    """Every run of a finished `bench/live_policies.py --calibrate` folder through `simulate_at_run_speed`, with
    the calibration's profile and host terms. One dict a run: load, policy, speed, live and sim@run goodput and
    attainment."""
    from bench.live_server import file_label, sim_config, simulation_limits  # noqa: PLC0415 (the bench imports this module)

    report = json.loads((folder / "live_policies.json").read_text())
    profile, fit = calibration_fit(folder)
    host = fit.host
    out = []
    for i, run in enumerate(report["runs"]):
        policy, load = run["live"]["policy"], run["load"]
        trace = json.loads((folder / f"trace-{load}.json").read_text())
        answers = json.loads((folder / f"answers-{load}-{file_label(policy)}-{i}.json").read_text())
        live = run["live"]  # its planning a batch (folders from before session 23 have none: 0)
        planning = live.get("plan_seconds", 0.0) / max(live.get("batches", 0.0), 1.0)
        speed, sim = simulate_at_run_speed(Trace(trace["arrivals"], trace["lengths"]), sim_config(policy),
                                           simulation_limits(), answers, profile, replace(host, per_batch=planning),
                                           CostModel.from_json(run["start_model"]), report["slo_s"])
        out.append({"load": load, "policy": policy, "speed": speed, "live_goodput": run["live"]["goodput"],
                    "sim_run_goodput": sim.goodput, "live_slo": run["live"]["slo_attainment"],
                    "sim_run_slo": sim.slo_attainment, "sim_goodput": run["sim"]["goodput"]})
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.split("\n\n")[1])
        return 2
    rows = resimulate(Path(argv[0]))
    print(f"{'load':>5} {'policy':12} {'speed':>5} {'live good/s':>11} {'sim@run':>8} {'live/sim@run':>12} "
          f"{'sim (calibration)':>17} {'live slo':>8} {'sim@run slo':>11}")
    for r in rows:
        print(f"{r['load']:5.2f} {r['policy']:12} {r['speed']:5.2f} {r['live_goodput']:11.2f} {r['sim_run_goodput']:8.2f} "
              f"{r['live_goodput'] / max(r['sim_run_goodput'], 1e-9) - 1:+12.0%} {r['sim_goodput']:17.2f} "
              f"{r['live_slo']:8.1%} {r['sim_run_slo']:11.1%}")
    within = sum(abs(r["live_goodput"] / max(r["sim_run_goodput"], 1e-9) - 1) <= 0.15 for r in rows)
    print(f"live within 15% of sim@run (goodput): {within} of {len(rows)} runs")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main(sys.argv[1:]))
