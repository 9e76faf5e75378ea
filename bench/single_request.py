"""The load generator's single phase: sequential single-request latency of one short text against the model's
raw forward time, measured in the same process (bench/loadgen.py --single)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import httpx

from bench.harness import CpuMeter
from bench.samples import ROUTES, Sample, body_for, send_one, summary


async def run_single(url: str, route: str, text: str, count: int, timeout: float, server_pid: int | None = None,
                     block: int = 10, gap_s: float = 0.005) -> dict:
    """Sequential single-request latency of one short text against the model's raw forward time.

    The model is also loaded in this process (models.runtime.load_model) and timed on the same token
    ids with `emb.embed([ids])`. Requests and in-process forwards alternate in blocks of `block`, so
    both see the same machine state; the server is idle while the forward runs. Reported:
    client latency, the server's x-total-time and x-inference-time headers, `forward_ms` (forwards back
    to back: the reference of the overhead), `forward_paced_ms` (each forward after `gap_s` idle, as the
    server's worker idles between sequential requests and torch's OpenMP threads leave their spin-wait),
    and GET /health latency (the HTTP floor: client + uvicorn + loopback, no model work).
    """
    from models.runtime import load_model

    emb, tok, _info = load_model(None)
    ids = tok.encode([text])[0].ids
    path = ROUTES[route]
    body = body_for(route, text)
    latencies, inference, queue, server_total, forward, paced, errors = [], [], [], [], [], [], Counter()
    async with httpx.AsyncClient(base_url=url, timeout=timeout, trust_env=False) as client:
        for _ in range(10):  # warm-up, untimed
            await send_one(client, path, body, 0)
            emb.embed([ids])
        meter = CpuMeter((server_pid,) if server_pid else (), judge=bool(server_pid))
        cpu_start = meter.snapshot()
        done = 0
        while done < count:
            n = min(block, count - done)
            for _ in range(n):
                out = await send_one(client, path, body, 0)
                if isinstance(out, Sample) and out.status == 200:
                    latencies.append(out.latency)
                    if out.inference is not None:
                        inference.append(out.inference)
                    if out.queue is not None:
                        queue.append(out.queue)
                    if out.server_total is not None:
                        server_total.append(out.server_total)
                else:
                    errors[f"HTTP {out.status}" if isinstance(out, Sample) else out[0]] += 1
            await asyncio.sleep(0.05)  # let the server's threads go quiet
            emb.embed([ids])
            for _ in range(n):
                started = time.perf_counter()
                emb.embed([ids])
                forward.append(time.perf_counter() - started)
            for _ in range(n):
                await asyncio.sleep(gap_s)  # nothing else runs on this loop meanwhile
                started = time.perf_counter()
                emb.embed([ids])
                paced.append(time.perf_counter() - started)
            await asyncio.sleep(0.05)  # and this process's OpenMP threads
            done += n
        cpu = meter.since(cpu_start)
        health = []
        for _ in range(count):
            started = time.perf_counter()
            resp = await client.get("/health")
            if resp.status_code == 200:
                health.append(time.perf_counter() - started)
    return {"count": count, "ok": len(latencies), "tokens": len(ids), "block": block, "errors": dict(errors),
            "client_latency_ms": summary(latencies), "server_inference_ms": summary(inference),
            "server_queue_ms": summary(queue), "server_total_ms": summary(server_total), "health_latency_ms": summary(health),
            "forward_ms": summary(forward), "paced_gap_ms": gap_s * 1000, "forward_paced_ms": summary(paced),
            "cpu": cpu}
