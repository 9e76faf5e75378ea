"""Load generator for turboserve: replay the bench workload over loopback HTTP and report throughput.

    .venv/bin/python bench/loadgen.py --spawn --concurrency 32 --requests 600 --baseline --single

Phases, in order (the server is never loaded while something else is being timed):

0. --spawn: start `turboserve serve` on a free loopback port, wait for GET /health == 200.
1. baseline (--baseline, bench/st_baseline.py): SentenceTransformer(default_model_path(),
   device="cpu").encode(texts, batch_size=32) in this process on the very texts of the load phase, after a warm-up call, while
   the server is idle.
2. load: `--concurrency` client tasks send one text per request until `--requests` are done or
   `--duration` seconds pass (hard stop: requests still in flight are cancelled and counted apart);
   `--warmup` requests (other texts) come first and are not counted.
   `--rounds N` repeats 1+2 N times, alternating, and reports the median server/baseline ratio:
   on a shared or virtual machine the CPU's speed drifts by tens of percent over minutes.
3. single (--single, bench/single_request.py): `--single-count` sequential requests of one ~16-token
   text, alternating in blocks with in-process forwards of the same token ids (models.runtime.load_model, emb.embed([ids]));
   overhead = client p50 - forward p50.

Each timed phase also reports CPU seconds used by the machine, this process, the server and everything
else (from /proc), and warns when other processes took more than 5% of the CPU.
Only loopback addresses are accepted. `--json FILE` writes every number.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import httpx
import numpy as np

from bench.harness import CpuMeter, SpawnedServer, check_loopback, machine_info, print_cpu
from bench.samples import CLIENTS, ROUTES, Sample, body_for, make_client, send_one, summary
from bench.single_request import run_single
from bench.st_baseline import Baseline
from bench.workload import count_tokens, load_tokenizer, make_texts

# ---------------------------------------------------------------------------------------------- utils

def _fmt(value, unit: str = "", digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{unit}"


# ---------------------------------------------------------------------------------------------- load

@dataclass
class LoadResult:
    concurrency: int
    route: str
    requested: int
    completed: int = 0
    ok: int = 0
    cancelled_at_deadline: int = 0
    elapsed_s: float = 0.0
    requests_per_s: float = 0.0
    tokens_per_s: float = 0.0
    mean_tokens: float = 0.0
    latency_ms: dict = field(default_factory=dict)
    server_inference_ms: dict = field(default_factory=dict)
    server_queue_ms: dict = field(default_factory=dict)
    server_total_ms: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)
    cpu: dict = field(default_factory=dict)
    # Every successful request in completion order: (client latency ms, tokens); for offline analysis.
    per_request: list = field(default_factory=list)


async def run_load(url: str, route: str, texts: list[str], tokens: list[int], concurrency: int, duration: float,
                   warmup_texts: list[str], timeout: float, server_pid: int | None = None, client_kind: str = "raw") -> LoadResult:
    """Warm up, then replay `texts` (one per request) with `concurrency` workers; stop at `duration` seconds."""
    path = ROUTES[route]
    bodies = [body_for(route, t) for t in texts]
    result = LoadResult(concurrency, route, len(texts))
    async with make_client(client_kind, url, concurrency, timeout) as client:
        # Warm-up: open the connections and get the server past any first-request costs.
        if warmup_texts:
            warm = [body_for(route, t) for t in warmup_texts]
            sem = asyncio.Semaphore(concurrency)

            async def warmsend_one(b: bytes):
                async with sem:
                    return await send_one(client, path, b, 0)

            outs = await asyncio.gather(*(warmsend_one(b) for b in warm))
            bad = [o for o in outs if not isinstance(o, Sample) or o.status != 200]
            if bad:
                print(f"warning: {len(bad)} of {len(warm)} warm-up requests failed, e.g. {bad[0]}", flush=True)

        samples: list[Sample] = []
        failures: Counter = Counter()
        next_index = 0

        async def worker():
            nonlocal next_index
            while next_index < len(bodies):
                i = next_index
                next_index += 1
                out = await send_one(client, path, bodies[i], tokens[i])
                if isinstance(out, Sample):
                    samples.append(out)
                else:
                    failures[out[0]] += 1

        meter = CpuMeter((server_pid,) if server_pid else (), judge=bool(server_pid))
        cpu_start = meter.snapshot()
        started = time.perf_counter()
        tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
        _done, pending = await asyncio.wait(tasks, timeout=duration)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        elapsed = time.perf_counter() - started
        result.cpu = meter.since(cpu_start)
        if pending:
            # Each worker still running had exactly one request in flight.
            result.cancelled_at_deadline = len(pending)
    ok = [s for s in samples if s.status == 200]
    result.completed = len(samples)
    result.ok = len(ok)
    result.elapsed_s = round(elapsed, 3)
    result.requests_per_s = round(len(ok) / elapsed, 3)
    result.tokens_per_s = round(sum(s.tokens for s in ok) / elapsed, 1)
    result.mean_tokens = round(float(np.mean([s.tokens for s in ok])), 1) if ok else 0.0
    result.latency_ms = summary([s.latency for s in ok])
    result.per_request = [(round(s.latency * 1000, 2), s.tokens) for s in ok]
    result.server_inference_ms = summary([s.inference for s in ok if s.inference is not None])
    result.server_queue_ms = summary([s.queue for s in ok if s.queue is not None])
    result.server_total_ms = summary([s.server_total for s in ok if s.server_total is not None])
    errors = Counter(f"HTTP {s.status}" for s in samples if s.status != 200)
    errors.update(failures)
    result.errors = dict(errors)
    return result


# ---------------------------------------------------------------------------------------------- main

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--url", default="http://127.0.0.1:8000", help="running server (loopback only; default %(default)s)")
    where.add_argument("--spawn", action="store_true", help="start `turboserve serve` on a free loopback port and stop it at the end")
    p.add_argument("--server-pid", type=int, help="with --url: the server's process id, to report its CPU time apart")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for the spawned server, repeatable (e.g. --server-arg=--config --server-arg=FILE)")
    p.add_argument("--route", choices=sorted(ROUTES), default="tei", help="tei: POST /embed; openai: POST /v1/embeddings")
    p.add_argument("--client", choices=CLIENTS, default="raw",
                   help="raw: bench/rawclient.py (~0.2 ms of CPU a request); httpx: its AsyncClient (~2.3 ms here; every "
                        "figure before session 19)")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight (default %(default)s)")
    p.add_argument("--requests", type=int, default=600, help="timed requests, one text each (default %(default)s)")
    p.add_argument("--duration", type=float, default=300.0, help="hard stop of the load phase, seconds (default %(default)s)")
    p.add_argument("--warmup", type=int, default=20, help="untimed warm-up requests first (default %(default)s)")
    p.add_argument("--min-tokens", type=int, default=8, help="shortest text, tokens with specials (default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=256, help="longest text (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="workload seed (default %(default)s)")
    p.add_argument("--timeout", type=float, default=120.0, help="per-request timeout, seconds (default %(default)s)")
    p.add_argument("--baseline", action="store_true", help="also time SentenceTransformer.encode on the same texts in-process")
    p.add_argument("--baseline-batch-size", type=int, default=32, help="batch_size of the baseline encode (default %(default)s)")
    p.add_argument("--baseline-device", default="cpu", help="device of the baseline (default %(default)s; cuda on a GPU machine)")
    p.add_argument("--baseline-dtype", choices=["float32", "float16", "bfloat16"], help="dtype of the baseline (default: as loaded)")
    p.add_argument("--model", metavar="DIR", help="a model folder: served (--spawn), the baseline's, and the workload's tokenizer "
                                                  "(default: the embedded all-MiniLM-L6-v2)")
    p.add_argument("--baseline-runs", type=int, default=1, help="time the baseline encode this many times per round, report the median")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat baseline + load this many times, alternating, and report the median ratio (default %(default)s)")
    p.add_argument("--single", action="store_true", help="also measure sequential single-request latency vs raw forward time")
    p.add_argument("--single-count", type=int, default=50, help="requests / forward runs of the single phase (default %(default)s)")
    p.add_argument("--single-tokens", type=int, default=16, help="token length of the single-phase text (default %(default)s)")
    p.add_argument("--startup-timeout", type=float, default=180.0, help="seconds to wait for the spawned server's /health")
    p.add_argument("--json", metavar="FILE", help="write all numbers as JSON")
    return p


def _print_load(r: LoadResult) -> None:
    print(f"\n== load: {r.ok}/{r.requested} ok in {r.elapsed_s:.2f}s at concurrency {r.concurrency} ({ROUTES[r.route]})")
    print(f"  throughput : {r.requests_per_s:.2f} req/s, {r.tokens_per_s:.0f} tokens/s (mean {r.mean_tokens} tokens/request)")
    lat = r.latency_ms
    print(f"  latency    : p50 {_fmt(lat.get('p50'), ' ms')}  p90 {_fmt(lat.get('p90'), ' ms')}  "
          f"p99 {_fmt(lat.get('p99'), ' ms')}  max {_fmt(lat.get('max'), ' ms')}")
    for label, d in (("server total", r.server_total_ms), ("server queue", r.server_queue_ms),
                     ("server infer", r.server_inference_ms)):
        if d:
            print(f"  {label:<11}: p50 {_fmt(d.get('p50'), ' ms')}  p99 {_fmt(d.get('p99'), ' ms')}")
    if r.cancelled_at_deadline:
        print(f"  hard stop  : {r.cancelled_at_deadline} requests in flight were cancelled at the deadline")
    print_cpu(r.cpu)
    print(f"  errors     : {r.errors or 'none'}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if min(args.concurrency, args.requests, args.rounds, args.baseline_runs, args.single_count) < 1:
        raise SystemExit("loadgen: --concurrency, --requests, --rounds, --baseline-runs and --single-count must be at least 1")
    if not args.spawn:
        check_loopback(args.url)
    report: dict = {"command": " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
                    "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "machine": machine_info(), "args": vars(args)}
    try:
        commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=False).stdout.strip()
        report["git_commit"] = commit or None
    except (OSError, subprocess.TimeoutExpired):
        report["git_commit"] = None

    tok = load_tokenizer(args.model)
    texts = make_texts(args.requests, args.min_tokens, args.max_tokens, args.seed, tok)
    tokens = count_tokens(texts, tok)
    warmup_texts = make_texts(args.warmup, args.min_tokens, args.max_tokens, args.seed + 1000, tok) if args.warmup else []
    single_text = make_texts(1, args.single_tokens, args.single_tokens, args.seed + 2000, tok)[0]
    print(f"workload: {len(texts)} texts, tokens min {min(tokens)} mean {np.mean(tokens):.1f} max {max(tokens)} "
          f"(total {sum(tokens)})", flush=True)
    report["workload"] = {"texts": len(texts), "min_tokens": min(tokens), "max_tokens": max(tokens),
                          "mean_tokens": round(float(np.mean(tokens)), 2), "total_tokens": sum(tokens)}

    server_args = (["--model", args.model] if args.model else []) + args.server_arg
    spawned = SpawnedServer(server_args, args.startup_timeout) if args.spawn else None
    url = spawned.url if spawned else args.url
    baseline = None
    rounds: list[dict] = []
    try:
        if spawned:
            spawned.start()
        server_pid = spawned.proc.pid if spawned else args.server_pid
        with httpx.Client(base_url=url, trust_env=False, timeout=10) as client:
            try:
                report["server_info"] = client.get("/info").json()
            except (httpx.HTTPError, ValueError) as exc:
                raise SystemExit(f"loadgen: cannot reach {url}/info: {exc}") from exc
        for r in range(args.rounds):
            entry: dict = {"round": r + 1}
            if args.rounds > 1:
                print(f"\n######## round {r + 1} of {args.rounds}", flush=True)
            if args.baseline:  # the server is idle meanwhile
                print("baseline: SentenceTransformer.encode in-process (server idle) ...", flush=True)
                baseline = baseline or Baseline(args.baseline_batch_size, args.model, args.baseline_device, args.baseline_dtype)
                b = entry["baseline"] = baseline.run(texts, args.baseline_runs)
                each = f", runs: {', '.join(f'{x:.2f}' for x in b['texts_per_s_each'])}" if b["runs"] > 1 else ""
                print(f"== baseline: {b['texts_per_s']:.2f} texts/s ({b['texts']} texts in {b['elapsed_s']:.2f}s, "
                      f"batch_size {b['batch_size']}, {b['torch_threads']} torch threads{each})", flush=True)
                print_cpu(b["cpu"])
            load = asyncio.run(run_load(url, args.route, texts, tokens, args.concurrency, args.duration,
                                        warmup_texts if r == 0 else [], args.timeout, server_pid, args.client))
            entry["load"] = asdict(load)
            _print_load(load)
            if args.baseline:
                entry["throughput_ratio"] = round(load.requests_per_s / entry["baseline"]["texts_per_s"], 3)
                print(f"  ratio      : server / baseline = {load.requests_per_s:.2f} / "
                      f"{entry['baseline']['texts_per_s']:.2f} = {entry['throughput_ratio']:.3f}x", flush=True)
            rounds.append(entry)
        del baseline  # free its memory before the single phase loads the model again
        with httpx.Client(base_url=url, trust_env=False, timeout=10) as client:  # the cost model's live error, now
            try:
                info = client.get("/info").json().get("scheduler", {})
                error = report["cost_model_error_after_load"] = info.get("cost_model_error")
                print(f"  cost model : predicted vs observed batch times after the load: {error}", flush=True)
            except (httpx.HTTPError, ValueError) as exc:
                print(f"  cost model : /info unreadable after the load ({exc})", flush=True)
        if args.single:
            report["single"] = asyncio.run(run_single(url, args.route, single_text, args.single_count, args.timeout,
                                                      server_pid))
    finally:
        if spawned:
            spawned.stop()
            report["server_log_tail"] = spawned.tail(15)

    report["rounds"] = rounds
    if rounds:  # the round with the median throughput stands for the run
        median_round = sorted(rounds, key=lambda e: e["load"]["requests_per_s"])[len(rounds) // 2]
        report["load"] = median_round["load"]
        if args.baseline:
            report["baseline"] = median_round["baseline"]
            ratios = [e["throughput_ratio"] for e in rounds]
            report["throughput_ratio"] = round(float(np.median(ratios)), 3)
            report["throughput_ratio_each"] = ratios

    if args.single:
        s = report["single"]
        client_p50 = s["client_latency_ms"].get("p50")
        fwd_p50 = s["forward_ms"].get("p50")
        s["overhead_ms"] = round(client_p50 - fwd_p50, 3) if client_p50 is not None and fwd_p50 is not None else None
        paced_p50 = s["forward_paced_ms"].get("p50")
        s["overhead_vs_paced_ms"] = round(client_p50 - paced_p50, 3) if client_p50 is not None and paced_p50 else None
        print(f"\n== single: {s['ok']}/{s['count']} sequential requests of {s['tokens']} tokens "
              f"(alternating with in-process forwards in blocks of {s['block']})")
        print(f"  client latency p50 {_fmt(client_p50, ' ms', 3)}, server x-total-time p50 "
              f"{_fmt(s['server_total_ms'].get('p50'), ' ms', 3)}, x-queue-time p50 "
              f"{_fmt(s['server_queue_ms'].get('p50'), ' ms', 3)}, x-inference-time p50 "
              f"{_fmt(s['server_inference_ms'].get('p50'), ' ms', 3)}")
        print(f"  GET /health p50 {_fmt(s['health_latency_ms'].get('p50'), ' ms', 3)} (HTTP round trip, no model work)")
        print(f"  raw forward p50 {_fmt(fwd_p50, ' ms', 3)} (in-process emb.embed, back to back); "
              f"paced ({s['paced_gap_ms']:.0f} ms idle before each) p50 {_fmt(paced_p50, ' ms', 3)}")
        print_cpu(s["cpu"])
        print(f"  overhead = client p50 - forward p50 = {_fmt(s['overhead_ms'], ' ms', 3)}  (target <= 2 ms); "
              f"vs paced forward: {_fmt(s['overhead_vs_paced_ms'], ' ms', 3)}")
        if s["errors"]:
            print(f"  errors: {s['errors']}")

    if args.baseline and rounds:
        each = ", ".join(f"{x:.3f}" for x in report["throughput_ratio_each"])
        print(f"\n== server / baseline throughput: {report['throughput_ratio']:.3f}x"
              f"{f' (median of rounds: {each})' if len(rounds) > 1 else ''}  (target >= 1.0x)")

    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"\nwrote {args.json}")
    failed = report.get("load", {}).get("ok", 0) == 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
