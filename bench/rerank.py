"""Re-ranking throughput: `turboserve serve` with a cross-encoder against sentence-transformers' CrossEncoder.predict
in this process, on the same (query, document) pairs.

The model is built here with seeded random weights in the shape of cross-encoder/ms-marco-MiniLM-L-6-v2 (BERT,
hidden 384, 6 layers; the embedded MiniLM's tokenizer): nothing is downloaded, and speed does not depend on the
weights' values. Queries and documents are sentences of the standard library's docstrings (bench/workload.py's
corpus), documents of 8-120 words. The server gets `--requests` POST /rerank calls of `--docs` documents each,
`--concurrency` at a time; the peer predicts the same pairs with batch_size 32. Both report pairs a second, and
the largest score difference between them (sigmoid scores).

    .venv/bin/python bench/rerank.py [--requests 24] [--docs 32] [--concurrency 4] [--in-process] [--out bench/out]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import SpawnedServer, machine_info  # noqa: E402
from bench.workload import corpus_words  # noqa: E402


def workload(requests: int, docs: int, seed: int = 0) -> list[tuple[str, list[str]]]:
    rng = random.Random(seed)
    words = corpus_words()

    def text(lo: int, hi: int) -> str:
        n = rng.randint(lo, hi)
        start = rng.randrange(len(words) - n)
        return " ".join(words[start:start + n])

    return [(text(4, 16), [text(8, 120) for _ in range(docs)]) for _ in range(requests)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--docs", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--in-process", action="store_true", help="also time our model alone (no server) at batches of 32/64/128")
    args = ap.parse_args()

    from tests.cross_encoders import cross_encoder_folder  # noqa: PLC0415

    work = workload(args.requests, args.docs)
    pairs = [(q, d) for q, docs in work for d in docs]
    with tempfile.TemporaryDirectory() as tmp:
        folder = cross_encoder_folder(Path(tmp), size="minilm")
        server = SpawnedServer(["--model", str(folder)], startup_timeout=180)
        server.start()
        try:
            with httpx.Client(base_url=server.url, timeout=300) as client:
                def call(item):
                    q, docs = item
                    r = client.post("/rerank", json={"query": q, "texts": docs})
                    r.raise_for_status()
                    return sorted(r.json(), key=lambda x: x["index"])

                call(work[0])  # warm-up
                started = time.perf_counter()
                with ThreadPoolExecutor(args.concurrency) as pool:
                    answers = list(pool.map(call, work))
                served_s = time.perf_counter() - started
        finally:
            server.stop()
        served = np.array([x["score"] for answer in answers for x in answer])

        alone = in_process(folder, pairs) if args.in_process else {}

        from sentence_transformers import CrossEncoder  # noqa: PLC0415

        peer = CrossEncoder(str(folder), device="cpu")
        peer.predict(pairs[:64], batch_size=32)  # warm-up
        started = time.perf_counter()
        want = peer.predict(pairs, batch_size=32)
        peer_s = time.perf_counter() - started

    report = {"machine": machine_info(), "command": " ".join(sys.argv), "pairs": len(pairs), "requests": args.requests,
              "docs": args.docs, "concurrency": args.concurrency, "server_pairs_per_s": len(pairs) / served_s,
              "cross_encoder_pairs_per_s": len(pairs) / peer_s, "ratio": peer_s / served_s,
              "max_score_diff": float(np.abs(served - want).max()), "in_process_pairs_per_s": alone}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rerank.json").write_text(json.dumps(report, indent=2))
    print(f"{len(pairs)} pairs: turboserve /rerank {report['server_pairs_per_s']:.1f} pairs/s "
          f"(concurrency {args.concurrency}), CrossEncoder.predict {report['cross_encoder_pairs_per_s']:.1f} pairs/s: "
          f"{report['ratio']:.2f}x; largest score difference {report['max_score_diff']:.2e}")
    if alone:
        print("our model alone, pairs/s by batch size:", ", ".join(f"{b}: {v:.1f}" for b, v in alone.items()))
    return 0


def in_process(folder: Path, pairs: list[tuple[str, str]]) -> dict[int, float]:
    """Pairs a second of our packed model in this process (no server, no scheduler), batches in the given order."""
    from models.runtime import load_model  # noqa: PLC0415

    embedder, tokenizer, _ = load_model(str(folder))
    ids = [e.ids for e in tokenizer.encode_pairs(pairs)]
    embedder.embed(ids[:32])  # warm-up
    out = {}
    for size in (32, 64, 128):
        started = time.perf_counter()
        for i in range(0, len(ids), size):
            embedder.embed(ids[i:i + size])
        out[size] = len(ids) / (time.perf_counter() - started)
    return out


if __name__ == "__main__":
    sys.exit(main())
