"""The planner sees a request of several inputs as one client request (WorkItem.group): its sequences share
an id that no other request's sequences have, and a request of one input has none."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from tests.support import DummyEmbedder, dummy_server


def wait_for(predicate, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.01)


def test_the_inputs_of_one_request_share_a_group_and_requests_differ():
    embedder = DummyEmbedder()
    with dummy_server(embedder) as s, ThreadPoolExecutor(4) as pool, s.client() as c:
        blocker = embedder.occupy(pool, c)  # the worker holds a batch: what comes next waits in the queue
        engine = s.app.state.engine
        sent = [pool.submit(c.post, "/embed", json={"inputs": body}) for body in (["a b", "c d e"], ["f", "g", "h"], "i j")]
        wait_for(lambda: engine.queue.depth == 6)
        by_text = {tuple(it.ids): it.group for it in engine.queue._pending}
        groups = {text: by_text[tuple(engine.tokenizer.encode([text])[0].ids)] for text in "a b|c d e|f|g|h|i j".split("|")}
        embedder.gate.set()
        assert blocker.result(10).status_code == 200 and all(f.result(10).status_code == 200 for f in sent)
    assert groups["a b"] == groups["c d e"] >= 0
    assert groups["f"] == groups["g"] == groups["h"] >= 0 and groups["f"] != groups["a b"]
    assert groups["i j"] == -1
