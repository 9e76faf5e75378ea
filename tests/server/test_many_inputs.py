"""Requests of several inputs end to end: one client request for the planner on every route (WorkItem.group), and
a request that fails part-way is failed whole, the rest of it never computed."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from tests.server.test_failures import metric, wait_for
from tests.support import DummyEmbedder, dummy_server, expected_vector


class FailsOnce(DummyEmbedder):
    """Fails the first batch that holds one of `poison`'s token ids (after counting it in `batches`)."""

    poison: set[int] = set()

    def embed(self, sequences, per_token=None):
        out = super().embed(sequences, per_token)
        if any(self.poison.intersection(ids) for ids in sequences):
            self.poison = set()
            raise RuntimeError("injected failure")
        return out


def test_a_failed_batch_fails_the_whole_request_and_the_rest_of_it_is_never_computed():
    embedder = FailsOnce()
    with dummy_server(embedder, scheduler={"max_batch_requests": 1}) as s, ThreadPoolExecutor(4) as pool, s.client() as c:
        engine = s.app.state.engine
        words = ["alpha", "beta", "gamma", "delta"]
        ids = {w: engine.tokenizer.encode([w])[0].ids for w in words}
        embedder.poison = {ids[w][1] for w in words}
        blocker = embedder.occupy(pool, c)  # what comes next waits in the queue: one sequence a batch after it
        failing = pool.submit(c.post, "/embed", json={"inputs": words})
        wait_for(lambda: engine.queue.depth == 4)
        other = pool.submit(c.post, "/v1/embeddings", json={"input": ["one", "two"]})
        wait_for(lambda: engine.queue.depth == 6)
        embedder.gate.set()
        assert blocker.result(10).status_code == 200
        r = failing.result(10)
        assert r.status_code == 424 and r.json()["error_type"] == "Backend", r.text
        r = other.result(10)  # a request of several inputs beside it is answered whole
        assert r.status_code == 200, r.text
        got = np.array([d["embedding"] for d in r.json()["data"]])
        want = np.stack([expected_vector(engine.tokenizer.encode([t])[0].ids) for t in ("one", "two")])
        np.testing.assert_allclose(got, want / np.linalg.norm(want, axis=1, keepdims=True), rtol=1e-5)
        # One of its sequences ran (and failed); the three still queued were dropped, not computed after the answer.
        ran = [seq for batch in embedder.batches for seq in batch if seq in ids.values()]
        assert len(ran) == 1, embedder.batches
        wait_for(lambda: metric(s, "turboserve_requests_dropped_total", {"reason": "failed"}) == 3)
        assert engine.queue.depth == 0 and metric(s, "turboserve_batch_failures_total") == 1
        assert c.post("/embed", json={"inputs": words}).status_code == 200


def test_vertex_instances_are_one_client_request_for_the_planner():
    """/vertex runs each instance through Engine.run: they share one group, as the inputs of one /embed do."""
    embedder = DummyEmbedder()
    with dummy_server(embedder) as s, ThreadPoolExecutor(4) as pool, s.client() as c:
        engine = s.app.state.engine
        blocker = embedder.occupy(pool, c)
        vertex = pool.submit(c.post, "/vertex", json={"instances": [{"inputs": "a"}, {"inputs": "b"}, {"inputs": ["c", "d"]}]})
        wait_for(lambda: engine.queue.depth == 4)
        embed = pool.submit(c.post, "/embed", json={"inputs": ["e", "f"]})
        wait_for(lambda: engine.queue.depth == 6)
        group = {engine.tokenizer.decode([it.ids])[0]: it.group for it in engine.queue._pending}
        embedder.gate.set()
        assert blocker.result(10).status_code == 200
        assert vertex.result(10).status_code == 200 and embed.result(10).status_code == 200
        # a lone instance is the whole request: one input, no group
        blocker = embedder.occupy(pool, c)
        single = pool.submit(c.post, "/vertex", json={"instances": [{"inputs": "g"}]})
        wait_for(lambda: engine.queue.depth == 1)
        lone = engine.queue._pending[0].group
        embedder.gate.set()
        assert blocker.result(10).status_code == 200 and single.result(10).status_code == 200
    assert group["a"] == group["b"] == group["c"] == group["d"] >= 0
    assert group["e"] == group["f"] >= 0 and group["e"] != group["a"]
    assert lone == -1


def test_vertex_instances_withdrawn_for_a_refused_sibling_are_counted_as_failed_not_disconnected():
    """A /vertex request whose last instance finds the queue full is a 429 whole: the instances already queued are
    withdrawn, and counted under `failed` (their client is still there)."""
    embedder = DummyEmbedder()
    with dummy_server(embedder, server={"max_client_batch_size": 3}, scheduler={"max_queue_size": 3}) as s, \
            ThreadPoolExecutor(4) as pool, s.client() as c:
        engine = s.app.state.engine
        blocker = embedder.occupy(pool, c)
        queued = pool.submit(c.post, "/embed", json={"inputs": "x"})
        wait_for(lambda: engine.queue.depth == 1)
        r = c.post("/vertex", json={"instances": [{"inputs": "a"}, {"inputs": "b"}, {"inputs": "c"}]})
        assert r.status_code == 429 and r.json()["error_type"] == "Overloaded", r.text
        assert engine.queue.depth == 1
        assert metric(s, "turboserve_requests_dropped_total", {"reason": "failed"}) == 2
        assert metric(s, "turboserve_requests_dropped_total", {"reason": "disconnect"}) == 0
        embedder.gate.set()
        assert blocker.result(10).status_code == 200 and queued.result(10).status_code == 200


def test_vertex_instances_past_max_client_batch_size_in_all_are_a_413_not_a_429():
    """Each instance fits max_client_batch_size, but together they pass it, and here max_queue_size too: no wait
    could ever admit them, so the answer is TEI's 413 before any work, not a 429 that invites a retry."""
    embedder = DummyEmbedder()
    with dummy_server(embedder, server={"max_client_batch_size": 4}, scheduler={"max_queue_size": 4}) as s, \
            s.client() as c:
        r = c.post("/vertex", json={"instances": [{"inputs": ["a", "b", "c"]}, {"inputs": ["d", "e"]}]})
        assert r.status_code == 413 and r.json()["error_type"] == "Validation", r.text
        assert "5 inputs" in r.json()["error"] and "max_client_batch_size=4" in r.json()["error"], r.text
        assert "retry-after" not in r.headers
        assert embedder.batches == [] and metric(s, "turboserve_requests_dropped_total", {"reason": "failed"}) == 0
        r = c.post("/vertex", json={"instances": [{"inputs": ["a", "b", "c"]}, {"inputs": "d"}]})  # at the limit
        assert r.status_code == 200 and [len(p) for p in r.json()["predictions"]] == [3, 1], r.text
