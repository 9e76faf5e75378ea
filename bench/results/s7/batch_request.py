"""Sequential /embed requests of 32 texts (16 tokens each) against two checkouts, alternating: client round
trip, x-total-time, x-inference-time (medians of 40 after 5 warm-ups) and the response size.

    .venv/bin/python bench/results/s7/batch_request.py OLD_CHECKOUT NEW_CHECKOUT
"""

import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from bench.harness import SpawnedServer  # noqa: E402
from bench.workload import make_texts  # noqa: E402

TEXTS = make_texts(32, 16, 16, 7)


def measure(checkout: str) -> tuple[float, float, float, int]:
    server = SpawnedServer([], startup_timeout=300, checkout=Path(checkout))
    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            for _ in range(5):
                client.post("/embed", json={"inputs": TEXTS})
            latency, total, inference = [], [], []
            for _ in range(40):
                started = time.perf_counter()
                r = client.post("/embed", json={"inputs": TEXTS})
                r.json()
                latency.append(time.perf_counter() - started)
                total.append(float(r.headers["x-total-time"]))
                inference.append(float(r.headers["x-inference-time"]))
        return statistics.median(latency) * 1000, statistics.median(total), statistics.median(inference), len(r.content)
    finally:
        server.stop()


for _ in range(2):
    for name, checkout in (("old", sys.argv[1]), ("new", sys.argv[2])):
        print(name, "client %.2f ms  x-total %.2f  x-inference %.2f  bytes %d" % measure(checkout))
