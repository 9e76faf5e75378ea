"""vLLM's classification API (/v1/classify, /classify: TEI's /v1/classify and SGLang's answer the same shape)
against transformers' logits, and TEI's Vertex AI route (/vertex) against the routes each instance stands for."""

from __future__ import annotations

import numpy as np
import pytest

from server.app import create_app
from tests.cross_encoders import cross_encoder_folder
from tests.server.test_rerank import QUERY, TEXTS, hf_logits
from tests.support import ServerThread, settings

LABELS = ["negative", "neutral", "positive"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("classify")
    return {"reranker": cross_encoder_folder(root), "classifier": cross_encoder_folder(root, tuple(LABELS), seed=1)}


@pytest.fixture(scope="module")
def classifier(folders):
    with ServerThread(create_app(settings(model={"path": str(folders["classifier"]), "name": "clf"}))) as s, s.client() as c:
        yield c


@pytest.fixture(scope="module")
def reranker(folders):
    with ServerThread(create_app(settings(model={"path": str(folders["reranker"]), "name": "ce"}))) as s, s.client() as c:
        yield c


@pytest.mark.parametrize("path", ["/v1/classify", "/classify"])
def test_classify_answers_vllms_shape_with_transformers_probabilities(folders, classifier, path):
    r = classifier.post(path, json={"model": "clf", "input": TEXTS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == "clf" and body["id"].startswith("classify-")
    logits = hf_logits(folders["classifier"], texts=TEXTS)
    want = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert [d["index"] for d in body["data"]] == list(range(len(TEXTS)))
    assert [d["label"] for d in body["data"]] == [LABELS[j] for j in want.argmax(1)]
    np.testing.assert_allclose([d["probs"] for d in body["data"]], want, atol=1e-5)
    assert all(d["num_classes"] == 3 for d in body["data"])
    tokens = sum(len(t) for t in classifier.post("/tokenize", json={"inputs": TEXTS}).json())
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
                             "prompt_tokens_details": None}
    one = classifier.post(path, json={"input": TEXTS[1]}).json()["data"]  # a single string; model may be left out
    assert len(one) == 1 and one[0]["probs"] == pytest.approx(body["data"][1]["probs"])


def test_classify_errors_are_openai_shaped(classifier, reranker):
    r = classifier.post("/v1/classify", json={"model": "other", "input": "x"})
    assert r.status_code == 404 and "not served" in r.json()["error"]["message"]
    for body in ({"input": []}, {"input": [""]}, {"input": 3}, {}):
        r = classifier.post("/classify", json=body)
        assert r.status_code == 400 and r.json()["error"]["message"], (body, r.text)
    # A re-ranker classifies too: its one label's sigmoid, as /predict scores it.
    got = reranker.post("/v1/classify", json={"input": TEXTS[:2]}).json()["data"]
    want = [reranker.post("/predict", json={"inputs": t}).json()[0] for t in TEXTS[:2]]
    assert [(d["label"], d["probs"][0], d["num_classes"]) for d in got] == \
        [(w["label"], pytest.approx(w["score"]), 1) for w in want]


def test_vertex_on_an_embedding_model_answers_embed_per_instance(client):
    instances = [{"inputs": "a first text"}, {"inputs": ["two", "texts"], "normalize": False}, {"inputs": "x", "dimensions": 4}]
    r = client.post("/vertex", json={"instances": instances})
    assert r.status_code == 200, r.text
    predictions = r.json()["predictions"]
    assert predictions == [client.post("/embed", json=inst).json() for inst in instances]
    tokens = sum(len(t) for inst in instances for t in client.post("/tokenize", json={"inputs": inst["inputs"]}).json())
    assert int(r.headers["x-compute-tokens"]) == tokens  # summed over the instances, not the last one's


@pytest.mark.parametrize("body, status, needle", [
    ({"instances": []}, 400, "instances is empty"),
    ({"instances": [{"inputs": "ok"}, {"inputs": 3.5}]}, 422, "inputs"),
    ({"instances": [{"inputs": "ok"}, {"inputs": ""}]}, 400, "empty"),
    ({"instances": [{"inputs": "ok"}] * 40}, 413, "max_client_batch_size"),
    ({"instances": "nope"}, 422, "instances"),
])
def test_vertex_errors_are_teis_and_the_server_keeps_serving(client, body, status, needle):
    r = client.post("/vertex", json=body)
    assert r.status_code == status and needle in r.json()["error"], r.text
    assert client.post("/vertex", json={"instances": [{"inputs": "still here"}]}).status_code == 200


@pytest.mark.parametrize("instances, status", [
    ([{"inputs": ["t"] * 20}, {"inputs": ["u"] * 13}], 413),
    ([{"inputs": "t"}] * 16 + [{"inputs": ["u"] * 16}], 200),
    ([{"inputs": [101, 2000, 102]}] * 32, 200),  # a list of token ids is one input
    ([{"inputs": [[101, 102], [101, 2000, 102]]}] * 17, 413),
])
def test_vertex_holds_its_instances_to_max_client_batch_size_inputs_in_all(client, instances, status):
    r = client.post("/vertex", json={"instances": instances})
    assert r.status_code == status, r.text
    if status == 413:
        assert r.json()["error"] == f"{sum(len(i['inputs']) for i in instances)} inputs in one request, more than " \
            "max_client_batch_size=32", r.text


def test_vertex_counts_rerank_and_predict_instances_as_their_routes_do(reranker, classifier):
    r = reranker.post("/vertex", json={"instances": [{"query": QUERY, "texts": TEXTS * 5},
                                                     {"query": QUERY, "texts": TEXTS * 3 + ["x"]}]})
    assert r.status_code == 413 and r.json()["error"].startswith("33 inputs"), r.text
    pair = {"inputs": [QUERY, TEXTS[0]]}  # two strings: one pair, one input
    assert classifier.post("/vertex", json={"instances": [pair] * 32}).status_code == 200
    r = classifier.post("/vertex", json={"instances": [{"inputs": [[QUERY, t] for t in TEXTS] * 8}, {"inputs": "x"}]})
    assert r.status_code == 413 and r.json()["error"].startswith("33 inputs"), r.text


def _same(got, want):
    """Equal answers up to float rounding (instances batched with others compute in other batch shapes)."""
    if isinstance(want, dict):
        assert got.keys() == want.keys()
        for k in want:
            _same(got[k], want[k])
    elif isinstance(want, list):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            _same(g, w)
    else:
        assert got == (pytest.approx(want, abs=1e-6) if isinstance(want, float) else want)


def test_vertex_on_a_reranker_and_a_classifier(reranker, classifier):
    rerank = {"query": QUERY, "texts": TEXTS, "return_text": True}
    got = reranker.post("/vertex", json={"instances": [rerank, {"inputs": TEXTS[0]}]}).json()["predictions"]
    _same(got, [reranker.post("/rerank", json=rerank).json(), reranker.post("/predict", json={"inputs": TEXTS[0]}).json()])
    pair = {"inputs": [QUERY, TEXTS[0]]}
    _same(classifier.post("/vertex", json={"instances": [pair]}).json()["predictions"],
          [classifier.post("/predict", json=pair).json()])


def test_vertex_instances_of_a_client_that_walked_away_are_dropped_before_compute():
    """Every instance watches the one connection: a disconnect withdraws all their queued sequences."""
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

    from tests.server.test_failures import wait_for  # noqa: PLC0415
    from tests.server.test_overload import dropped  # noqa: PLC0415
    from tests.support import DummyEmbedder, dummy_server, post_and_walk_away  # noqa: PLC0415

    embedder = DummyEmbedder()
    with dummy_server(embedder) as s, ThreadPoolExecutor(2) as pool, s.client() as c:
        engine = s.app.state.engine
        blocker = embedder.occupy(pool, c)
        sock = post_and_walk_away(s.url, "/vertex", b'{"instances": [{"inputs": ["one", "two"]}, {"inputs": "three"}, '
                                  b'{"inputs": "four"}]}')
        wait_for(lambda: engine.queue.depth == 4)
        sock.close()
        wait_for(lambda: dropped(s, "disconnect") == 4 and engine.queue.depth == 0)
        embedder.gate.set()
        assert blocker.result(10).status_code == 200
        assert c.post("/vertex", json={"instances": [{"inputs": "after"}]}).status_code == 200
        gone = [engine.tokenizer.encode([t])[0].ids for t in ("one", "two", "three", "four")]
        assert not any(ids in batch for batch in embedder.batches for ids in gone)
