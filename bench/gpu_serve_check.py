"""The server on a device, checked through HTTP against sentence-transformers in float32 on the CPU, same weights.

    python3 bench/gpu_serve_check.py --model DIR --device cuda --dtype float16

Spawns `turboserve serve --model DIR --device D --dtype T` (bench/harness.py), sends 64 workload texts of 8-256
tokens as TEI /embed batches and one text a request on /v1/embeddings, and compares every vector with
SentenceTransformer(DIR, device="cpu") in float32 (normalized, as /embed answers): prints the minimum cosine and
exits 1 below --min-cosine (0.999, issue 4's bound for the encoder on a GPU). Also prints what /info reports, and
how many batches replayed CUDA graphs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import SpawnedServer  # noqa: E402
from bench.st_baseline import Baseline  # noqa: E402
from bench.workload import load_tokenizer, make_texts  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--texts", type=int, default=64)
    ap.add_argument("--min-cosine", type=float, default=0.999)
    args = ap.parse_args()
    texts = make_texts(args.texts, 8, 256, seed=7, tokenizer=load_tokenizer(args.model))  # MiniLM takes 256 at most

    want = Baseline(16, args.model).model.encode(texts, batch_size=16, normalize_embeddings=True)  # ST, CPU, fp32
    server = SpawnedServer(["--model", args.model, "--device", args.device, "--dtype", args.dtype], 240.0)
    try:
        server.start()
        with httpx.Client(base_url=server.url, trust_env=False, timeout=120) as client:
            info = client.get("/info").json()
            print("info:", {k: info.get(k) for k in ("model_id", "model_dtype", "device", "max_input_length", "max_batch_tokens")
                            if k in info} or info)
            got = []
            for start in range(0, len(texts), 16):
                r = client.post("/embed", json={"inputs": texts[start:start + 16]})
                r.raise_for_status()
                got.extend(r.json())
            single = [client.post("/v1/embeddings", json={"input": t, "model": info["model_id"]}).json()["data"][0]["embedding"]
                      for t in texts[:8]]
            graphs = client.get("/info").json().get("scheduler", {}).get("cuda_graphs")
            # On a GPU the small batches above replay CUDA graphs (models/graphs.py): say whether they did.
            print("cuda graphs:", "not used on this device" if graphs is None else
                  {k: graphs.get(k) for k in ("on", "replays", "eager_batches", "capture_seconds", "off_reason")})
    finally:
        server.stop()
    got = np.asarray(got, dtype=np.float64)
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    single = np.asarray(single, dtype=np.float64)
    cos1 = (single * want[:8]).sum(1) / (np.linalg.norm(single, axis=1) * np.linalg.norm(want[:8], axis=1))
    ok = cos.min() >= args.min_cosine and cos1.min() >= args.min_cosine
    print(f"{args.device} {args.dtype}: /embed {len(got)} texts, cosine to sentence-transformers float32 on CPU: min "
          f"{cos.min():.6f} mean {cos.mean():.6f}; /v1/embeddings one a request: min {cos1.min():.6f}  "
          f"{'OK' if ok else 'BELOW ' + str(args.min_cosine)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
