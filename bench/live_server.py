"""What the live benchmarks of the scheduler share (bench/live_policies.py, bench/live_capacity.py): replaying a
recorded trace against a spawned server, the cost models every server of a run starts from (profile, calibration,
the host fit), policy specs (`dp:deadline_margin=0`), and the simulator's view of the same runs."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.harness import SpawnedServer, percentile
from bench.host_load import LiveBatch, fit_host, live_batches
from bench.samples import CLIENT_ERRORS, make_client
from bench.slo_capacity import full_batch_rate, median_capacity
from configs.settings import SchedulerSettings
from scheduler.cost_model import FEATURES, CostModel
from scheduler.planner import Limits
from scheduler.simulator import HostLoad, Trace
from server.engine import policy_config

POLICIES = ("dp", "token_budget", "fifo", "triton", "sort_slice")
ARRIVAL_SEED = 7  # the live runs' arrival times (bench/live_capacity.py --arrival-seed; the calibration's are seed 3)


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
        raise ValueError(f"{spec!r}: a policy of {', '.join(POLICIES)}, then optionally :setting=value+... "
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
    return full_batch_rate(sum(lengths) / len(lengths), limits, cost)


def sim_capacity(policy: str, lengths: list[int], arrivals_at, unit: float, limits: Limits, slo: float, cost: CostModel,
                 device: CostModel, host: HostLoad, scatter=0.0, arrival_seed: int = ARRIVAL_SEED) -> float:
    """One policy's simulated SLO capacity on the seeded trace at x times `unit` requests/s (the live runs' trace):
    planners see `cost`, the device is `device` plus `host`; with a scatter (a sigma, or a simulator.Scatter) the
    median over bench/slo_capacity.NOISE_SEEDS, the planners learning from every batch."""
    def at(x: float) -> Trace:
        return Trace(arrivals_at(x * unit, len(lengths), random.Random(arrival_seed)), lengths)
    return median_capacity(at, sim_config(policy), limits, device, slo, steps=10, planner_cost=cost, host=host,
                           refine=bool(scatter), noise=scatter)


def sim_capacities(lengths: list[int], arrivals_at, limits: Limits, slo: float, report: dict, cost: CostModel,
                   device: CostModel, host: HostLoad, policies: tuple[str, ...] = POLICIES, scatter: float = 0.0,
                   arrival_seed: int = ARRIVAL_SEED) -> list[float]:
    """The simulated SLO capacity (load) of fifo and of dp on this trace: the planners see `cost` (the model
    the servers start with), the simulated device is `device` plus `host`; every policy's capacity goes into
    the report. With `scatter` > 0 each simulated batch takes its time times a log-normal factor of that sigma,
    as live batches scatter about the fit, and the planners learn from every batch as the servers do; the
    capacity is then the median over bench/slo_capacity.NOISE_SEEDS. Without it the baselines' simulated capacities stood
    12-30% above their live ones on Poisson arrivals (a policy that does not plan for deadlines loses its p99
    to a few slow batches), dp's within 1% (bench/RESULTS.md, section 2, session 21). After the live runs
    bench/sim_fidelity.py simulates them again with a host fitted on all of them, each policy's planning charged."""
    capacity = full_batch_capacity(lengths, limits, cost)
    found = {policy: sim_capacity(policy, lengths, arrivals_at, capacity, limits, slo, cost, device, host, scatter, arrival_seed)
             for policy in policies}
    for policy, load in found.items():
        print(f"simulated SLO capacity {policy:12} load {load:.4f} = {load * capacity:.2f} requests/s "
              f"({load / max(found['fifo'], 1e-9):.2f}x fifo)", flush=True)
    report["sim_capacity"] = {"unit_rps": capacity, "loads": found, "scatter": scatter,
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
    """Mean batch size, the planner's time (mean a plan; share of the time the model ran), the cost model's overrun at
    the end (what dp's deadline margin and shedding plan with) and /info's cost-model error."""
    with httpx.Client(base_url=url, trust_env=False, timeout=10) as c:
        info = c.get("/info").json()
        metrics = c.get("/metrics").text
    names = ("turboserve_batch_size_sum", "turboserve_batch_size_count", "turboserve_scheduler_plan_seconds_sum",
             "turboserve_scheduler_plan_seconds_count", "turboserve_inference_duration_seconds_sum",
             "turboserve_cost_model_overrun_ratio")
    values = {}
    for line in metrics.splitlines():
        if line.startswith(names):
            name, value = line.split()
            values[name] = float(value)
    mean_batch = values.get("turboserve_batch_size_sum", 0) / max(values.get("turboserve_batch_size_count", 1), 1)
    plan_s = values.get("turboserve_scheduler_plan_seconds_sum", 0.0)
    return {"mean_batch": mean_batch, "cost_model_error": info.get("scheduler", {}).get("cost_model_error", {}),
            "plan_ms_mean": 1e3 * plan_s / max(values.get("turboserve_scheduler_plan_seconds_count", 1), 1),
            "plan_share": plan_s / max(values.get("turboserve_inference_duration_seconds_sum", 0.0), 1e-9),
            "overrun": values.get("turboserve_cost_model_overrun_ratio", float("nan")),
            "batches": values.get("turboserve_batch_size_count", 0.0),
            "model_seconds": values.get("turboserve_inference_duration_seconds_sum", 0.0), "plan_seconds": plan_s,
            "plan_seconds_a_batch": plan_s / max(values.get("turboserve_batch_size_count", 0.0), 1.0)}


@dataclass
class Models:
    """The cost models of a run: `saved` (the files every server starts from), `start` (the model they plan
    with), and what the simulator's device is: `device` (None: `start` itself) plus `host`, fitted to the
    calibration's batches against `profiled` (the profile before calibration; None without one), and how far
    single batches scatter about that fit (`scatter`, the sigma of the simulator's noise; 0: none)."""

    saved: dict[Path, bytes]
    start: CostModel
    host: HostLoad
    device: CostModel | None
    profiled: CostModel | None
    scatter: float = 0.0


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
    host, device, profiled, scatter = HostLoad(), None, None, 0.0
    if args.calibrate:
        profiled, batches = calibrate(texts, lengths, limits, args.slo_ms, args.calibrate, args.timeout, arrivals_at, out,
                                      args.client)
        saved = first_cost_models(cost_dir)
        if not args.device_only:
            fit = fit_host(batches, profiled)
            host, device = fit.host, profiled.scaled(fit.speed)
            scatter = 0.0 if args.no_scatter else fit.scatter
            report["host_fit"] = {"per_arrival_s": host.per_arrival, "per_completion_s": host.per_completion,
                                  "speed": fit.speed, "batches": fit.batches, "median_error_before": fit.median_error_before,
                                  "median_error_after": fit.median_error_after,
                                  "scatter": fit.scatter}
            print(f"host fit on {fit.batches} calibration batches: {host.per_arrival * 1000:.2f} ms an arrival, "
                  f"{host.per_completion * 1000:.2f} ms an answer, speed {fit.speed:.3f}; median batch-time error "
                  f"{fit.median_error_before:.1%} (cost model) -> {fit.median_error_after:.1%} (with the host); batches "
                  f"scatter about it by sigma {fit.scatter:.3f}" + (" (not simulated: --no-scatter)" if args.no_scatter else ""),
                  flush=True)
    return Models(saved, current_cost_model(), host, device, profiled, scatter)


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
