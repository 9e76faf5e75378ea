"""Fuzzing (issue 7): schemathesis over every route of the server's own /openapi.json (a short run; the long
one is bench/fuzz.py), and Hypothesis over the text path through the real tokenizer and the HTTP routes.
Every answer is a 200 or a documented 4xx in the family's error shape, never a 5xx."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.fuzz import DLRM_NAME, build_recommendation, fuzz
from server.errors import api_family
from tests.support import MODEL, dummy_server

VOCAB = 30522  # the embedded tokenizer's vocabulary (tests/support.py's dummy_loader)
TEXT_ROUTES = ("/embed", "/v1/embeddings", f"/v2/models/{MODEL}/infer")
# Every Unicode general category, surrogates (Cs) included: JSON carries them as \ud800-style escapes.
CATEGORIES = ["Lu", "Ll", "Lt", "Lm", "Lo", "Mn", "Mc", "Me", "Nd", "Nl", "No", "Pc", "Pd", "Ps", "Pe", "Pi", "Pf",
              "Po", "Sm", "Sc", "Sk", "So", "Zs", "Zl", "Zp", "Cc", "Cf", "Cs", "Co", "Cn"]
FUZZ = settings(max_examples=40, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    """The dummy engine with the parameter server and a tiny DLRM on, so every route answers."""
    with dummy_server(**build_recommendation(tmp_path_factory.mktemp("fuzz"))) as s:
        yield s


@pytest.fixture(scope="module")
def client(srv):
    with srv.client() as c:
        yield c


def post(client, route: str, inputs, **extra):
    """POST `inputs` (texts, or token ids) to one text route, in that route's body shape."""
    if route == "/embed":
        body = {"inputs": inputs, **extra}
    elif route == "/v1/embeddings":
        body = {"input": inputs, "model": MODEL}
    else:
        texts = inputs if isinstance(inputs, list) else [inputs]
        body = {"inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts}],
                "parameters": extra}
    # ensure_ascii: lone surrogates travel as \ud800 escapes, as any JSON client may send them.
    return client.post(route, content=json.dumps(body), headers={"content-type": "application/json"})


def assert_documented(response, allowed=(200, 400, 413, 422)):
    assert response.status_code in allowed, (response.status_code, response.text[:500])
    if response.status_code != 200:
        assert "error" in response.json()


@pytest.mark.slow
def test_schemathesis_every_route_no_5xx_and_conforms(srv):
    """Positive and negative cases for every operation: no 5xx, documented statuses and bodies."""
    counts: dict[str, int] = {}

    def count(label, status, failure):
        counts[label] = counts.get(label, 0) + 1

    failures = fuzz(srv.url, max_examples=20, on_result=count)
    assert not failures, "\n".join(failures)
    assert len(counts) >= 17, sorted(counts)  # every route was reached, the recommendation ones included


@pytest.mark.parametrize("route", TEXT_ROUTES)
@FUZZ
@given(text=st.text(st.characters(categories=CATEGORIES), max_size=40))
def test_any_unicode_text(client, route, text):
    assert_documented(post(client, route, text))
    assert_documented(post(client, route, [text, "x"]))


@pytest.mark.parametrize("route", TEXT_ROUTES)
@FUZZ
@given(text=st.text(st.characters(categories=["Cc", "Cf", "Zs", "Zl", "Zp"]), max_size=20))
def test_control_and_space_characters(client, route, text):
    assert_documented(post(client, route, text))


@pytest.mark.parametrize("route", TEXT_ROUTES)
def test_empty_strings(client, route):
    for inputs in ("", [""], ["a", ""], []):
        response = post(client, route, inputs)
        assert response.status_code in (400, 422), (inputs, response.status_code, response.text)


@pytest.mark.parametrize("route", TEXT_ROUTES)
@pytest.mark.parametrize("word", ["a" * 100_000, "\u00e9" * 100_000, "\U0001f600" * 100_000])
def test_100k_character_word(client, route, word):
    # One WordPiece word over 100 characters is a single [UNK]; the emoji word is 100k tokens, a 413.
    assert_documented(post(client, route, word), allowed=(200, 413))
    assert post(client, route, " ".join([word[:10]] * 10_000)).status_code == 413  # over max_input_length
    if route != "/v1/embeddings":  # OpenAI has no truncate
        assert post(client, route, word, truncate=True).status_code == 200


@pytest.mark.parametrize("route", ("/embed", "/v1/embeddings"))
@pytest.mark.parametrize("ids,ok", [([0], True), ([VOCAB - 1], True), ([0, VOCAB - 1], True), ([VOCAB], False),
                                    ([-1], False), ([2**63], False), ([2**63 - 1], False), ([-(2**63)], False),
                                    ([10**30], False), ([[1, 2], [VOCAB]], False), ([[1], []], False)])
def test_token_ids_at_vocabulary_edges(client, route, ids, ok):
    response = post(client, route, ids)
    if ok:
        assert response.status_code == 200, response.text
    else:
        assert response.status_code in (400, 422), (response.status_code, response.text)
        assert "error" in response.json()


@pytest.mark.parametrize("route", ("/embed", "/v1/embeddings"))
@FUZZ
@given(ids=st.lists(st.one_of(st.integers(-(2**70), 2**70), st.integers(VOCAB - 3, VOCAB + 3)), max_size=40))
def test_any_token_ids(client, route, ids):
    assert_documented(post(client, route, ids))


def test_ragged_dense_rows_are_a_400(client):
    """Regression (found by fuzzing): rows of different lengths made np.asarray raise, a 500."""
    response = client.post("/v1/recommend", json={"model": DLRM_NAME, "dense": [[0.1, 0.2, 0.3], [0.1]],
                                                  "sparse": {"user": [1, 2], "item": [3, 4]}})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_request"


def test_openapi_declares_error_responses(client):
    """Every operation documents its family's error statuses with the family's error body."""
    spec = client.get("/openapi.json").json()
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            statuses = set(operation["responses"])
            assert {"401", "404", "413", "429", "500", "503", "504"} <= statuses, (method, path, statuses)
            ref = operation["responses"]["404"]["content"]["application/json"]["schema"]["$ref"]
            family = {"tei": "TEIError", "openai": "OpenAIError", "kserve": "KServeError"}[api_family(path)]
            assert ref.endswith("/" + family), (path, ref)


@pytest.mark.parametrize("tensor", [
    {"name": "dense", "shape": [1, 3], "datatype": {}, "data": [0.1, 0.2, 0.3]},  # found by bench/fuzz.py: a 500
    {"name": "dense", "shape": [1, 3], "datatype": "FP32", "data": [0.1, 0.2, 0.3], "parameters": 5},
    {"name": "dense", "shape": [0, 2**70], "datatype": "FP32", "data": []},
    {"name": "dense", "shape": [2**70], "datatype": "FP32", "data": [0.1]},
])
def test_malformed_dlrm_tensors_are_a_400(client, tensor):
    response = client.post(f"/v2/models/{DLRM_NAME}/infer", json={"inputs": [tensor]})
    assert response.status_code == 400, response.text
    assert "error" in response.json()


@pytest.mark.parametrize("model", [MODEL, DLRM_NAME])
def test_non_object_parameters_are_a_400(client, model):
    tensor = ({"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]} if model == MODEL
              else {"name": "dense", "shape": [1, 3], "datatype": "FP32", "data": [0.1, 0.2, 0.3]})
    for body in ({"inputs": [{**tensor, "parameters": [1]}]}, {"inputs": [tensor], "outputs": [{"name": "x", "parameters": 3}]}):
        response = client.post(f"/v2/models/{model}/infer", json=body)
        assert response.status_code == 400, (body, response.text)
