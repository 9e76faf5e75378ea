"""KServe v2 over gRPC against KServe v2 over HTTP, same server, same model, tritonclient on both sides:
sequential calls of 1 and of 32 texts (16 tokens each), in alternating blocks of 20, 5 ms apart; client p50.

    .venv/bin/python bench/results/s7/grpc_vs_http.py [--calls 200]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from bench.harness import SpawnedServer, free_port  # noqa: E402
from bench.workload import make_texts  # noqa: E402

MODEL = "all-MiniLM-L6-v2"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args()
    grpc_port = free_port()
    server = SpawnedServer(["--grpc-port", str(grpc_port)], startup_timeout=300)
    server.start()
    try:
        clients = {"grpc": (tgrpc, tgrpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")),
                   "http": (thttp, thttp.InferenceServerClient(server.url.removeprefix("http://")))}
        for n in (1, 32):
            texts = np.array([t.encode() for t in make_texts(n, 16, 16, 3)], dtype=object)
            calls, times = {}, {name: [] for name in clients}
            for name, (module, client) in clients.items():
                inp = module.InferInput("text", [n], "BYTES")
                inp.set_data_from_numpy(texts)
                calls[name] = (client, inp)
                for _ in range(10):
                    client.infer(MODEL, [inp])
            for _ in range(args.calls // 20):
                for name, (client, inp) in calls.items():
                    for _ in range(20):
                        started = time.perf_counter()
                        client.infer(MODEL, [inp])
                        times[name].append((time.perf_counter() - started) * 1000)
                        time.sleep(0.005)
            print(f"{n:2} texts a call: " + "  ".join(f"{name} p50 {statistics.median(t):.2f} ms" for name, t in times.items()),
                  flush=True)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
