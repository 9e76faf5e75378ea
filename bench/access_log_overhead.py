"""Event-loop cost of the access log: CPU time per request through the whole ASGI app (EdgeMiddleware,
routing, the route) with the access log off, as text, and as JSON, written to a file as `turboserve serve`
writes to stderr. No sockets and no client: this is the server's own share, what the access line adds to it.

    .venv/bin/python bench/access_log_overhead.py --requests 20000 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import tempfile
import time

from configs.settings import load_settings
from server.app import create_app
from server.logs import configure_logging

PATHS = ("/v2/health/live", "/no/such/route")  # cheapest routes: the access line's share is largest there


async def _drive(app, n: int, path: str) -> float:
    """Process CPU seconds for n GET `path` requests, each a complete ASGI cycle."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"bench"), (b"user-agent", b"bench/1")], "client": ("127.0.0.1", 50000),
             "server": ("127.0.0.1", 8000)}

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        pass

    start = time.process_time()
    for _ in range(n):
        await app(dict(scope), receive, send)
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5, help="rounds; modes interleave within each round")
    args = parser.parse_args()
    modes = {"off": ("text", False), "text": ("text", True), "json": ("json", True)}
    apps = {}
    for mode, (fmt, access) in modes.items():
        s = load_settings(None, {"server": {"log_format": fmt, "access_log": access}, "model": {"warmup": False}})
        apps[mode] = create_app(s, loader=lambda: None)  # no lifespan runs: the model is never loaded
    per_request: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryFile("w") as sink:
        loop = asyncio.new_event_loop()
        for _ in range(args.rounds):
            for path in PATHS:
                for mode, (fmt, access) in modes.items():
                    configure_logging("info", fmt, access, stream=sink)
                    seconds = loop.run_until_complete(_drive(apps[mode], args.requests, path))
                    per_request.setdefault((path, mode), []).append(seconds / args.requests * 1e6)
        loop.close()
    logging.shutdown()
    print(f"{'path':<18} {'mode':<5} {'median us/request':>18} {'min':>8} {'max':>8} {'vs off':>8}")
    for path in PATHS:
        base = statistics.median(per_request[(path, "off")])
        for mode in modes:
            xs = per_request[(path, mode)]
            med = statistics.median(xs)
            print(f"{path:<18} {mode:<5} {med:>18.1f} {min(xs):>8.1f} {max(xs):>8.1f} {med / base:>7.2f}x")


if __name__ == "__main__":
    main()
