"""Where a lone request's time goes between the socket and the model: the real server (embedded
all-MiniLM-L6-v2) in this process, instrumented at the seams of the request path, and a separate client
process sending sequential single-text /embed requests, paced so each one meets an idle server.

    .venv/bin/python bench/request_path.py [--requests 300] [--pace-ms 5] [--tokens 16]

Prints the median of each segment, from EdgeMiddleware's entry to the last body byte handed to uvicorn,
and the client's round trip. The seams are wrapped by name (EdgeMiddleware.__call__, Engine.tokenize,
Engine.run, BatchQueue.next_batch, BatchWorker._compute, worker.resolve, the /embed route's json_response):
a renamed seam fails loudly here rather than giving a wrong table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import scheduler.queue as queue_mod  # noqa: E402
import scheduler.worker as worker_mod  # noqa: E402
import server.engine as engine_mod  # noqa: E402
import server.middleware as middleware_mod  # noqa: E402
import server.routes_tei as tei_mod  # noqa: E402
from bench.workload import make_texts  # noqa: E402
from server.cli import main as serve_main  # noqa: E402

SEAMS = ["entered", "routed", "tokenized", "queued", "taken", "forward", "computed", "resolved", "resumed",
         "encoding", "encoded", "headers", "sent"]
# What runs between each seam and the next.
LABELS = dict(zip(zip(SEAMS, SEAMS[1:]), [
    "edge, routing, body validation", "tokenize", "to the queue", "worker wake + plan", "admit", "model forward (embed)",
    "metrics, cost refine", "future -> event loop", "pool finish, normalise", "JSON", "response start", "body to uvicorn"]))

CLIENT = r'''
import sys, time, os, signal, statistics, httpx
pid, port, n, pace, text = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
c = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
give_up = time.monotonic() + 300
while time.monotonic() < give_up:
    try:
        if c.get("/health").status_code == 200:
            break
    except httpx.HTTPError:
        pass
    time.sleep(0.2)
else:
    sys.exit("the server never became ready")
lat = []
for i in range(n + 50):
    started = time.perf_counter()
    r = c.post("/embed", json={"inputs": text})
    r.json()
    lat.append(time.perf_counter() - started)
    assert r.status_code == 200, r.text
    time.sleep(pace)
print(statistics.median(lat[50:]) * 1000)
os.kill(pid, signal.SIGINT)
'''


def instrument(trace: list[dict]) -> None:
    """Wrap the seams; each /embed request appends its stamps (perf_counter seconds) to `trace`."""
    now = time.perf_counter
    current: dict = {}

    def wrap_async(owner, name, before, after):
        inner = getattr(owner, name)

        async def wrapped(*args, **kwargs):
            current[before] = now()
            result = await inner(*args, **kwargs)
            current[after] = now()
            return result
        setattr(owner, name, wrapped)

    def wrap_sync(owner, name, before, after=None):
        inner = getattr(owner, name)

        def wrapped(*args, **kwargs):
            if before:
                current[before] = now()
            result = inner(*args, **kwargs)
            if after:
                current[after] = now()
            return result
        setattr(owner, name, wrapped)

    edge = middleware_mod.EdgeMiddleware.__call__

    async def edge_call(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/embed":
            return await edge(self, scope, receive, send)
        current.clear()
        current["entered"] = now()

        async def stamped_send(message):
            if message["type"] == "http.response.start":
                current["headers"] = now()
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                current["sent"] = now()
                trace.append(dict(current))
        return await edge(self, scope, receive, stamped_send)

    middleware_mod.EdgeMiddleware.__call__ = edge_call
    wrap_async(engine_mod.Engine, "tokenize", "routed", "tokenized")
    run = engine_mod.Engine.run

    async def engine_run(self, *args, **kwargs):
        current["queued"] = now()
        result = await run(self, *args, **kwargs)
        current["resumed"] = now()
        return result
    engine_mod.Engine.run = engine_run
    wrap_sync(queue_mod.BatchQueue, "next_batch", None, "taken")
    wrap_sync(worker_mod.BatchWorker, "_compute", "forward", "computed")
    wrap_sync(worker_mod, "resolve", "resolved")
    wrap_sync(tei_mod, "json_response", "encoding", "encoded")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--pace-ms", type=float, default=5.0, help="idle time between requests (default %(default)s)")
    ap.add_argument("--tokens", type=int, default=16, help="token length of the text (default %(default)s)")
    ap.add_argument("--port", type=int, default=8765)
    args = ap.parse_args()
    trace: list[dict] = []
    instrument(trace)
    text = make_texts(1, args.tokens, args.tokens, 7)[0]
    client = subprocess.Popen([sys.executable, "-c", CLIENT, str(os.getpid()), str(args.port), str(args.requests),
                               str(args.pace_ms / 1000), text], stdout=subprocess.PIPE, text=True)
    os.environ.setdefault("TURBOSERVE_SERVER__LOG_LEVEL", "warning")
    try:
        serve_main(["serve", "--port", str(args.port)])
    except KeyboardInterrupt:
        pass
    finally:
        if client.poll() is None and not trace:
            client.kill()  # the server stopped before serving: do not leave the client waiting
    out, _ = client.communicate(timeout=60)
    if client.returncode != 0 or not out.strip():
        print("request_path: the client failed", file=sys.stderr)
        return 1
    rows = trace[50:]
    print(f"{len(rows)} sequential /embed requests of {args.tokens} tokens, {args.pace_ms:g} ms apart (median ms)")
    for a, b in zip(SEAMS, SEAMS[1:]):
        ms = statistics.median((t[b] - t[a]) * 1000 for t in rows)
        print(f"  {LABELS[a, b]:32} {ms:8.3f}")
    server = statistics.median((t["sent"] - t["entered"]) * 1000 for t in rows)
    # Per request, then the median: the forward alone varies by more than the rest takes.
    rest = statistics.median((t["sent"] - t["entered"] - t["computed"] + t["forward"]) * 1000 for t in rows)
    client_ms = float(out.strip())
    print(f"  {'server, edge to last byte':32} {server:8.3f}   (all but the forward: {rest:.3f})")
    print(f"  {'client round trip':32} {client_ms:8.3f}   (outside the server: {client_ms - server:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
