"""TEI's metric names on /metrics (server/metrics_tei.py): the names, labels, buckets and counts TEI's router
writes, read back with prometheus_client's own parser."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.metrics_tei import DURATION_BUCKETS
from tests.support import DummyEmbedder, dummy_server


def _samples(client) -> dict[tuple[str, tuple], float]:
    text = client.get("/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}


@pytest.fixture
def server():
    embedder = DummyEmbedder()
    with dummy_server(embedder) as s:
        yield s, embedder


def test_tei_series_count_requests_batches_and_failures(server):
    srv, embedder = server
    with srv.client() as c:
        assert c.post("/embed", json={"inputs": "one"}).status_code == 200
        assert c.post("/embed", json={"inputs": ["two", "three"]}).status_code == 200
        embedder.fail_next = True
        assert c.post("/embed", json={"inputs": "boom"}).status_code >= 400
        text = c.get("/metrics").text
        got = _samples(c)
    assert got[("te_request_count", (("method", "single"),))] == 2
    assert got[("te_request_count", (("method", "batch"),))] == 1
    assert got[("te_request_success", (("method", "single"),))] == 1
    assert got[("te_request_success", (("method", "batch"),))] == 1
    assert got[("te_request_failure", (("err", "inference"),))] == 1
    # TEI's exporter writes counters under their bare names: no _total, as dashboards for TEI query them.
    assert "\nte_request_count{" in text and "te_request_count_total" not in text
    assert got[("te_request_duration_count", ())] == 2 and got[("te_request_input_length_count", ())] == 2
    assert got[("te_batch_next_size_count", ())] >= 2 and got[("te_batch_inference_count", ())] >= 2
    assert got[("te_batch_next_size_sum", ())] >= 3  # sequences, over the batches
    assert ("te_queue_size", ()) in got
    buckets = sorted(float(dict(k[1])["le"]) for k in got if k[0] == "te_request_duration_bucket")
    assert buckets[:-1] == pytest.approx(list(DURATION_BUCKETS)) and buckets[0] == pytest.approx(1.5e-5)
    lengths = sorted(float(dict(k[1])["le"]) for k in got if k[0] == "te_request_input_length_bucket")
    limit = srv.app.state.engine.info.max_input_length
    assert lengths[:-1] == [2.0 ** i for i in range(20) if 2 ** i <= limit]
