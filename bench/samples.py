"""What the load generator's phases share: the request body of one text, one timed request (`Sample`, with the
server's timing headers) and the percentile summary of a list of latencies."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import httpx
import numpy as np

from bench.harness import percentile
from bench.rawclient import RawClient, RawClientError

MODEL_NAME = "all-MiniLM-L6-v2"
ROUTES = {"tei": "/embed", "openai": "/v1/embeddings"}
CLIENTS = ("raw", "httpx")  # raw: bench/rawclient.py, a tenth of httpx's CPU a request (see there)
CLIENT_ERRORS = (httpx.HTTPError, RawClientError)


def make_client(kind: str, url: str, max_connections: int, timeout: float) -> RawClient | httpx.AsyncClient:
    """The load generators' HTTP client: `raw` or `httpx` (as every figure before session 19 was measured)."""
    if kind == "raw":
        return RawClient(url, max_connections=max_connections, timeout=timeout)
    if kind == "httpx":
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        return httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout, trust_env=False)
    raise ValueError(f"unknown client {kind!r}: one of {', '.join(CLIENTS)}")


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def body_for(route: str, text: str) -> bytes:
    """The request body of one text, encoded once so the client spends no time on it while timing."""
    payload = {"inputs": text} if route == "tei" else {"input": text, "model": MODEL_NAME}
    return json.dumps(payload).encode()


def _header_ms(response, name: str) -> float | None:
    value = response.headers.get(name)
    try:
        return float(value) / 1000 if value is not None else None
    except ValueError:
        return None


@dataclass
class Sample:
    """One finished request."""

    latency: float
    status: int
    tokens: int
    inference: float | None = None  # x-inference-time, seconds
    queue: float | None = None  # x-queue-time, seconds
    server_total: float | None = None  # x-total-time, seconds


async def send_one(client: RawClient | httpx.AsyncClient, path: str, body: bytes, tokens: int) -> Sample | tuple[str, str]:
    started = time.perf_counter()
    try:
        resp = await client.post(path, content=body, headers={"content-type": "application/json"})
        await resp.aread()
    except CLIENT_ERRORS as exc:
        return (type(exc).__name__, str(exc)[:200])
    latency = time.perf_counter() - started
    return Sample(latency, resp.status_code, tokens, _header_ms(resp, "x-inference-time"),
                  _header_ms(resp, "x-queue-time"), _header_ms(resp, "x-total-time"))


def summary(values: list[float]) -> dict:
    if not values:
        return {}
    return {"p50": _ms(percentile(values, 50)), "p90": _ms(percentile(values, 90)), "p99": _ms(percentile(values, 99)),
            "mean": _ms(float(np.mean(values))), "max": _ms(max(values))}
