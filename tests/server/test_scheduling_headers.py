"""Per-request scheduling through the real HTTP stack: x-priority orders work, x-slo-ms is validated."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.server.test_failures import wait_for
from tests.support import MODEL, DummyEmbedder, dummy_server


def test_high_priority_runs_before_earlier_normal_requests():
    embedder = DummyEmbedder()
    with dummy_server(embedder, scheduler={"max_batch_requests": 1}) as s, ThreadPoolExecutor(4) as pool, \
            s.client() as c:
        blocker = embedder.occupy(pool, c)
        engine = s.app.state.engine
        normal = pool.submit(c.post, "/embed", json={"inputs": "normal request"})
        wait_for(lambda: engine.queue.depth == 1)
        urgent = pool.submit(c.post, "/embed", json={"inputs": "urgent request"}, headers={"x-priority": "high"})
        wait_for(lambda: engine.queue.depth == 2)
        embedder.gate.set()
        assert [f.result(10).status_code for f in (blocker, normal, urgent)] == [200, 200, 200]
        ids = {t: engine.tokenizer.encode([t])[0].ids for t in ("normal request", "urgent request")}
        order = [b[0] for b in embedder.batches[1:]]
        assert order.index(ids["urgent request"]) < order.index(ids["normal request"])


@pytest.mark.parametrize("headers", [{"x-slo-ms": "soon"}, {"x-slo-ms": "-5"}, {"x-priority": "urgent!"},
                                     {"x-priority": "99"}])
def test_bad_scheduling_headers_are_refused_in_each_api_shape(client, headers):
    def tei_counts():  # refused before the batcher, as any bad input: no TEI request, no TEI failure
        text = client.get("/metrics").text
        return [line for line in text.splitlines() if line.startswith(("te_request_count", "te_request_failure"))]

    before = tei_counts()
    r = client.post("/v1/embeddings", json={"input": "x", "model": MODEL}, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = client.post("/embed", json={"inputs": "x"}, headers=headers)
    assert r.status_code == 422 and r.json()["error_type"] == "Validation"
    assert tei_counts() == before


def test_good_scheduling_headers_are_accepted(client):
    r = client.post("/embed", json={"inputs": "x"}, headers={"x-slo-ms": "250", "x-priority": "low"})
    assert r.status_code == 200


def test_info_reports_the_scheduler(client):
    info = client.get("/info").json()["scheduler"]
    assert info["policy"] == "dp" and info["slo_ms"] == 2000.0
    assert set(info["cost_model"]["coefficients_seconds"]) == {"batch", "sequence", "token", "squared_token"}
    assert "cost_model_error" in info


def test_the_model_overrun_is_in_info_and_metrics(srv, client):
    assert client.post("/embed", json={"inputs": "a text"}).status_code == 200
    cost = srv.app.state.engine.cost
    saved = cost.overrun
    try:
        cost.overrun = math.log(1.5)  # as if batches had run 1.5x their prediction 1 time in 10
        assert client.get("/info").json()["scheduler"]["cost_model"]["overrun_p90_ratio"] == pytest.approx(1.5)
        line = next(x for x in client.get("/metrics").text.splitlines()
                    if x.startswith("turboserve_cost_model_overrun_ratio "))
        assert float(line.split()[1]) == pytest.approx(1.5)
    finally:
        cost.overrun = saved


def test_missed_deadlines_are_counted(srv, client):
    before = srv.app.state.metrics.registry.get_sample_value("turboserve_deadline_missed_total")
    r = client.post("/embed", json={"inputs": "late"}, headers={"x-slo-ms": "0.001"})  # a 1 us deadline
    assert r.status_code == 200  # still answered
    after = srv.app.state.metrics.registry.get_sample_value("turboserve_deadline_missed_total")
    assert after == before + 1


def test_refined_cost_model_is_saved_at_shutdown(tmp_path):
    from scheduler.cost_model import CostModel  # noqa: PLC0415

    # Batches of a steady 10 ms: the live batches agree with the profile, so the refinement is saved.
    with dummy_server(DummyEmbedder(delay_s=0.01), scheduler={"cost_model_dir": str(tmp_path)}) as s, s.client() as c:
        measured = list(tmp_path.glob("cost-*.json"))
        assert len(measured) == 1 and CostModel.load(measured[0]).observations == 0
        for i in range(3):
            assert c.post("/embed", json={"inputs": f"text {i}"}).status_code == 200
    assert CostModel.load(measured[0]).observations >= 3


def test_a_refinement_far_from_the_profile_is_not_saved(tmp_path):
    from scheduler.cost_model import MAX_DRIFT, CostModel  # noqa: PLC0415

    # The host turns 8x slower after profiling (another process, say): serving adapts in memory, but the
    # saved model stays the measured one, so the next start does not inherit a passing condition.
    embedder = DummyEmbedder(delay_s=0.005)
    with dummy_server(embedder, scheduler={"cost_model_dir": str(tmp_path)}) as s, s.client() as c:
        embedder.delay_s = 0.04
        for i in range(12):
            assert c.post("/embed", json={"inputs": f"text {i}"}).status_code == 200
        assert s.app.state.engine.cost.drift() > MAX_DRIFT
    (saved,) = tmp_path.glob("cost-*.json")
    assert CostModel.load(saved).observations == 0


def test_planning_ahead_and_answering_after_the_plan_through_http():
    embedder = DummyEmbedder()
    with dummy_server(embedder, scheduler={"max_batch_requests": 2, "plan_ahead": True, "answer_after_plan": True}) as s, \
            ThreadPoolExecutor(8) as pool, s.client() as c:
        blocker = embedder.occupy(pool, c)
        engine = s.app.state.engine
        texts = [f"request number {i}" for i in range(7)]
        futures = [pool.submit(c.post, "/embed", json={"inputs": t}) for t in texts]
        wait_for(lambda: engine.queue.depth == len(texts))
        embedder.gate.set()  # then batches of two back to back, each planned while the one before ran
        assert blocker.result(10).status_code == 200
        answers = [f.result(10) for f in futures]
        assert [r.status_code for r in answers] == [200] * len(texts)
        alone = [c.post("/embed", json={"inputs": t}).json() for t in texts]  # one at a time: nothing to plan ahead
        assert [r.json() for r in answers] == alone
        ahead = c.get("/info").json()["scheduler"]["plans_ahead"]
        assert ahead["run"] >= 2 and ahead["planned_again"] >= 0
        text = c.get("/metrics").text  # the same counts for Prometheus
        for outcome in ("run", "planned_again"):
            assert f'turboserve_scheduler_plans_ahead_total{{outcome="{outcome}"}} {float(ahead[outcome])}' in text
