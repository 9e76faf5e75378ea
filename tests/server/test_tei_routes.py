"""TEI's other routes on the real all-MiniLM-L6-v2, through HTTP: /embed_all and /similarity against
sentence-transformers, /tokenize and /decode against the tokenizer, the root and SageMaker aliases through
huggingface_hub's InferenceClient, and 424 for the routes of other model kinds."""

from __future__ import annotations

import httpx
import numpy as np
import pytest


@pytest.fixture(scope="module")
def st_model(real_server):
    from sentence_transformers import SentenceTransformer  # noqa: PLC0415

    return SentenceTransformer(real_server.app.state.engine.info.path, device="cpu")


@pytest.fixture
def http(real_server):
    with httpx.Client(base_url=real_server.url, timeout=60) as c:
        yield c


TEXTS = ["A man is eating food.", "Héllo wörld, the quick brown fox jumps over the lazy dog", "x"]


def test_embed_all_is_every_tokens_hidden_state_as_sentence_transformers_gives_it(http, st_model):
    r = http.post("/embed_all", json={"inputs": TEXTS})
    assert r.status_code == 200, r.text
    got = r.json()
    want = st_model.encode(TEXTS, output_value="token_embeddings", convert_to_numpy=False)
    assert [len(g) for g in got] == [len(w) for w in want]  # special tokens included, no padding
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), w.numpy(), atol=2e-4, rtol=1e-3)
    # Mean pooling of those same token states is what /embed answers.
    pooled = http.post("/embed", json={"inputs": TEXTS[0], "normalize": False}).json()[0]
    np.testing.assert_allclose(pooled, np.mean(got[0], axis=0), atol=1e-5)


def test_similarity_matches_sentence_transformers_cosine(http, st_model):
    source, others = "That is a happy person", ["That is a happy dog", "Today is a sunny day", "That is a happy person"]
    r = http.post("/similarity", json={"inputs": {"source_sentence": source, "sentences": others},
                                       "parameters": {"truncate": True, "truncation_direction": "Right"}})
    assert r.status_code == 200, r.text
    e = st_model.encode([source, *others], normalize_embeddings=True)
    np.testing.assert_allclose(r.json(), e[1:] @ e[0], atol=1e-5)
    assert r.json()[2] == pytest.approx(1.0, abs=1e-5)
    empty = http.post("/similarity", json={"inputs": {"source_sentence": source, "sentences": []}})
    assert empty.status_code == 400 and empty.json()["error_type"] == "Empty"


def test_tokenize_gives_ids_text_and_character_offsets(http, real_server):
    tok = real_server.app.state.engine.tokenizer
    r = http.post("/tokenize", json={"inputs": TEXTS[:2]})
    assert r.status_code == 200, r.text
    for text, tokens in zip(TEXTS, r.json()):
        assert [t["id"] for t in tokens] == tok.encode([text])[0].ids
        assert tokens[0] == {"id": 101, "text": "[CLS]", "special": True, "start": None, "stop": None}
        for t in tokens[1:-1]:
            assert not t["special"] and t["text"] == text[t["start"]:t["stop"]]
    assert r.json()[1][1]["text"] == "Héllo"  # characters, not bytes
    bare = http.post("/tokenize", json={"inputs": "hello", "add_special_tokens": False}).json()
    assert [t["id"] for t in bare[0]] == [7592]


def test_decode_round_trips_and_refuses_ids_outside_the_vocabulary(http):
    ids = [t["id"] for t in http.post("/tokenize", json={"inputs": "hello world"}).json()[0]]
    assert http.post("/decode", json={"ids": ids}).json() == ["hello world"]
    assert http.post("/decode", json={"ids": [ids, ids[1:2]], "skip_special_tokens": False}).json() == [
        "[CLS] hello world [SEP]", "hello"]
    bad = http.post("/decode", json={"ids": [101, 10**9]})
    assert bad.status_code == 422 and "outside the vocabulary" in bad.json()["error"]


def test_root_and_sagemaker_aliases_serve_huggingface_hub_inference_client(real_server, http, st_model):
    from huggingface_hub import InferenceClient  # noqa: PLC0415

    client = InferenceClient(base_url=real_server.url, timeout=60)
    vectors = client.feature_extraction(TEXTS[0])  # POST / with {"inputs": ...}
    np.testing.assert_allclose(np.asarray(vectors)[0], st_model.encode(TEXTS[0], normalize_embeddings=True), atol=1e-5)
    scores = client.sentence_similarity("a cat", ["a kitten", "stock prices"])  # POST / with {source_sentence, sentences}
    assert scores[0] > scores[1]
    assert http.post("/invocations", json={"inputs": TEXTS[0]}).json() == http.post("/embed", json={"inputs": TEXTS[0]}).json()
    for path in ("/", "/ping"):
        assert http.get(path).json() == {"status": "ok"}
    openai_style = http.post("/embeddings", json={"input": "x", "model": "another-model"})
    assert openai_style.status_code == 404 and openai_style.json()["error"]["code"] == "model_not_found"
    openai_cards, infinity_cards = http.get("/v1/models").json()["data"], http.get("/models").json()["data"]
    assert [c["id"] for c in infinity_cards] == [c["id"] for c in openai_cards]
    card = infinity_cards[0]  # infinity's generated client requires stats and owned_by "infinity" on its /models
    assert card["owned_by"] == "infinity" and card["capabilities"] == ["embed"] and card["backend"] == "turboserve"
    assert card["stats"]["queue_absolute"] == 0 and card["stats"]["batch_size"] >= 1 and card["created"] == openai_cards[0]["created"]
    for request in ({"input": TEXTS[0], "model": "default/not-specified"}, {"input": TEXTS[0]}):  # infinity's default; none
        got = http.post("/embeddings", json=request)
        assert got.status_code == 200 and got.json()["model"] == card["id"]
        np.testing.assert_allclose(got.json()["data"][0]["embedding"], st_model.encode(TEXTS[0], normalize_embeddings=True),
                                   atol=1e-5)
    import openai  # noqa: PLC0415

    bare = openai.OpenAI(base_url=real_server.url, api_key="unused", max_retries=0)  # no /v1, as infinity serves it
    name = bare.models.list().data[0].id
    got = bare.embeddings.create(model=name, input=TEXTS[0]).data[0].embedding
    np.testing.assert_allclose(got, st_model.encode(TEXTS[0], normalize_embeddings=True), atol=1e-5)


@pytest.mark.parametrize("path,body", [("/rerank", {"query": "q", "texts": ["a"]}), ("/predict", {"inputs": "a"}),
                                       ("/embed_sparse", {"inputs": "a"})])
def test_routes_for_other_model_kinds_answer_424_and_the_server_keeps_serving(http, path, body):
    r = http.post(path, json=body)
    assert r.status_code == 424
    assert r.json()["error_type"] == "Backend" and "embedding model" in r.json()["error"]
    assert http.post("/embed", json={"inputs": "still here"}).status_code == 200
