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
import asyncio
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import httpx  # noqa: E402

from bench.harness import SpawnedServer, machine_info, percentile  # noqa: E402
from bench.host_load import LiveBatch, fit_host, live_batches, simulate_at_run_speed  # noqa: E402
from bench.samples import CLIENT_ERRORS, CLIENTS, make_client  # noqa: E402
from bench.simulate import slo_capacity  # noqa: E402
from bench.workload import count_tokens, make_texts  # noqa: E402
from configs.settings import SchedulerSettings  # noqa: E402
from scheduler.cost_model import FEATURES, CostModel  # noqa: E402
from scheduler.planner import Limits  # noqa: E402
from scheduler.simulator import HostLoad, Trace, bursty_arrivals, poisson_arrivals, simulate  # noqa: E402
from server.engine import policy_config  # noqa: E402

POLICIES = ("dp", "token_budget", "fifo", "triton", "sort_slice")


async def replay(url: str, arrivals: list[float], texts: list[str] | list[list[str]], slo_ms: float,
                 timeout: float, client_kind: str = "raw") -> list[dict]:
    """Send texts[i] (one text, or a request's list of them) at arrivals[i] seconds from the start. Per request: latency, status, when it was sent and
    answered (seconds from the start) and the server's x-inference-time and x-total-time (seconds; 0 if absent)."""
    out: list[dict] = [{}] * len(texts)
    async with make_client(client_kind, url, len(texts), timeout) as client:
        start = time.perf_counter()

        async def one(i: int) -> None:
            delay = start + arrivals[i] - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            sent = time.perf_counter()
            status, inference, total = -1, 0.0, 0.0
            try:
                r = await client.post("/embed", json={"inputs": texts[i]}, headers={"x-slo-ms": str(slo_ms)})
                status = r.status_code
                inference, total = (float(r.headers.get(h, 0)) / 1000 for h in ("x-inference-time", "x-total-time"))
            except CLIENT_ERRORS:
                pass
            received = time.perf_counter()
            out[i] = {"latency": received - sent, "status": status, "sent": sent - start, "received": received - start,
                      "inference": inference, "total": total}

        await asyncio.gather(*(one(i) for i in range(len(texts))))
    return out


def summarize(policy: str, results: list[dict], arrivals: list[float], slo: float) -> dict:
    ok = [r["latency"] for r in results if r["status"] == 200]
    finish = max(a + r["latency"] for a, r in zip(arrivals, results))
    duration = finish - arrivals[0]
    good = sum(lat <= slo for lat in ok)
    return {"policy": policy, "completed": len(ok), "errors": len(results) - len(ok), "throughput": len(ok) / duration,
            "goodput": good / duration, "p50": percentile(ok, 50), "p99": percentile(ok, 99),
            "slo_attainment": good / len(results)}


def first_cost_models(cost_dir: Path) -> dict[Path, bytes]:
    """The cost models in cost_dir, measured now by a server started for that if there are none."""
    if not list(cost_dir.glob("cost-*.json")):
        server = SpawnedServer([], startup_timeout=300)
        server.start()
        server.stop()
    return {path: path.read_bytes() for path in cost_dir.glob("cost-*.json")}


def calibrate(texts: list[str], lengths: list[int], limits: Limits, slo_ms: float, count: int, timeout: float,
              arrivals_at, out: Path, client_kind: str = "raw") -> tuple[CostModel, list[LiveBatch]]:
    """Serve `count` of the trace's texts (arrivals as the runs', at 0.6x the model's capacity) with dp and
    stop the server, which saves its model as refined by those live batches: the batch times of this machine
    as it is now, with the load generator beside the server and the runs' kind of traffic, where the profile
    saw an idle machine (this VM's speed also changes by up to 2x from one spell to the next). Returns the
    model the server started with (the profile) and the calibration's batches, put back together from the
    answers (for fit_host); the answers go to out/calibration.json."""
    os.environ["TURBOSERVE_SCHEDULER__POLICY"] = "dp"
    server = SpawnedServer([], startup_timeout=300)
    server.start()
    try:
        start = server_cost_model(server.url)
        rate = 0.6 * full_batch_capacity(lengths, limits, start)
        picked = [lengths[i % len(texts)] for i in range(count)]
        arrivals = arrivals_at(rate, count, random.Random(3))
        results = asyncio.run(replay(server.url, arrivals, [texts[i % len(texts)] for i in range(count)], slo_ms, timeout,
                                     client_kind))
        print(f"calibration: {count} requests at {rate:.1f}/s, {sum(r['status'] == 200 for r in results)} answered", flush=True)
    finally:
        server.stop()
    (out / "calibration.json").write_text(json.dumps({"arrivals": arrivals, "lengths": picked, "results": results,
                                                      "start_model": start.to_json()}))
    return start, live_batches(results, picked)


def restore_cost_models(cost_dir: Path, saved: dict[Path, bytes]) -> None:
    for path, content in saved.items():
        path.write_bytes(content)


def simulation_limits() -> Limits:
    """The batch limits a server started by this script has (settings defaults)."""
    return Limits(SchedulerSettings().max_batch_tokens, SchedulerSettings().max_batch_requests)


def policy_spec(spec: str) -> tuple[str, dict[str, str]]:
    """`dp` or `dp:deadline_margin=0+max_wait_ms=2`: a policy and scheduler settings that differ from the defaults
    (an A/B of one knob: `--policies dp,dp:deadline_margin=0`). ValueError for an unknown policy or setting."""
    name, _, rest = spec.partition(":")
    parts = [part.partition("=") for part in rest.split("+")] if rest else []
    overrides = {key: value for key, _, value in parts}
    if (name not in POLICIES or any(not eq for _, eq, _ in parts)
            or not set(overrides) <= set(SchedulerSettings.model_fields) - {"policy"}):
        raise ValueError(f"{spec!r}: a policy of {', '.join(POLICIES)}, then optionally :setting=value,... "
                         "(scheduler settings)")
    SchedulerSettings(policy=name, **overrides)  # a value the setting refuses fails here, not in the server
    return name, overrides


def file_label(policy: str) -> str:
    """A policy spec as a file name's part: dp:deadline_margin=0 -> dp_deadline_margin-0."""
    return policy.replace(":", "_").replace("=", "-")


def sim_config(policy: str):
    """The knobs a server started by this script plans with (settings defaults, this policy spec)."""
    name, overrides = policy_spec(policy)
    return policy_config(SchedulerSettings(policy=name, **overrides))


def full_batch_capacity(lengths: list[int], limits: Limits, cost: CostModel) -> float:
    """Requests/s at full batches of the mean length: the unit of --loads."""
    mean = sum(lengths) / len(lengths)
    n_full = max(1, min(limits.max_batch_requests, int(limits.max_batch_tokens // mean)))
    return n_full / cost.predict_lengths([round(mean)] * n_full)


def sim_capacities(lengths: list[int], arrivals_at, limits: Limits, slo: float, report: dict, cost: CostModel,
                   device: CostModel, host: HostLoad, policies: tuple[str, ...] = POLICIES) -> list[float]:
    """The simulated SLO capacity (load) of fifo and of dp on this trace: the planners see `cost` (the model
    the servers start with), the simulated device is `device` plus `host`; every policy's capacity goes into
    the report."""
    capacity = full_batch_capacity(lengths, limits, cost)
    found = {}
    for policy in policies:
        found[policy] = slo_capacity(lambda x: Trace(arrivals_at(x * capacity, len(lengths), random.Random(7)), lengths),
                                     sim_config(policy), limits, device, slo, steps=10, planner_cost=cost, host=host)
    for policy, load in found.items():
        print(f"simulated SLO capacity {policy:12} load {load:.4f} = {load * capacity:.2f} requests/s "
              f"({load / max(found['fifo'], 1e-9):.2f}x fifo)", flush=True)
    report["sim_capacity"] = {"unit_rps": capacity, "loads": found,
                              "dp_over_fifo": found.get("dp", 0.0) / max(found["fifo"], 1e-9)}
    if "dp" in found:
        print(f"dp / fifo simulated SLO capacity: {report['sim_capacity']['dp_over_fifo']:.2f}x", flush=True)
    return [round(found[p], 4) for p in ("fifo", "dp") if p in found]


def current_cost_model() -> CostModel:
    """The cost model a fresh server plans with (read from the /info of one started for that)."""
    server = SpawnedServer([], startup_timeout=300)
    server.start()
    try:
        return server_cost_model(server.url)
    finally:
        server.stop()


def server_cost_model(url: str) -> CostModel:
    """The cost model a running server plans with, rebuilt from its /info."""
    with httpx.Client(base_url=url, trust_env=False, timeout=10) as c:
        doc = c.get("/info").json()["scheduler"]["cost_model"]
    model = CostModel([doc["coefficients_seconds"][f] for f in FEATURES], list(doc["knots_tokens"]), list(doc["factors"]))
    model.scale = float(doc.get("scale", 1.0))  # the running factor of this run (a server before 82fbc88 has none)
    return model


def scrape(url: str) -> dict:
    with httpx.Client(base_url=url, trust_env=False, timeout=10) as c:
        info = c.get("/info").json()
        metrics = c.get("/metrics").text
    values = {}
    for line in metrics.splitlines():
        if line.startswith(("turboserve_batch_size_sum", "turboserve_batch_size_count")):
            name, value = line.split()
            values[name] = float(value)
    mean_batch = values.get("turboserve_batch_size_sum", 0) / max(values.get("turboserve_batch_size_count", 1), 1)
    return {"mean_batch": mean_batch, "cost_model_error": info.get("scheduler", {}).get("cost_model_error", {})}


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


@dataclass
class Models:
    """The cost models of a run: `saved` (the files every server starts from), `start` (the model they plan
    with), and what the simulator's device is: `device` (None: `start` itself) plus `host`, fitted to the
    calibration's batches against `profiled` (the profile before calibration; None without one)."""

    saved: dict[Path, bytes]
    start: CostModel
    host: HostLoad
    device: CostModel | None
    profiled: CostModel | None


def prepare_models(args, out: Path, texts: list[str], lengths: list[int], limits: Limits, arrivals_at,
                   report: dict) -> Models:
    """Every server of a run starts from one cost model: measured by the first server into a folder of the
    run (--fresh-profile: measured again), refined by --calibrate live requests, then put back before each
    server starts (each refines and saves it as it serves, which would otherwise hand the next policy, and
    its simulation, a different model). The host fit goes into the report."""
    cost_dir = out / "cost-models"
    os.environ["TURBOSERVE_SCHEDULER__COST_MODEL_DIR"] = str(cost_dir.resolve())
    if args.fresh_profile:
        shutil.rmtree(cost_dir, ignore_errors=True)
    saved = first_cost_models(cost_dir)
    host, device, profiled = HostLoad(), None, None
    if args.calibrate:
        profiled, batches = calibrate(texts, lengths, limits, args.slo_ms, args.calibrate, args.timeout, arrivals_at, out,
                                      args.client)
        saved = first_cost_models(cost_dir)
        if not args.device_only:
            fit = fit_host(batches, profiled)
            host, device = fit.host, profiled.scaled(fit.speed)
            report["host_fit"] = {"per_arrival_s": host.per_arrival, "per_completion_s": host.per_completion,
                                  "speed": fit.speed, "batches": fit.batches, "median_error_before": fit.median_error_before,
                                  "median_error_after": fit.median_error_after}
            print(f"host fit on {fit.batches} calibration batches: {host.per_arrival * 1000:.2f} ms an arrival, "
                  f"{host.per_completion * 1000:.2f} ms an answer, speed {fit.speed:.3f}; median batch-time error "
                  f"{fit.median_error_before:.1%} (cost model) -> {fit.median_error_after:.1%} (with the host)", flush=True)
    return Models(saved, current_cost_model(), host, device, profiled)


def serve_trace(policy: str, models: Models, arrivals: list[float], bodies: list, args) -> tuple[list[dict], dict, CostModel, CostModel]:
    """One live run: a fresh server with this policy (from the run's saved cost model) replays the trace.
    Returns the answers, their summary with the server's batch size and cost-model error, and the cost model
    the server started with and the one its batches left."""
    restore_cost_models(Path(os.environ["TURBOSERVE_SCHEDULER__COST_MODEL_DIR"]), models.saved)
    name, overrides = policy_spec(policy)
    env = {"TURBOSERVE_SCHEDULER__POLICY": name} | {f"TURBOSERVE_SCHEDULER__{k.upper()}": v for k, v in overrides.items()}
    os.environ.update(env)
    server = SpawnedServer([], startup_timeout=300)
    try:
        server.start()
    finally:
        for key in env.keys() - {"TURBOSERVE_SCHEDULER__POLICY"}:
            del os.environ[key]
    try:
        cost = server_cost_model(server.url)
        results = asyncio.run(replay(server.url, arrivals, bodies, args.slo_ms, args.timeout, args.client))
        live = summarize(policy, results, arrivals, args.slo_ms / 1000) | scrape(server.url)
        return results, live, cost, server_cost_model(server.url)  # the last: as this run's batches refined it
    finally:
        server.stop()


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
                    help="before the runs, refine the cost model with N live requests (see calibrate())")
    ap.add_argument("--device-only", action="store_true",
                    help="simulate the device alone (default with --calibrate: the device plus the host's request "
                         "handling as fitted on the calibration's batches, see bench/host_load.py)")
    ap.add_argument("--fresh-profile", action="store_true",
                    help="measure a new cost model (default: reuse the one of an earlier run in --out)")
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
        loads = sim_capacities(lengths, arrivals_at, limits, slo, report, models.start, device or models.start, host)
    plan_runs = [(ld, p) for ld in loads for _ in range(args.repeats) for p in args.policies.split(",")]
    traces: dict[float, tuple[float, list[float]]] = {}
    for load, policy in plan_runs:
        if load not in traces:  # one trace a load, replayed to every policy and round alike
            capacity = full_batch_capacity(lengths, limits, models.start) / k  # requests/s
            rate = args.rps if args.rps else load * capacity
            traces[load] = (capacity, arrivals_at(rate, len(bodies), random.Random(7)))
            (out / f"trace-{load}.json").write_text(json.dumps({"arrivals": traces[load][1], "lengths": lengths,
                                                                "texts": texts, "inputs": k}))
        capacity, arrivals = traces[load]
        results, live, cost, end_cost = serve_trace(policy, models, arrivals, bodies, args)
        (out / f"answers-{load}-{file_label(policy)}-{len(report['runs'])}.json").write_text(json.dumps(results))
        sim = simulate(trace_of(arrivals), sim_config(policy), limits, device or cost, slo, cost, host).row()
        sim_device = simulate(trace_of(arrivals), sim_config(policy), limits, cost, slo).row()  # no host, as fitted
        # As `sim`, with the planner's model learning from every simulated batch as the server's does (EWMA knots,
        # and the overrun dp's shedding plans with): the server as it runs, where `sim` keeps its starting model.
        sim_learn = simulate(trace_of(arrivals), sim_config(policy), limits, device or cost, slo, cost, host,
                             refine=True).row()
        # The same trace with the model as this run left it: how much of a gap is the machine's speed
        # during the run (this VM drifts) rather than the policy.
        sim_end = simulate(trace_of(arrivals), sim_config(policy), limits, end_cost, slo).row()
        run = {"load": load, "offered_rps": args.rps or load * capacity, "live": live, "sim": sim,
               "sim_device": sim_device, "sim_learn": sim_learn, "sim_end": sim_end, "start_model": cost.to_json()}
        if device is not None:  # and at the speed the machine ran during this run (see bench/host_load.py)
            run["speed"], sim_run = simulate_at_run_speed(trace_of(arrivals), sim_config(policy), limits, results,
                                                          profiled, host, cost, slo)
            run["sim_run"] = sim_run.row()
        report["runs"].append(run)
        err = live["cost_model_error"]
        print(f"load {load:4.2f} {policy:12} live: thr {live['throughput']:6.2f}/s good {live['goodput']:6.2f}/s "
              f"p50 {live['p50']:6.3f}s p99 {live['p99']:6.3f}s slo {live['slo_attainment']:6.1%} "
              f"errors {live['errors']} batch {live['mean_batch']:5.1f} cost-err med {err.get('median_abs', float('nan')):.1%} | "
              f"sim: good {sim['goodput']:6.2f}/s p50 {sim['p50']:6.3f}s p99 {sim['p99']:6.3f}s "
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
