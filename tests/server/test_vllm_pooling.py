"""vLLM's Pooling API (POST /pooling, server/routes_vllm.py) on a dummy embedding model with a small classifier served
beside it: each task's answer against the route that gives the same numbers (/v1/embeddings, /embed_all,
/v1/classify) and transformers' logits; what is not served is a 400 in the OpenAI error shape."""

from __future__ import annotations

import base64
import dataclasses

import numpy as np
import pytest

from models.config import default_model_path
from server.app import create_app
from tests.cross_encoders import cross_encoder_folder
from tests.hf_import import import_transformers
from tests.server.test_rerank import hf_logits
from tests.support import MODEL, DummyEmbedder, dummy_server, expected_states, expected_vector, settings

LABELS = ("negative", "neutral", "positive")
TEXTS = ["Deep learning is a kind of machine learning.", "cats", "Paris is the capital of France."]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return cross_encoder_folder(tmp_path_factory.mktemp("pooling"), LABELS, seed=1)


@pytest.fixture(scope="module")
def both(folder):
    """The dummy embedding model ("dummy") and the classifier ("clf") beside it, in one server (a short cost-model
    profile: a few cheap cells, the rest extrapolated)."""
    with dummy_server(DummyEmbedder(), reranker={"path": str(folder), "name": "clf", "max_input_length": 64},
                      scheduler={"profile_budget_s": 0.5}) as s, s.client() as c:
        yield s, c


def _pool(c, **body) -> dict:
    r = c.post("/pooling", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def _unit(v, axis=-1):
    return v / np.linalg.norm(v, axis=axis, keepdims=True)


def _ids(srv, text):
    return srv.app.state.engine.tokenizer.encode([text])[0].ids


@pytest.mark.parametrize("inputs", ["one text", TEXTS, [101, 2023, 102], [[101, 2023, 102], [101, 102]]])
def test_embed_answers_v1_embeddings_vectors_in_vllms_shape(both, inputs):
    srv, c = both
    body = _pool(c, model=MODEL, input=inputs)
    ref = c.post("/v1/embeddings", json={"model": MODEL, "input": inputs, "encoding_format": "float"}).json()
    assert body["id"].startswith("pool-") and body["object"] == "list" and isinstance(body["created"], int)
    assert body["model"] == MODEL and body["usage"] == ref["usage"]
    assert [(d["index"], d["object"]) for d in body["data"]] == [(i, "pooling") for i in range(len(ref["data"]))]
    assert [d["data"] for d in body["data"]] == [d["embedding"] for d in ref["data"]]
    if isinstance(inputs, list) and isinstance(inputs[0], str):  # and both are the model's vectors, normalised
        np.testing.assert_allclose(body["data"][1]["data"], _unit(expected_vector(_ids(srv, inputs[1]))), rtol=1e-5)
    assert _pool(c, input=inputs, task="embed")["data"] == body["data"]  # the default task is embed; model optional


def test_embed_options_are_v1_embeddings_options(both):
    srv, c = both
    full = expected_vector(_ids(srv, TEXTS[0]))
    for flag in ("use_activation", "normalize"):  # vLLM's name, and vLLM 0.11's
        raw = _pool(c, input=TEXTS[0], **{flag: False})["data"][0]["data"]
        np.testing.assert_allclose(raw, full, rtol=1e-5)
    cut = _pool(c, input=TEXTS[0], dimensions=4)["data"][0]["data"]
    assert cut == c.post("/v1/embeddings", json={"input": TEXTS[0], "dimensions": 4}).json()["data"][0]["embedding"]
    np.testing.assert_allclose(cut, _unit(full[:4]), rtol=1e-5)
    as_float = np.asarray(_pool(c, input=TEXTS)["data"][2]["data"], dtype=np.float32)
    b64 = _pool(c, input=TEXTS, encoding_format="base64")["data"][2]["data"]
    assert np.array_equal(np.frombuffer(base64.b64decode(b64), dtype="<f4"), as_float)
    half = _pool(c, input=TEXTS, encoding_format="base64", embed_dtype="float16", endianness="big")["data"][2]["data"]
    np.testing.assert_allclose(np.frombuffer(base64.b64decode(half), dtype=">f2"), as_float, rtol=1e-3)


def test_truncate_prompt_tokens_cuts_on_the_side_asked(both):
    """Against transformers' tokenizer cutting at max_length from the same side (special tokens kept)."""
    _, c = both
    hf = import_transformers().AutoTokenizer.from_pretrained(default_model_path())
    for side in ("right", "left"):
        hf.truncation_side = side
        want = expected_vector(hf(TEXTS[0], truncation=True, max_length=5)["input_ids"])
        got = _pool(c, input=TEXTS[0], truncate_prompt_tokens=5, truncation_side=side, use_activation=False)
        assert got["usage"]["prompt_tokens"] == 5
        np.testing.assert_allclose(got["data"][0]["data"], want, rtol=1e-5)
    assert _pool(c, input=TEXTS[0], truncate_prompt_tokens=5)["data"] == \
        _pool(c, input=TEXTS[0], truncate_prompt_tokens=5, truncation_side="right")["data"]  # right by default


def test_token_embed_answers_every_tokens_vector(both):
    srv, c = both
    raw = _pool(c, input=TEXTS[:2], task="token_embed", use_activation=False)
    assert raw["data"] == [{"index": i, "object": "pooling", "data": states}
                           for i, states in enumerate(c.post("/embed_all", json={"inputs": TEXTS[:2]}).json())]
    ids = _ids(srv, TEXTS[1])
    assert raw["usage"]["prompt_tokens"] == len(_ids(srv, TEXTS[0])) + len(ids)
    unit = _pool(c, input=TEXTS[1], task="token_embed")["data"][0]["data"]  # each token's vector normalised, as vLLM's
    np.testing.assert_allclose(unit, _unit(expected_states(ids)), rtol=1e-5)
    cut = _pool(c, input=TEXTS[1], task="token_embed", dimensions=4)["data"][0]["data"]
    np.testing.assert_allclose(cut, _unit(expected_states(ids)[:, :4]), rtol=1e-5)
    b64 = _pool(c, input=TEXTS[1], task="token_embed", encoding_format="base64")["data"][0]["data"]
    np.testing.assert_allclose(np.frombuffer(base64.b64decode(b64), dtype="<f4").reshape(len(ids), -1), unit, rtol=1e-6)


def test_classify_answers_v1_classify_probabilities(both, folder):
    _, c = both
    ref = c.post("/v1/classify", json={"input": TEXTS}).json()
    for body in ({"model": "clf"}, {"task": "classify"}, {"model": "clf", "task": "classify"}):
        got = _pool(c, input=TEXTS, **body)
        assert got["model"] == "clf" and got["usage"]["prompt_tokens"] == ref["usage"]["prompt_tokens"]
        assert [d["data"] for d in got["data"]] == [d["probs"] for d in ref["data"]]
    logits = hf_logits(folder, texts=TEXTS)
    for flag in ("use_activation", "softmax", "activation"):  # vLLM's name, and vLLM 0.11's two
        raw = _pool(c, model="clf", input=TEXTS, **{flag: False})
        np.testing.assert_allclose([d["data"] for d in raw["data"]], logits, atol=1e-5)
    ids = _pool(c, model="clf", input=[[101, 2023, 102]])["data"][0]["data"]  # token ids, as given
    assert len(ids) == len(LABELS) and sum(ids) == pytest.approx(1, abs=1e-6)


@pytest.mark.parametrize("body, status, needle", [
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "messages"),
    ({"input": "x", "data": {"image": "..."}}, 400, "plugin"),
    ({}, 400, "input"),
    ({"input": ""}, 400, "empty"),
    ({"input": []}, 400, "empty"),
    ({"input": [True]}, 400, "input"),
    ({"input": "word " * 100}, 413, "tokens"),
    ({"input": "x", "model": "other"}, 404, "'clf'"),
    ({"input": "x", "task": "token_classify"}, 400, "supports embed, token_embed"),
    ({"input": "x", "model": "clf", "task": "token_classify"}, 400, "per token"),
    ({"input": "x", "task": "plugin"}, 400, "plugin"),
    ({"input": "x", "task": "encode"}, 400, "token_embed"),
    ({"input": "x", "task": "score"}, 400, "classify"),
    ({"input": "x", "task": "nope"}, 400, "unknown task"),
    ({"input": "x", "model": MODEL, "task": "classify"}, 400, "supports embed, token_embed"),
    ({"input": "x", "model": "clf", "task": "embed"}, 400, "supports classify"),
    ({"input": "x", "task": "classify", "dimensions": 4}, 400, "dimensions"),
    ({"input": "x", "task": "classify", "normalize": False}, 400, "normalize"),
    ({"input": "x", "softmax": False}, 400, "softmax"),
    ({"input": "x", "normalize": True, "use_activation": False}, 400, "disagree"),
    ({"input": "x", "dimensions": 3}, 400, "dimensions=3"),
    ({"input": "x", "truncate_prompt_tokens": 0}, 400, "truncate_prompt_tokens"),
    ({"input": "x", "encoding_format": "bytes"}, 400, "bytes"),
    ({"input": "x", "encoding_format": "base64", "embed_dtype": "bfloat16"}, 400, "bfloat16"),
    ({"input": "x", "add_special_tokens": False}, 400, "add_special_tokens"),
    ({"input": "x", "padding": "max_length"}, 400, "padding"),
    ({"input": "x", "priority": 1}, 400, "x-priority"),
])
def test_what_is_not_served_is_a_clear_openai_error_and_the_server_keeps_serving(both, body, status, needle):
    _, c = both
    r = c.post("/pooling", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle in error["message"] and error["type"] == "invalid_request_error" and error["code"], error
    assert c.post("/pooling", json={"input": "still here"}).status_code == 200


def test_sparse_models_and_per_token_states_before_dense_modules_are_refused(both, monkeypatch):
    srv, c = both
    engine = srv.app.state.engine
    monkeypatch.setattr(engine.embedder, "dense", [("weight", None, "identity")], raising=False)  # EmbeddingGemma-like
    r = c.post("/pooling", json={"input": "x", "task": "token_embed"})
    assert r.status_code == 400 and "Dense modules" in r.json()["error"]["message"], r.text
    assert c.post("/pooling", json={"input": "x"}).status_code == 200  # its pooled vectors are served
    monkeypatch.setattr(engine, "info", dataclasses.replace(engine.info, pooling="splade"))
    r = c.post("/pooling", json={"input": "x"})
    assert r.status_code == 400 and "/embed_sparse" in r.json()["error"]["message"], r.text


def test_pooling_is_in_the_openapi_schema():
    assert "/pooling" in create_app(settings()).openapi()["paths"]
