"""Bounded overload on loopback (issue 7): measure capacity, offer --factor x capacity for --seconds, then
normal load again, and check that the server sheds the excess cleanly.

    .venv/bin/python bench/overload.py --seconds 60 --factor 10

Phases against one spawned `turboserve serve` (the embedded all-MiniLM-L6-v2 on CPU):
  1. references: every text once, one request at a time (unbatched answers);
  2. capacity: closed loop (--concurrency in flight) for --capacity-seconds: 200s per second;
  3. overload: open loop at factor x capacity for --seconds (arrival i is sent at i / rate whatever
     happened to the earlier ones, on at most --max-in-flight connections; an arrival with no free
     connection is counted as `not_sent`, so the achieved offered rate is explicit);
  4. recovery: open loop at --normal x capacity for --recover-seconds.
Throughout, /metrics is sampled every --sample-ms (queue depth) with the server's RSS (/proc VmRSS).
Checked: only 200, 429 (with Retry-After) and 503 come back; every 200 matches the unbatched answer
(cosine >= 1 - 1e-4); the admitted p99 vs the SLO; the queue never above its bound; RSS after recovery
within 10% of before the overload. The client is a minimal HTTP/1.1 keep-alive client on uvloop: httpx
costs ~1 ms of CPU a request, which on 2 vCPUs would make the load generator the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench.harness import SpawnedServer, machine_info, percentile
from bench.workload import make_texts

COSINE_TOLERANCE = 1e-4


class Connection:
    """One HTTP/1.1 keep-alive connection; bodies must carry Content-Length (all of turboserve's do)."""

    # uvicorn closes a keep-alive connection idle for 5 s (timeout_keep_alive); reusing one it is closing
    # loses the request in flight, so reconnect before that, as HTTP client pools do.
    MAX_IDLE_S = 4.0

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.last_used = 0.0

    async def request(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
                      ) -> tuple[int, dict[str, str], bytes]:
        """(status, lower-cased headers, body); reconnects when the server closed the connection."""
        if self.writer is not None and (time.monotonic() - self.last_used > self.MAX_IDLE_S or self.reader.at_eof()):
            self.close()
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n{extra}\r\n").encode("latin-1")
        try:
            self.writer.write(head + body)
            raw = await self.reader.readuntil(b"\r\n\r\n")
            lines = raw.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            got = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
            if "content-length" not in got:
                raise ValueError(f"response without Content-Length: {got}")
            payload = await self.reader.readexactly(int(got["content-length"]))
        except BaseException:
            self.close()
            raise
        self.last_used = time.monotonic()
        if got.get("connection", "").lower() == "close":
            self.close()
        return status, got, payload

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


@dataclass
class Outcome:
    """One request: when it was sent (s from the phase start), its latency, status and checks."""

    phase: str
    sent: float
    latency: float
    status: int  # -1: transport error (sent, never answered)
    retry_after: str | None = None
    server_ms: float | None = None  # the server's own x-total-time
    queue_ms: float | None = None  # the server's x-queue-time (200 only)
    correct: bool | None = None  # 200 only: matches the unbatched answer
    error: str | None = None


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _body(text: str) -> bytes:
    return json.dumps({"inputs": text}).encode()


async def _send(conn: Connection, phase: str, t0: float, text_i: int, bodies: list[bytes], refs: list[np.ndarray] | None,
                headers: dict[str, str]) -> Outcome:
    sent = time.perf_counter()
    try:
        status, got, payload = await conn.request("POST", "/embed", bodies[text_i], headers)
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        return Outcome(phase, sent - t0, time.perf_counter() - sent, -1, error=repr(exc))
    out = Outcome(phase, sent - t0, time.perf_counter() - sent, status, got.get("retry-after"))
    try:
        out.server_ms = float(got["x-total-time"])
        out.queue_ms = float(got["x-queue-time"])
    except (KeyError, ValueError):
        pass
    if status == 200 and refs is not None:
        vector = np.asarray(json.loads(payload)[0], dtype=np.float64)
        out.correct = vector.shape == refs[text_i].shape and _cosine(vector, refs[text_i]) >= 1 - COSINE_TOLERANCE
    return out


async def references(host: str, port: int, texts: list[str]) -> list[np.ndarray]:
    """Each text's embedding, asked alone (one request at a time, so every batch holds just that text)."""
    conn, refs = Connection(host, port), []
    for text in texts:
        status, _, payload = await conn.request("POST", "/embed", _body(text))
        if status != 200:
            raise RuntimeError(f"reference request failed with {status}: {payload[:200]!r}")
        refs.append(np.asarray(json.loads(payload)[0], dtype=np.float64))
    conn.close()
    return refs


async def closed_loop(host: str, port: int, texts: list[str], seconds: float, concurrency: int) -> float:
    """Answers (200) per second with `concurrency` requests always in flight: the capacity."""
    bodies = [_body(t) for t in texts]
    stop = time.perf_counter() + seconds
    done = [0]

    async def client(k: int) -> None:
        conn, i = Connection(host, port), k
        while time.perf_counter() < stop:
            status, _, _ = await conn.request("POST", "/embed", bodies[i % len(bodies)])
            done[0] += status == 200
            i += concurrency
        conn.close()

    started = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(concurrency)))
    return done[0] / (time.perf_counter() - started)


@dataclass
class OpenLoop:
    """Open-loop arrivals at `rate` per second for `seconds` on at most `max_in_flight` connections."""

    phase: str
    rate: float
    seconds: float
    outcomes: list[Outcome] = field(default_factory=list)
    not_sent: int = 0  # arrivals that found every connection busy

    async def run(self, host: str, port: int, texts: list[str], refs: list[np.ndarray] | None, max_in_flight: int,
                  headers: dict[str, str] | None = None, seed: int = 0) -> None:
        bodies = [_body(t) for t in texts]
        idle = [Connection(host, port) for _ in range(max_in_flight)]
        rng, tasks = random.Random(seed), set()
        t0 = time.perf_counter()
        total = int(self.rate * self.seconds)

        async def one(conn: Connection, text_i: int) -> None:
            self.outcomes.append(await _send(conn, self.phase, t0, text_i, bodies, refs, headers or {}))
            idle.append(conn)

        i = 0
        while i < total:
            due = min(total, int((time.perf_counter() - t0) * self.rate) + 1)  # catch up after any stall
            for _ in range(due - i):
                if idle:
                    task = asyncio.ensure_future(one(idle.pop(), rng.randrange(len(texts))))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                else:
                    self.not_sent += 1
            i = due
            await asyncio.sleep(max(0.0, t0 + i / self.rate - time.perf_counter()))
        if tasks:
            await asyncio.wait(tasks)
        for conn in idle:
            conn.close()


def rss_bytes(pid: int) -> int | None:
    """Resident set size of `pid` from /proc (None where there is no /proc)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@dataclass
class Sampler:
    """Queue depth from /metrics and the server's RSS every `interval` seconds, until stopped."""

    host: str
    port: int
    pid: int | None
    interval: float
    samples: list[tuple[float, float, int | None]] = field(default_factory=list)  # (t, queue depth, rss)
    errors: int = 0

    async def run(self, stop: asyncio.Event) -> None:
        conn, t0 = Connection(self.host, self.port), time.perf_counter()
        while not stop.is_set():
            try:
                _, _, text = await conn.request("GET", "/metrics")
                depth = next(float(ln.split()[-1]) for ln in text.decode().splitlines()
                             if ln.startswith("turboserve_queue_depth "))
                self.samples.append((time.perf_counter() - t0, depth, rss_bytes(self.pid) if self.pid else None))
            except (OSError, asyncio.IncompleteReadError, ValueError, StopIteration):
                self.errors += 1
            try:
                await asyncio.wait_for(stop.wait(), self.interval)
            except asyncio.TimeoutError:
                pass
        conn.close()


async def server_counts(host: str, port: int) -> dict[str, float]:
    """turboserve_requests_total{route="/embed"} by status, and the drop counters, from /metrics."""
    conn = Connection(host, port)
    _, _, text = await conn.request("GET", "/metrics")
    conn.close()
    out: dict[str, float] = {}
    for line in text.decode().splitlines():
        if line.startswith('turboserve_requests_total{route="/embed"'):
            out[line.split('status="')[1].split('"')[0]] = float(line.split()[-1])
        elif line.startswith("turboserve_requests_dropped_total{"):
            out["dropped_" + line.split('reason="')[1].split('"')[0]] = float(line.split()[-1])
    return out


def summarize(loop: OpenLoop, slo_s: float) -> dict:
    """Status counts, latencies and checks of one open-loop phase."""
    out = loop.outcomes
    by_status: dict[str, int] = {}
    for o in out:
        by_status[str(o.status)] = by_status.get(str(o.status), 0) + 1
    ok = [o.latency for o in out if o.status == 200]
    refused = [o for o in out if o.status == 429]
    ms = lambda v: None if v is None else round(1000 * v, 3)
    return {
        "phase": loop.phase, "target_rate": round(loop.rate, 2), "seconds": loop.seconds,
        "sent": len(out), "not_sent": loop.not_sent, "offered_rate": round(len(out) / loop.seconds, 2),
        "status": by_status, "answered_rate": round(len(ok) / loop.seconds, 2),
        "unexplained": sum(o.status not in (200, 429, 503) for o in out),
        "wrong": sum(o.correct is False for o in out),
        "retry_after_missing": sum(o.retry_after is None for o in out if o.status in (429, 503)),
        "admitted_p50_ms": ms(percentile(ok, 50)), "admitted_p99_ms": ms(percentile(ok, 99)),
        "admitted_p99_within_slo": bool(ok) and percentile(ok, 99) <= slo_s,
        "refused_p50_ms": ms(percentile([o.latency for o in refused], 50)),
        "refused_p99_ms": ms(percentile([o.latency for o in refused], 99)),
        "refused_server_p99_ms": percentile([o.server_ms for o in refused if o.server_ms is not None], 99),
        "admitted_server_p99_ms": percentile([o.server_ms for o in out if o.status == 200 and o.server_ms is not None], 99),
        "admitted_queue_p99_ms": percentile([o.queue_ms for o in out if o.status == 200 and o.queue_ms is not None], 99),
        "errors": sorted({o.error for o in out if o.error})[:5],
    }


def _print_phase(s: dict) -> None:
    print(f"{s['phase']:9} target {s['target_rate']:8.1f}/s offered {s['offered_rate']:8.1f}/s (not sent {s['not_sent']}) "
          f"answered {s['answered_rate']:6.1f}/s status {s['status']} unexplained {s['unexplained']} wrong {s['wrong']} "
          f"no-Retry-After {s['retry_after_missing']}")
    print(f"{'':9} admitted p50/p99 {s['admitted_p50_ms']}/{s['admitted_p99_ms']} ms (within SLO: "
          f"{s['admitted_p99_within_slo']}); 429 p50/p99 {s['refused_p50_ms']}/{s['refused_p99_ms']} ms client, "
          f"p99 {s['refused_server_p99_ms']} ms server; admitted p99 {s['admitted_server_p99_ms']} ms server """
          f"(queue p99 {s['admitted_queue_p99_ms']} ms)", flush=True)
    if s["errors"]:
        print(f"{'':9} transport errors: {s['errors']}")


async def run_phases(server: SpawnedServer, args: argparse.Namespace) -> dict:
    """References, capacity, overload, recovery against `server`; the report."""
    host, port = "127.0.0.1", server.port
    texts = make_texts(args.texts, args.min_tokens, args.max_tokens, seed=7)
    pid = server.proc.pid if server.proc else None
    refs = await references(host, port, texts)
    await closed_loop(host, port, texts, min(2.0, args.capacity_seconds), args.concurrency)  # warm-up, discarded
    capacity = await closed_loop(host, port, texts, args.capacity_seconds, args.concurrency)
    print(f"capacity: {capacity:.1f} answers/s (closed loop, {args.concurrency} in flight, {args.capacity_seconds:g} s)",
          flush=True)
    sampler = Sampler(host, port, pid, args.sample_ms / 1000)
    stop = asyncio.Event()
    sampling = asyncio.ensure_future(sampler.run(stop))
    rss_before = rss_bytes(pid) if pid else None
    counts_before = await server_counts(host, port)
    phases = [OpenLoop("overload", args.factor * capacity, args.seconds),
              OpenLoop("recovery", args.normal * capacity, args.recover_seconds)]
    for k, loop in enumerate(phases):
        await loop.run(host, port, texts, refs, args.max_in_flight, seed=k)
    rss_after = rss_bytes(pid) if pid else None
    counts_after = await server_counts(host, port)
    stop.set()
    await sampling
    depths = [d for _, d, _ in sampler.samples]
    rss = [r for _, _, r in sampler.samples if r is not None]
    slo_s = args.slo_ms / 1000
    summaries = [summarize(loop, slo_s) for loop in phases]
    for s in summaries:
        _print_phase(s)
    report = {
        "capacity_rps": round(capacity, 2), "queue_bound": args.max_queue_size, "slo_ms": args.slo_ms,
        "phases": summaries,
        "queue_depth_max": max(depths, default=None), "queue_depth_samples": len(depths),
        "queue_within_bound": bool(depths) and max(depths) <= args.max_queue_size, "sampler_errors": sampler.errors,
        "rss_mib": {"before": rss_before and round(rss_before / 2**20, 1), "peak": rss and round(max(rss) / 2**20, 1),
                    "after": rss_after and round(rss_after / 2**20, 1)},
        "lost": sum(o.status == -1 for loop in phases for o in loop.outcomes),
        # What the server says it answered over the two phases, to compare with what the client received.
        "server_answered": {k: counts_after.get(k, 0) - counts_before.get(k, 0) for k in counts_after
                            if counts_after.get(k, 0) != counts_before.get(k, 0)},
        "client_received": {str(st): sum(o.status == st for loop in phases for o in loop.outcomes)
                            for st in sorted({o.status for loop in phases for o in loop.outcomes})},
    }
    if rss_before and rss_after:
        report["rss_mib"]["after_vs_before"] = round(rss_after / rss_before - 1, 4)
        report["rss_within_10pct"] = abs(rss_after / rss_before - 1) <= 0.10
    print(f"queue depth max {report['queue_depth_max']} of bound {args.max_queue_size} ({len(depths)} samples, "
          f"{sampler.errors} failed); RSS MiB {report['rss_mib']}; lost {report['lost']}", flush=True)
    print(f"server answered {report['server_answered']}; client received {report['client_received']}", flush=True)
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0, help="length of the overload phase")
    ap.add_argument("--factor", type=float, default=10.0, help="overload rate as a multiple of the measured capacity")
    ap.add_argument("--normal", type=float, default=0.5, help="recovery rate as a multiple of the capacity")
    ap.add_argument("--recover-seconds", type=float, default=20.0)
    ap.add_argument("--capacity-seconds", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=8, help="in flight while measuring capacity")
    ap.add_argument("--max-in-flight", type=int, default=512, help="connections of the open-loop phases")
    ap.add_argument("--max-queue-size", type=int, default=8, help="the server's scheduler.max_queue_size")
    ap.add_argument("--slo-ms", type=float, default=2000.0, help="the server's scheduler.slo_ms")
    ap.add_argument("--threads", type=int, default=1, help="the server's model.num_threads (0: torch's default)")
    ap.add_argument("--texts", type=int, default=64)
    ap.add_argument("--min-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--sample-ms", type=float, default=200.0)
    ap.add_argument("--out", default="bench/out/overload.json")
    args = ap.parse_args()
    os.environ["TURBOSERVE_SCHEDULER__MAX_QUEUE_SIZE"] = str(args.max_queue_size)
    os.environ["TURBOSERVE_SCHEDULER__SLO_MS"] = str(args.slo_ms)
    # On a shared 2-vCPU machine torch's default of one OpenMP thread per core collapses (a parallel region
    # waits for whichever thread the OS descheduled: ~20x slower per batch under a load average of 6).
    if args.threads:
        os.environ["TURBOSERVE_MODEL__NUM_THREADS"] = str(args.threads)
    # Every request here holds one text; a client batch may not exceed the queue bound.
    os.environ["TURBOSERVE_SERVER__MAX_CLIENT_BATCH_SIZE"] = str(min(32, args.max_queue_size))
    server = SpawnedServer([], startup_timeout=300)
    server.start()
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        report = runner(run_phases(server, args))
    finally:
        server.stop()
    report = {"command": " ".join(sys.argv), "machine": machine_info(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              **report}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
