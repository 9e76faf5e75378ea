"""Every bad-input case answers in its API's own error shape, never a 500, and the server keeps serving."""

from __future__ import annotations

import pytest

from tests.support import MODEL

LONG = " ".join(f"w{i}" for i in range(100))  # far over the dummy's 32-token limit
TOO_MANY = ["x"] * 33  # max_client_batch_size is 32


def _check_shape(family: str, body: dict) -> None:
    if family == "openai":
        assert set(body) == {"error"}
        assert {"message", "type", "code"} <= set(body["error"])
        assert body["error"]["message"]
    elif family == "tei":
        assert set(body) == {"error", "error_type"} and body["error"]
    else:
        assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"]
    assert "Traceback" not in str(body)


OPENAI = [
    ("malformed json", b'{"input": "x", "model": ', 400),
    ("wrong type", {"input": 5, "model": MODEL}, 400),
    ("model not a string", {"input": "x", "model": 5}, 400),
    ("empty list", {"input": [], "model": MODEL}, 400),
    ("empty string", {"input": "", "model": MODEL}, 400),
    ("empty string in list", {"input": ["ok", ""], "model": MODEL}, 400),
    ("too many inputs", {"input": TOO_MANY, "model": MODEL}, 413),
    ("too long", {"input": LONG, "model": MODEL}, 413),
    ("token id out of vocab", {"input": [[101, 99999999]], "model": MODEL}, 400),
    ("negative token id", {"input": [-1, 5], "model": MODEL}, 400),
    ("empty token list", {"input": [[]], "model": MODEL}, 400),
    ("unknown model", {"input": "x", "model": "nope"}, 404),
    ("bad encoding", {"input": "x", "model": MODEL, "encoding_format": "hex"}, 400),
    ("dimensions negative", {"input": "x", "model": MODEL, "dimensions": -1}, 400),
    ("dimensions unsupported", {"input": "x", "model": MODEL, "dimensions": 5}, 400),
    ("lone surrogate", f'{{"input": ["ok", "bad \\ud800"], "model": "{MODEL}"}}'.encode(), 400),
]
TEI = [
    ("malformed json", b"{not json", 422),
    ("wrong type", {"inputs": {"a": 1}}, 422),
    ("bad direction", {"inputs": "x", "truncation_direction": "up"}, 422),
    ("empty list", {"inputs": []}, 400),
    ("empty string", {"inputs": ""}, 400),
    ("too many inputs", {"inputs": TOO_MANY}, 413),
    ("too long", {"inputs": LONG}, 413),
    ("token id out of vocab", {"inputs": [[1, 2, 40000]]}, 422),
    ("prompt name", {"inputs": "x", "prompt_name": "query"}, 422),
    ("lone surrogate", b'{"inputs": "\\ud800"}', 422),
]
INFER = f"/v2/models/{MODEL}/infer"
KSERVE = [
    ("malformed json", INFER, b"[[[", 400),
    ("no inputs", INFER, {"inputs": []}, 400),
    ("wrong datatype", INFER, {"inputs": [{"name": "text", "shape": [1], "datatype": "INT32", "data": [1]}]}, 400),
    ("shape mismatch", INFER, {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["a"]}]}, 400),
    ("bad shape", INFER, {"inputs": [{"name": "text", "shape": [1, 2], "datatype": "BYTES", "data": ["a", "b"]}]}, 400),
    ("non-string data", INFER, {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [3]}]}, 400),
    ("empty string", INFER, {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [""]}]}, 400),
    ("too many", INFER, {"inputs": [{"name": "text", "shape": [33], "datatype": "BYTES", "data": TOO_MANY}]}, 413),
    ("too long", INFER, {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [LONG]}]}, 413),
    ("unknown output", INFER, {"inputs": [{"name": "t", "shape": [1], "datatype": "BYTES", "data": ["a"]}],
                               "outputs": [{"name": "logits"}]}, 400),
    ("unknown model", "/v2/models/nope/infer", {"inputs": [{"name": "t", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}, 404),
    ("lone surrogate", INFER, b'{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["\\udc00"]}]}', 400),
    ("wrong input name", INFER, {"inputs": [{"name": "wrong", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}, 400),
    ("normalize a string", INFER, {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}],
                                   "parameters": {"normalize": "false"}}, 400),
    ("truncate a list", INFER, {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}],
                                "parameters": {"truncate": [1]}}, 400),
    ("unknown version", f"/v2/models/{MODEL}/versions/3/infer",
     {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}, 404),
    ("nested too deeply", INFER, b'{"inputs":' + b"[" * 5000 + b"]" * 5000 + b"}", 400),
    ("nested too deeply, repository", "/v2/repository/index", b"[" * 5000 + b"]" * 5000, 400),
    ("data a scalar", INFER, {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": "a"}]}, 400),
    ("no data", INFER, {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES"}]}, 400),
    ("id an object", INFER, {"id": {"a": 1}, "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}, 400),
]


def _post(client, path, body):
    if isinstance(body, bytes):
        return client.post(path, content=body, headers={"content-type": "application/json"})
    return client.post(path, json=body)


@pytest.mark.parametrize("case,body,status", OPENAI, ids=[c[0] for c in OPENAI])
def test_openai_bad_input(client, case, body, status):
    r = _post(client, "/v1/embeddings", body)
    assert r.status_code == status, r.text
    _check_shape("openai", r.json())
    assert client.post("/v1/embeddings", json={"input": "still serving", "model": MODEL}).status_code == 200


@pytest.mark.parametrize("case,body,status", TEI, ids=[c[0] for c in TEI])
def test_tei_bad_input(client, case, body, status):
    r = _post(client, "/embed", body)
    assert r.status_code == status, r.text
    _check_shape("tei", r.json())
    assert client.post("/embed", json={"inputs": "still serving"}).status_code == 200


@pytest.mark.parametrize("case,path,body,status", KSERVE, ids=[c[0] for c in KSERVE])
def test_kserve_bad_input(client, case, path, body, status):
    r = _post(client, path, body)
    assert r.status_code == status, r.text
    _check_shape("kserve", r.json())


def test_kserve_binary_header_errors(client):
    r = client.post(INFER, content=b'{"inputs": []}', headers={"inference-header-content-length": "999"})
    assert r.status_code == 400 and "does not fit" in r.json()["error"]
    head = b'{"inputs":[{"name":"text","shape":[1],"datatype":"BYTES","parameters":{"binary_data_size":9}}]}'
    r = client.post(INFER, content=head + b"\x05\x00\x00\x00abc", headers={"inference-header-content-length": str(len(head))})
    assert r.status_code == 400, r.text  # declared 9 bytes, 7 follow
    head7 = head.replace(b'"binary_data_size":9', b'"binary_data_size":7')
    r = client.post(INFER, content=head7 + b"\x09\x00\x00\x00abc", headers={"inference-header-content-length": str(len(head7))})
    assert r.status_code == 400 and "runs past" in r.json()["error"]  # element claims 9 bytes, 3 follow


def test_unknown_routes_and_methods_keep_family_shape(client):
    r = client.get("/v1/nothing")
    assert r.status_code == 404
    _check_shape("openai", r.json())
    r = client.get("/embed")
    assert r.status_code == 405
    _check_shape("tei", r.json())
    r = client.get("/v2/models/nope")
    assert r.status_code == 404
    _check_shape("kserve", r.json())


def test_token_ids_are_cut_when_truncation_is_asked(client):
    """As TEI cuts token-id inputs: truncate (or model.auto_truncate) keeps the first (right) or last (left) ids up to
    the limit (the dummy model's 32), and says nothing; without it an over-long list is a 413."""
    ids = list(range(1000, 1040))
    assert client.post("/embed", json={"inputs": [ids]}).status_code == 413
    cut = client.post("/embed", json={"inputs": [ids], "truncate": True})
    assert cut.status_code == 200 and cut.json() == client.post("/embed", json={"inputs": [ids[:32]]}).json()
    left = client.post("/embed", json={"inputs": [ids], "truncate": True, "truncation_direction": "left"})
    assert left.status_code == 200 and left.json() == client.post("/embed", json={"inputs": [ids[-32:]]}).json()
    assert left.json() != cut.json()


@pytest.mark.parametrize("path,body", [
    ("/embed", {"inputs": [True, False]}),  # not token ids 1 and 0
    ("/embed", {"inputs": "x", "normalize": "yes"}),
    ("/embed", {"inputs": "x", "truncate": 1}),
    ("/embed", {"inputs": "x", "dimensions": "8"}),
    ("/v1/embeddings", {"input": [True], "model": MODEL}),
    ("/v1/embeddings", {"input": "x", "model": MODEL, "dimensions": True}),
    ("/v1/embeddings", {"input": ["x", [1, 2]], "model": MODEL}),  # OpenAI takes no mixed batch
])
def test_values_of_the_wrong_json_type_are_refused_not_coerced(client, path, body):
    r = client.post(path, json=body)
    assert r.status_code in (400, 422), r.text
    _check_shape("openai" if path.startswith("/v1") else "tei", r.json())


def test_tei_takes_a_batch_mixing_texts_and_token_ids(client):
    ids = client.post("/tokenize", json={"inputs": "deep learning"}).json()[0]
    ids = [t["id"] for t in ids]
    mixed = client.post("/embed", json={"inputs": ["what is it", ids, "padding-free"]})
    assert mixed.status_code == 200, mixed.text
    apart = client.post("/embed", json={"inputs": ["what is it", "padding-free"]}).json()
    alone = client.post("/embed", json={"inputs": [ids]}).json()
    assert mixed.json() == [apart[0], alone[0], apart[1]]
    # errors name each input by its place in the request
    r = client.post("/embed", json={"inputs": ["ok", [1, 99999999]]})
    assert r.status_code == 422 and "input 1" in r.json()["error"]
    r = client.post("/embed", json={"inputs": [[5, 6], LONG]})
    assert r.status_code == 413 and "input 1" in r.json()["error"]


def test_a_body_that_is_not_json_is_a_415(client):
    for path, family in (("/embed", "tei"), ("/v1/embeddings", "openai")):
        r = client.post(path, content=b"inputs=hello", headers={"content-type": "application/x-www-form-urlencoded"})
        assert r.status_code == 415 and "application/json" in r.text
        _check_shape(family, r.json())
    r = client.post("/embed", content=b'{"inputs": "x"}', headers={"content-type": ""})  # none: not read as JSON either
    assert r.status_code == 415 and "not none" in r.json()["error"]
    assert client.post("/embed", content=b'{"inputs": "x"}', headers={"content-type": "application/json; charset=utf-8"}).status_code == 200


def test_head_is_answered_wherever_get_is(client):
    for path in ("/health", "/info", "/metrics", "/v2/health/ready", "/v1/models"):
        r = client.head(path)
        assert r.status_code == 200 and r.content == b"", path
    metrics = client.get("/metrics").text  # counted under the route it matched, not as unmatched
    assert 'turboserve_requests_total{route="/health",status="200"}' in metrics
    assert 'route="unmatched",status="200"' not in metrics


def test_utility_routes_take_booleans_and_ids_strictly(client):
    """TEI's serde refuses "no" for a boolean and "5" for a token id; so do /tokenize, /decode and vLLM's bodies."""
    for path, body in (("/tokenize", {"inputs": "x", "add_special_tokens": "no"}), ("/decode", {"ids": [5], "skip_special_tokens": "off"}),
                       ("/decode", {"ids": ["5"]}), ("/tokenize", {"prompt": "x", "add_special_tokens": 0}),
                       ("/detokenize", {"tokens": [True]})):
        r = client.post(path, json=body)
        assert r.status_code in (400, 422) and "Traceback" not in r.text, (path, body, r.text)
    no_specials = client.post("/tokenize", json={"inputs": "x", "add_special_tokens": False})
    assert no_specials.status_code == 200 and not any(t["special"] for t in no_specials.json()[0])


def test_openai_takes_no_model_and_a_null_encoding_format(client):
    """model is optional (TEI and vLLM take none; infinity's clients send "default/not-specified"); encoding_format null
    is the default."""
    want = client.post("/v1/embeddings", json={"input": "x", "model": MODEL}).json()["data"]
    for body in ({"input": "x"}, {"input": "x", "model": None}, {"input": "x", "model": "default/not-specified"},
                 {"input": "x", "model": MODEL, "encoding_format": None}):
        r = client.post("/v1/embeddings", json=body)
        assert r.status_code == 200 and r.json()["data"] == want and r.json()["model"] == MODEL, (body, r.text)


def test_vllm_truncate_prompt_tokens_on_embeddings(client):
    """truncate_prompt_tokens k cuts each input to k tokens, special tokens kept (the answer equals the cut ids sent
    as token ids; usage counts k); -1 is the model's limit; token-id inputs are cut too; 0 and past the limit refused."""
    ids = [t["id"] for t in client.post("/tokenize", json={"inputs": LONG}).json()[0]]
    assert len(ids) > 32
    cut = ids[:4] + ids[-1:]  # [CLS] three tokens [SEP], as transformers' truncation with max_length 5 keeps them
    r = client.post("/v1/embeddings", json={"input": LONG, "model": MODEL, "truncate_prompt_tokens": 5})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 5, r.text
    assert r.json()["data"] == client.post("/v1/embeddings", json={"input": [cut], "model": MODEL}).json()["data"]
    r = client.post("/v1/embeddings", json={"input": [LONG, "short"], "model": MODEL, "truncate_prompt_tokens": -1})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 32 + 3, r.text
    r = client.post("/v1/embeddings", json={"input": [[7, 8, 9, 10]], "model": MODEL, "truncate_prompt_tokens": 2})
    assert r.json()["usage"]["prompt_tokens"] == 2
    for bad in (0, 33, -5):
        r = client.post("/v1/embeddings", json={"input": "x", "model": MODEL, "truncate_prompt_tokens": bad})
        assert r.status_code == 400 and "truncate_prompt_tokens" in r.json()["error"]["message"]


def test_kserve_data_that_is_not_a_list_says_so(client):
    r = _post(client, INFER, {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": 5}]})
    assert r.status_code == 400 and "'data' must be a list of the shape's elements, got int" in r.json()["error"]
    r = _post(client, INFER, {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES"}]})
    assert r.status_code == 400 and "neither 'data' nor binary data" in r.json()["error"]
