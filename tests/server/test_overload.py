"""Issue 7: deadlines and disconnects drop queued work before compute (counted by reason), and a small
bounded overload against the real server sheds the excess with 429s and keeps every answer right."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from bench.overload import Connection, OpenLoop, Sampler, closed_loop, references
from bench.workload import make_texts
from tests.processes import free_port
from tests.server.test_failures import wait_for
from tests.support import MODEL, DummyEmbedder, dummy_server, post_and_walk_away, spawn_server, wait_healthy


def dropped(srv, reason: str) -> float:
    return srv.app.state.metrics.registry.get_sample_value("turboserve_requests_dropped_total", {"reason": reason})


def tokens(srv) -> float:
    return srv.app.state.metrics.registry.get_sample_value("turboserve_tokens_total") or 0.0


def kserve_body(*texts: str) -> dict:
    return {"inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": list(texts)}]}


def test_a_request_past_its_timeout_is_504_in_each_family_and_never_computed():
    embedder = DummyEmbedder()
    with dummy_server(embedder) as s, ThreadPoolExecutor(2) as pool, s.client() as c:
        engine = s.app.state.engine
        before = tokens(s)
        blocker = embedder.occupy(pool, c)  # the worker is busy: whatever comes next waits in the queue
        late = {"x-request-timeout-ms": "200"}
        started = time.monotonic()
        r = c.post("/v1/embeddings", json={"input": ["late one", "late two"], "model": MODEL}, headers=late)
        assert r.status_code == 504 and time.monotonic() - started >= 0.2
        assert r.json()["error"]["type"] == "timeout" and r.json()["error"]["code"] == "deadline_exceeded"
        r = c.post("/embed", json={"inputs": "late three"}, headers=late)
        assert r.status_code == 504 and r.json()["error_type"] == "Overloaded" and "200 ms" in r.json()["error"]
        r = c.post(f"/v2/models/{MODEL}/infer", json=kserve_body("late four"), headers=late)
        assert r.status_code == 504 and set(r.json()) == {"error"}
        # Withdrawn at once: their room is free while the worker is still busy, and they are counted.
        assert engine.queue.depth == 0
        assert dropped(s, "deadline") == 4 and dropped(s, "disconnect") == 0
        embedder.gate.set()
        assert blocker.result(10).status_code == 200
        assert c.post("/embed", json={"inputs": "after"}).status_code == 200
        computed = [ids for batch in embedder.batches for ids in batch]
        blocker_ids, after_ids = (engine.tokenizer.encode([t])[0].ids for t in ("blocker", "after"))
        assert computed == [blocker_ids, after_ids]  # none of the late ones
        assert tokens(s) - before == len(blocker_ids) + len(after_ids)
        text = c.get("/metrics").text
        assert 'turboserve_requests_dropped_total{reason="deadline"} 4.0' in text


@pytest.mark.parametrize("value", ["soon", "0", "-5", "nan"])
def test_bad_timeout_header_is_refused_in_each_family(client, value):
    headers = {"x-request-timeout-ms": value}
    r = client.post("/v1/embeddings", json={"input": "x", "model": MODEL}, headers=headers)
    assert r.status_code == 400 and "x-request-timeout-ms" in r.json()["error"]["message"]
    r = client.post("/embed", json={"inputs": "x"}, headers=headers)
    assert r.status_code == 422 and r.json()["error_type"] == "Validation"


def test_a_timeout_above_the_server_limit_is_capped_not_refused(client):
    r = client.post("/embed", json={"inputs": "x"}, headers={"x-request-timeout-ms": "1e12"})
    assert r.status_code == 200


def test_a_client_that_disconnects_has_its_queued_work_dropped():
    embedder = DummyEmbedder()
    with dummy_server(embedder) as s, ThreadPoolExecutor(2) as pool, s.client() as c:
        engine = s.app.state.engine
        blocker = embedder.occupy(pool, c)
        sock = post_and_walk_away(s.url, "/v1/embeddings", b'{"input": ["walked", "away"], "model": "%s"}' % MODEL.encode())
        wait_for(lambda: engine.queue.depth == 2)
        sock.close()
        # Both sequences leave the queue as soon as the route sees the disconnect, with the worker still busy.
        wait_for(lambda: dropped(s, "disconnect") == 2 and engine.queue.depth == 0)
        assert dropped(s, "deadline") == 0
        embedder.gate.set()
        assert blocker.result(10).status_code == 200
        gone = [engine.tokenizer.encode([t])[0].ids for t in ("walked", "away")]
        assert not any(ids in batch for batch in embedder.batches for ids in gone)
        assert s.app.state.metrics.registry.get_sample_value(
            "turboserve_requests_total", {"route": "/v1/embeddings", "status": "499"}) == 1
        # not a failure of any TEI kind (it was counted as validation: dashboards read it as bad input)
        assert s.app.state.metrics.registry.get_sample_value("te_request_failure", {"err": "validation"}) is None
        assert s.app.state.metrics.registry.get_sample_value("te_request_count", {"method": "batch"}) >= 1  # the name is right


QUEUE_BOUND = 8


@pytest.fixture
def spawned(tmp_path: Path):
    """`turboserve serve` (the embedded model, one torch thread) with a small queue bound."""
    port = free_port()
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({
        "server": {"port": port, "max_client_batch_size": QUEUE_BOUND},
        "model": {"warmup": False, "num_threads": 1},
        "scheduler": {"max_queue_size": QUEUE_BOUND, "cost_model_dir": str(tmp_path / "cost"), "profile_runs": 1,
                      "profile_max_tokens": 16},
    }))
    log = tmp_path / "serve.log"
    proc = spawn_server(config, log)
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}", log)
        yield port, proc
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.slow
def test_small_overload_sheds_with_429_and_every_answer_is_right(spawned):
    port, proc = spawned
    texts = make_texts(12, 8, 48, seed=3)

    async def scenario():
        refs = await references("127.0.0.1", port, texts)  # one at a time: unbatched answers
        capacity = await closed_loop("127.0.0.1", port, texts, 2.0, QUEUE_BOUND)
        loop = OpenLoop("overload", max(6 * capacity, 60.0), 4.0)
        sampler = Sampler("127.0.0.1", port, proc.pid, 0.1)
        stop = asyncio.Event()
        sampling = asyncio.ensure_future(sampler.run(stop))
        await loop.run("127.0.0.1", port, texts, refs, max_in_flight=64)
        stop.set()
        await sampling
        status, _, _ = await Connection("127.0.0.1", port).request("GET", "/health")
        after = OpenLoop("after", 5.0, 1.0)
        await after.run("127.0.0.1", port, texts, refs, max_in_flight=4)
        return loop, sampler, status, after

    loop, sampler, health, after = asyncio.run(scenario())
    statuses = [o.status for o in loop.outcomes]
    assert len(statuses) >= 200 and loop.not_sent == 0, "the load generator did not offer the load"
    assert set(statuses) <= {200, 429, 503}, [o.error or o.status for o in loop.outcomes if o.status not in (200, 429, 503)]
    assert statuses.count(429) > statuses.count(200) > 0  # overloaded, and still serving
    assert all(o.retry_after for o in loop.outcomes if o.status in (429, 503))
    assert all(o.correct for o in loop.outcomes if o.status == 200)
    depths = [d for _, d, _ in sampler.samples]
    assert len(depths) >= 10 and max(depths) <= QUEUE_BOUND
    assert health == 200
    assert [o.status for o in after.outcomes] == [200] * 5 and all(o.correct for o in after.outcomes)
