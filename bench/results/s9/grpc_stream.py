"""One tritonclient gRPC connection sending single-text requests: one unary call after another (each waits for its
answer, so nothing batches) against the same requests on one stream (ModelStreamInfer: all in flight, answered as
they finish, so the scheduler batches them). Texts of the loadgen workload (8-256 tokens); alternating rounds.

    .venv/bin/python bench/results/s9/grpc_stream.py [--requests 200] [--rounds 3]
"""

import argparse
import queue
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as tgrpc

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from bench.harness import SpawnedServer, free_port  # noqa: E402
from bench.workload import make_texts  # noqa: E402

MODEL = "all-MiniLM-L6-v2"


def inputs(texts):
    out = []
    for t in texts:
        inp = tgrpc.InferInput("text", [1], "BYTES")
        inp.set_data_from_numpy(np.array([t.encode()], dtype=object))
        out.append(inp)
    return out


def unary(client, items) -> tuple[float, dict]:
    started, answers = time.perf_counter(), {}
    for i, inp in enumerate(items):
        answers[str(i)] = client.infer(MODEL, [inp], request_id=str(i)).as_numpy("embedding")
    return time.perf_counter() - started, answers


def streamed(client, items) -> tuple[float, dict]:
    done: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: done.put((result, error)))
    started, answers = time.perf_counter(), {}
    for i, inp in enumerate(items):
        client.async_stream_infer(MODEL, [inp], request_id=str(i))
    for _ in items:
        result, error = done.get(timeout=300)
        assert error is None, error
        answers[result.get_response().id] = result.as_numpy("embedding")
    seconds = time.perf_counter() - started
    client.stop_stream()
    return seconds, answers


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    port = free_port()
    server = SpawnedServer(["--grpc-port", str(port)], startup_timeout=300)
    server.start()
    try:
        client = tgrpc.InferenceServerClient(f"127.0.0.1:{port}")
        items = inputs(make_texts(args.requests, 8, 256, seed=5))
        unary(client, items[:10])
        rates = {"unary": [], "stream": []}
        for _ in range(args.rounds):
            for name, run in (("unary", unary), ("stream", streamed)):
                seconds, answers = run(client, items)
                rates[name].append(len(items) / seconds)
                if name == "unary":
                    want = answers
                else:
                    diff = max(float(np.abs(answers[k] - want[k]).max()) for k in want)
                    print(f"  stream answers vs unary: max |diff| {diff:.1e}", flush=True)
            print(f"round: unary {rates['unary'][-1]:.1f} req/s, stream {rates['stream'][-1]:.1f} req/s", flush=True)
        u, s = statistics.median(rates["unary"]), statistics.median(rates["stream"])
        print(f"median over {args.rounds} rounds, {args.requests} requests: unary {u:.1f} req/s, stream {s:.1f} req/s: {s / u:.2f}x")
        client.close()
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
