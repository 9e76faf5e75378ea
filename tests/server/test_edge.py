"""The edge of every request: timing headers, request ids, API key, body limit, metrics."""

from __future__ import annotations

import socket

import httpx
import pytest

from tests.support import MODEL, dummy_server

TIMING_HEADERS = ("x-request-id", "x-total-time", "x-queue-time", "x-inference-time", "x-tokenization-time")


@pytest.mark.parametrize("method,path,body", [
    ("POST", "/embed", {"inputs": "hi"}),
    ("POST", "/v1/embeddings", {"input": "hi", "model": MODEL}),
    ("POST", "/embed", {"inputs": ""}),
    ("GET", "/health", None),
    ("GET", "/metrics", None),
    ("GET", "/no/such/route", None),
])
def test_timing_headers_on_every_response(client, method, path, body):
    r = client.request(method, path, json=body)
    for name in TIMING_HEADERS:
        assert name in r.headers, (name, r.status_code)
    assert float(r.headers["x-total-time"]) >= 0


def test_queue_and_inference_time_are_filled_for_model_work(client):
    r = client.post("/embed", json={"inputs": "timed"})
    assert float(r.headers["x-inference-time"]) > 0
    assert float(r.headers["x-total-time"]) >= float(r.headers["x-inference-time"])


def test_request_id_is_echoed(client):
    r = client.post("/embed", json={"inputs": "hi"}, headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    assert len(client.get("/health").headers["x-request-id"]) == 32


def test_metrics_names_and_counts(client):
    client.post("/embed", json={"inputs": ["a", "b"]})
    client.post("/embed", json={"inputs": ""})
    text = client.get("/metrics").text
    for name in ("turboserve_request_duration_seconds_bucket", "turboserve_queue_wait_seconds_bucket",
                 "turboserve_inference_duration_seconds_bucket", "turboserve_batch_size_bucket",
                 "turboserve_batch_tokens_bucket", "turboserve_tokens_total", "turboserve_queue_depth",
                 "turboserve_requests_dropped_total"):
        assert name in text, name
    assert 'turboserve_requests_total{route="/embed",status="200"}' in text
    assert 'turboserve_requests_total{route="/embed",status="400"}' in text


def _sample(text: str, name: str) -> float:
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith(name + " ")))


def test_planning_time_is_measured(client):
    before = client.get("/metrics").text
    client.post("/embed", json={"inputs": ["one", "two", "three"]})
    after = client.get("/metrics").text
    plans = _sample(after, "turboserve_scheduler_plan_seconds_count") - _sample(before, "turboserve_scheduler_plan_seconds_count")
    assert plans >= 1  # at least one plan for the batch that answered it
    assert _sample(after, "turboserve_scheduler_plan_seconds_sum") > _sample(before, "turboserve_scheduler_plan_seconds_sum")
    pending = _sample(after, "turboserve_scheduler_plan_pending_sum") - _sample(before, "turboserve_scheduler_plan_pending_sum")
    assert 3 <= pending <= 3 * plans  # the three sequences were pending when it planned


def test_payload_limit_declared_and_chunked():
    with dummy_server(server={"payload_limit": 2048}) as s, s.client() as c:
        big = {"inputs": ["word " * 300]}
        r = c.post("/embed", json=big)
        assert r.status_code == 413 and r.json()["error_type"] == "Validation"
        r = c.post("/v1/embeddings", content=(b"x" for _ in range(3000)), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
        assert c.post("/embed", json={"inputs": "small"}).status_code == 200


def test_api_key():
    with dummy_server(server={"api_key": "s3cret"}) as s:
        with s.client() as c:
            assert c.get("/health").status_code == 200
            assert c.get("/v2/health/ready").status_code == 200
            assert c.get("/metrics").status_code == 200
            r = c.post("/v1/embeddings", json={"input": "x", "model": MODEL})
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
            r = c.post("/embed", json={"inputs": "x"}, headers={"authorization": "Bearer wrong"})
            assert r.status_code == 401 and r.json()["error_type"] == "Unauthorized"
            assert c.get(f"/v2/models/{MODEL}").status_code == 401
            assert c.get("/info", headers={"authorization": "Bearer s3cret"}).status_code == 200
        with s.client(headers={"authorization": "Bearer s3cret"}) as c:
            assert c.post("/embed", json={"inputs": "x"}).status_code == 200
        from openai import AuthenticationError, OpenAI  # noqa: PLC0415

        good = OpenAI(base_url=s.url + "/v1", api_key="s3cret", max_retries=0)
        assert len(good.embeddings.create(model=MODEL, input="x").data) == 1
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=s.url + "/v1", api_key="bad", max_retries=0).embeddings.create(model=MODEL, input="x")


def test_unexpected_exception_is_500_with_request_id_and_no_traceback(srv, client, monkeypatch):
    def explode(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(srv.app.state.engine.tokenizer, "encode", explode)
    r = client.post("/v1/embeddings", json={"input": "x", "model": MODEL}, headers={"x-request-id": "rid-9"})
    assert r.status_code == 500
    body = r.json()
    assert "rid-9" in body["error"]["message"]
    assert "secret internal detail" not in r.text and "Traceback" not in r.text
    monkeypatch.undo()
    assert client.post("/embed", json={"inputs": "fine again"}).status_code == 200


def test_garbage_on_the_socket_does_not_hurt(srv, client):
    host, port = srv.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        sock.recv(1024)
    assert client.post("/embed", json={"inputs": "alive"}).status_code == 200


def test_cors_off_by_default_and_on_when_configured(client):
    r = client.options("/embed", headers={"origin": "http://example.com", "access-control-request-method": "POST"})
    assert "access-control-allow-origin" not in r.headers
    with dummy_server(server={"cors_origins": ["http://example.com"]}) as s, httpx.Client(base_url=s.url) as c:
        r = c.options("/embed", headers={"origin": "http://example.com", "access-control-request-method": "POST"})
        assert r.headers.get("access-control-allow-origin") == "http://example.com"
