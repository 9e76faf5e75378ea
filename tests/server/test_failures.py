"""Overload, not-ready, failing batches, timeouts and disconnects: every admitted request is answered
or fails explicitly, and the server keeps serving."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.support import MODEL, DummyEmbedder, dummy_server, post_and_walk_away


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


def metric(srv, name: str, labels: dict[str, str] | None = None) -> float:
    value = srv.app.state.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


def test_not_ready_until_loaded_then_ready():
    loaded = threading.Event()
    with dummy_server(wait_ready=False, loader_kwargs={"ready": loaded}) as s, s.client() as c:
        r = c.get("/health")
        assert r.status_code == 503 and r.json()["error_type"] == "Unhealthy"
        assert c.get("/v2/health/live").status_code == 200
        assert c.get("/v2/health/ready").status_code == 503
        r = c.post("/v1/embeddings", json={"input": "x", "model": MODEL})
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        assert "retry-after" in r.headers
        loaded.set()
        s.app.state.loader_thread.join(10)
        assert c.get("/health").status_code == 200
        assert c.post("/embed", json={"inputs": "x"}).status_code == 200


def test_failed_batch_fails_only_its_requests():
    embedder = DummyEmbedder()
    with dummy_server(embedder) as s, s.client() as c:
        embedder.fail_next = True
        r = c.post("/v1/embeddings", json={"input": "boom", "model": MODEL})
        assert r.status_code == 500 and r.json()["error"]["code"] == "backend_error"
        assert "injected failure" not in r.text
        assert c.post("/embed", json={"inputs": "next one"}).status_code == 200
        embedder.fail_next = True
        r = c.post("/embed", json={"inputs": "boom"})
        assert r.status_code == 424 and r.json()["error_type"] == "Backend"
        assert c.get("/health").status_code == 200
        assert metric(s, "turboserve_batch_failures_total") == 2


def test_queue_full_is_429_with_retry_after_and_recovers():
    embedder = DummyEmbedder()
    with dummy_server(embedder, server={"max_client_batch_size": 2}, scheduler={"max_queue_size": 2, "max_batch_requests": 1}) as s, \
            ThreadPoolExecutor(4) as pool, s.client() as c:
        running = embedder.occupy(pool, c, "first")  # the worker holds "first"; the queue is empty again
        queued = [pool.submit(c.post, "/embed", json={"inputs": f"q{i}"}) for i in range(2)]
        engine = s.app.state.engine
        wait_for(lambda: engine.queue.depth == 2)
        r = c.post("/embed", json={"inputs": "one too many"})
        assert r.status_code == 429 and r.json()["error_type"] == "Overloaded"
        assert r.headers["retry-after"] == "1"
        r = c.post("/v1/embeddings", json={"input": ["a"], "model": MODEL})
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        # As TEI's router counts a refused permit: a request, and an "overloaded" failure (dashboards alert on it).
        assert metric(s, "te_request_failure", {"err": "overloaded"}) == 2
        assert metric(s, "te_request_count", {"method": "single"}) >= 2 + 1
        embedder.gate.set()
        assert running.result(10).status_code == 200
        assert [f.result(10).status_code for f in queued] == [200, 200]
        assert c.post("/embed", json={"inputs": "after"}).status_code == 200


def test_a_cancelled_request_is_no_tei_inference_failure():
    """A request whose task is cancelled (a /vertex instance whose sibling was refused, a gRPC deadline) failed
    no model: te_request_failure{err="inference"} stays 0 (it counted each)."""
    embedder = DummyEmbedder()
    with dummy_server(embedder) as s, ThreadPoolExecutor(2) as pool, s.client() as c:
        blocker = embedder.occupy(pool, c)
        r = c.post("/vertex", json={"instances": [{"inputs": "fine"}, {"inputs": "also fine"}, {"inputs": "w " * 200}]})
        assert r.status_code == 413
        embedder.gate.set()
        blocker.result(10)
        assert metric(s, "te_request_failure", {"err": "inference"}) == 0


def test_a_504_says_whether_any_of_the_request_was_computed():
    embedder = DummyEmbedder()
    with dummy_server(embedder, server={"request_timeout_s": 0.3}) as s, ThreadPoolExecutor(2) as pool, s.client() as c:
        blocker = embedder.occupy(pool, c)
        late = c.post("/embed", json={"inputs": ["too", "late"]})
        assert late.status_code == 504 and "the request was not computed" in late.json()["error"]
        embedder.gate.set()
        blocker.result(10)
    with dummy_server(embedder, server={"request_timeout_s": 0.3}, scheduler={"max_batch_requests": 1}) as s, \
            ThreadPoolExecutor(2) as pool, s.client() as c:
        embedder.gate.clear()
        embedder.entered.clear()
        started = pool.submit(c.post, "/embed", json={"inputs": ["first", "second"]})  # "first" runs, "second" waits
        assert embedder.entered.wait(10)
        r = started.result(10)
        assert r.status_code == 504 and "1 of its 2 inputs had left the queue" in r.json()["error"], r.text
        embedder.gate.set()


def test_request_timeout_is_504_and_never_computed():
    embedder = DummyEmbedder()
    with dummy_server(embedder, server={"request_timeout_s": 0.3}) as s, ThreadPoolExecutor(2) as pool, s.client() as c:
        blocker = embedder.occupy(pool, c)
        late = c.post("/embed", json={"inputs": "too late"})
        assert late.status_code == 504
        embedder.gate.set()
        blocker.result(10)
        wait_for(lambda: metric(s, "turboserve_requests_dropped_total", {"reason": "deadline"}) == 1)
        late_ids = s.app.state.engine.tokenizer.encode(["too late"])[0].ids
        assert all(late_ids not in batch for batch in embedder.batches)


def test_disconnected_client_is_dropped_before_compute():
    embedder = DummyEmbedder()
    with dummy_server(embedder) as s, ThreadPoolExecutor(2) as pool, s.client() as c:
        blocker = embedder.occupy(pool, c)
        engine = s.app.state.engine
        sock = post_and_walk_away(s.url, "/embed", b'{"inputs": "walked away"}')
        wait_for(lambda: engine.queue.depth == 1)
        waiting = engine.queue._pending[0]
        sock.close()
        # The route notices the disconnect and cancels; the worker then skips the item.
        wait_for(waiting.future.cancelled)
        embedder.gate.set()
        assert blocker.result(10).status_code == 200
        wait_for(lambda: metric(s, "turboserve_requests_dropped_total", {"reason": "disconnect"}) == 1)
        gone_ids = engine.tokenizer.encode(["walked away"])[0].ids
        assert all(gone_ids not in batch for batch in embedder.batches)
        assert c.post("/embed", json={"inputs": "next"}).status_code == 200


def test_requests_are_batched_under_the_limits():
    # A batch's fixed time, which the profile measures: an instant dummy gave dp a cost model of timer noise, by which
    # two batches of two could price below one of four (half the runs on a faster VM).
    embedder = DummyEmbedder(delay_s=0.002)
    with dummy_server(embedder, scheduler={"max_batch_requests": 4, "max_batch_tokens": 64}) as s, \
            ThreadPoolExecutor(12) as pool, httpx.Client(base_url=s.url, timeout=30) as c:
        first = embedder.occupy(pool, c, "first")
        rest = [pool.submit(c.post, "/embed", json={"inputs": f"request number {i}"}) for i in range(10)]
        wait_for(lambda: s.app.state.engine.queue.depth == 10)
        embedder.gate.set()
        assert first.result(10).status_code == 200
        assert all(f.result(10).status_code == 200 for f in rest)
        later = embedder.batches[1:]
        assert sum(len(b) for b in later) == 10
        assert max(len(b) for b in later) == 4  # batched, and never over the request cap
        assert all(sum(len(ids) for ids in b) <= 64 for b in later)


def test_a_crashed_worker_fails_waiting_requests_and_refuses_new_ones():
    embedder = DummyEmbedder()
    with dummy_server(embedder) as s, ThreadPoolExecutor(2) as pool, s.client() as c:
        engine = s.app.state.engine
        blocker = embedder.occupy(pool, c)
        waiting = pool.submit(c.post, "/embed", json={"inputs": "waiting"})
        wait_for(lambda: engine.queue.depth == 1)

        def broken_observer(*args):
            raise RuntimeError("bug in the loop")

        engine.worker.observer.batch_done = broken_observer  # the loop itself fails after this batch
        embedder.gate.set()
        blocker.result(10)
        r = waiting.result(10)
        assert r.status_code == 424 and r.json()["error_type"] == "Backend"  # failed, not left hanging
        wait_for(lambda: not engine.worker.alive)
        assert c.get("/health").status_code == 503
        r = c.post("/v1/embeddings", json={"input": "x", "model": MODEL})
        assert r.status_code == 503 and "worker has stopped" in r.json()["error"]["message"]


def test_planner_failure_falls_back_and_keeps_serving(monkeypatch):
    import scheduler.queue  # noqa: PLC0415

    real_plan = scheduler.queue.plan

    def flaky(requests, limits, cost, now, config):
        if config.name == "dp":
            raise RuntimeError("planner bug")
        return real_plan(requests, limits, cost, now, config)

    with dummy_server() as s, s.client() as c:
        monkeypatch.setattr(scheduler.queue, "plan", flaky)
        assert c.post("/embed", json={"inputs": ["a", "b"]}).status_code == 200
        assert s.app.state.engine.worker.alive


def test_a_dead_worker_fails_kserve_readiness_and_liveness():
    """A pod whose batching worker died must leave the load balancer and be restarted: /v2/health/ready and
    /v2/health/live (the probes deploy/k8s uses) answer 503, as /health does."""
    with dummy_server() as s, s.client() as c:
        assert c.get("/v2/health/ready").status_code == 200 and c.get("/v2/health/live").status_code == 200
        s.app.state.engine.queue.close()  # the worker's loop ends: as a worker that died
        wait_for(lambda: not s.app.state.engine.healthy)
        for path in ("/health", "/v2/health/ready", "/v2/health/live"):
            r = c.get(path)
            assert r.status_code == 503 and "worker has stopped" in r.text, (path, r.text)


def test_scheduler_times_past_any_clock_are_refused():
    """inf or 1e13 ms passed validation and crashed the worker at its first wait (time_t overflow)."""
    import pytest  # noqa: PLC0415
    from pydantic import ValidationError  # noqa: PLC0415

    from configs.settings import Settings  # noqa: PLC0415

    for field, value in (("max_queue_delay_ms", float("inf")), ("max_queue_delay_ms", 1e13), ("max_wait_ms", float("inf")),
                         ("slo_ms", float("inf")), ("late_grace_slos", float("inf"))):
        with pytest.raises(ValidationError):
            Settings(scheduler={field: value})
    with pytest.raises(ValidationError):
        Settings(server={"request_timeout_s": float("inf")})
