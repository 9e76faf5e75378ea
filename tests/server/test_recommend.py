"""Recommendation serving end to end: tables imported into RocksDB, a DLRM over the parameter server, the
/v1 routes and KServe v2 (tritonclient.http), online updates over HTTP, and bad input (Redis streams, Redis
outages and restarts: test_recommend_restarts.py; gRPC: test_grpc_recommend.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from server.import_tables import import_table
from tests.server.recommend_support import DENSE, NAME, SPARSE, embedding_sections, make_dlrm, reference_scores, wait_until
from tests.support import MODEL, dummy_server


@pytest.fixture(scope="module")
def srv(dlrm):
    with dummy_server(**embedding_sections(dlrm)) as s:
        yield s


@pytest.fixture
def client(srv):
    with srv.client() as c:
        yield c


# -- JSON routes ------------------------------------------------------------------------------------------
def test_recommend_equals_the_dlrm_on_the_npy_tables(dlrm, client):
    r = client.post("/v1/recommend", json={"dense": DENSE, "sparse": SPARSE})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == NAME
    np.testing.assert_allclose(r.json()["scores"], reference_scores(dlrm, DENSE, SPARSE), atol=1e-5, rtol=0)
    assert float(r.headers["x-inference-time"]) > 0


def test_lookup_returns_the_imported_rows_and_the_default_for_absent_keys(dlrm, client):
    table = np.load(dlrm["tables"]["users"])
    r = client.post("/v1/embeddings/lookup", json={"table": "users", "keys": [0, 17, 199, 17]})
    assert r.status_code == 200
    body = r.json()
    assert body["table"] == "users" and body["dim"] == 4 and body["found"] == [True] * 4
    np.testing.assert_array_equal(np.array(body["vectors"], np.float32), table[[0, 17, 199, 17]])
    r = client.post("/v1/embeddings/lookup", json={"table": "scratch", "keys": [1, 1000]})
    assert r.json()["found"] == [True, False] and r.json()["vectors"][1] == [-1.0, -1.0, -1.0]


def test_http_update_is_acknowledged_visible_and_refreshes_the_device_cache(srv, client):
    rec = srv.app.state.recommender
    client.post("/v1/embeddings/lookup", json={"table": "scratch", "keys": [5]})  # now in the device cache
    assert rec.ps.device_cache.contains("scratch", torch.tensor([5])).item()
    r = client.post("/v1/embeddings/update", json={"table": "scratch", "keys": [5, 6], "vectors": [[1, 2, 3], [4, 5, 6.5]]})
    assert r.status_code == 200 and r.json() == {"table": "scratch", "updated": 2}

    def seen():
        got = client.post("/v1/embeddings/lookup", json={"table": "scratch", "keys": [5, 6]}).json()["vectors"]
        return got == [[1, 2, 3], [4, 5, 6.5]]

    wait_until(seen, what="HTTP update visible")
    cached, found = rec.ps.device_cache.lookup("scratch", torch.tensor([5]))
    assert found.item() and cached[0].tolist() == [1, 2, 3]
    stored, found = rec.ps.persistent.lookup("scratch", torch.tensor([6]))
    assert found.item() and stored[0].tolist() == [4, 5, 6.5]


def test_embedding_metrics_and_request_metrics(client):
    client.post("/v1/recommend", json={"dense": DENSE[:1], "sparse": {f: v[:1] for f, v in SPARSE.items()}})
    text = client.get("/metrics").text
    for needle in ('turboserve_embedding_cache_hits_total{tier="device"}', 'turboserve_embedding_cache_misses_total{tier="persistent"}',
                   'turboserve_embedding_defaults_total{reason="missing"}', "turboserve_embedding_device_cache_bytes",
                   "turboserve_embedding_shared_fills_skipped_total 0.0",
                   'turboserve_requests_total{route="/v1/recommend",status="200"}'):
        assert needle in text, needle


def test_volatile_preload_answers_from_memory_before_the_first_request(tmp_path):
    own = make_dlrm(tmp_path)  # its own RocksDB: the module's server holds the shared one's lock
    with dummy_server(**embedding_sections(own, volatile_preload=1.0)) as s, s.client() as c:
        ps = s.app.state.recommender.ps
        assert ps.volatile.keys("users").tolist() == list(range(200)) and ps.volatile.keys("items").size == 100
        r = c.post("/v1/recommend", json={"dense": DENSE, "sparse": SPARSE})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["scores"], reference_scores(own, DENSE, SPARSE), atol=1e-5, rtol=0)
        stats = ps.stats()
        assert stats["volatile"]["hits"] > 0 and stats["persistent"]["hits"] + stats["persistent"]["misses"] == 0
        assert "turboserve_embedding_volatile_preloaded_rows_total 350.0" in c.get("/metrics").text  # 200 + 100 + 50


def test_a_bfloat16_dlrm_answers_close_to_the_float32_reference(tmp_path):
    own = make_dlrm(tmp_path)
    sections = embedding_sections(own)
    sections["recommend"]["dtype"] = "bfloat16"
    with dummy_server(**sections) as s, s.client() as c:
        assert s.app.state.recommender.model.dtype == torch.bfloat16
        r = c.post("/v1/recommend", json={"dense": DENSE, "sparse": SPARSE})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["scores"], reference_scores(own, DENSE, SPARSE), atol=0.02, rtol=0)


def test_recommend_reads_its_json_body_in_one_pass_with_fastapis_errors(client, dlrm):
    body = {"dense": DENSE, "sparse": SPARSE}
    r = client.post("/v1/recommend", content=b'{"dense": [[1, 2, 3]], "sparse": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "Invalid JSON: EOF while parsing" in r.json()["error"]["message"]
    r = client.post("/v1/recommend", json={"dense": DENSE})
    assert r.status_code == 400 and "sparse: Field required" in r.json()["error"]["message"]
    import json  # noqa: PLC0415

    for kind in ("text/plain", None):  # FastAPI reads neither as JSON: an unsupported media type, as on every route
        r = client.post("/v1/recommend", content=json.dumps(body), headers={"content-type": kind} if kind else {})
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", r.text
    r = client.post("/v1/recommend", content=json.dumps(body), headers={"content-type": "application/vnd.api+json"})
    assert r.status_code == 200
    np.testing.assert_allclose(r.json()["scores"], reference_scores(dlrm, DENSE, SPARSE), atol=1e-5, rtol=0)
    schema = client.get("/openapi.json").json()["paths"]["/v1/recommend"]["post"]["requestBody"]
    assert schema["content"]["application/json"]["schema"]["required"] == ["dense", "sparse"]


def test_encoder_still_served_beside_the_dlrm(client):
    r = client.post("/v1/embeddings", json={"model": MODEL, "input": "hello"})
    assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 8


# -- KServe v2 through tritonclient.http -----------------------------------------------------------------
@pytest.fixture
def tc(srv):
    c = triton.InferenceServerClient(srv.url.removeprefix("http://"))
    yield c
    c.close()


def test_kserve_metadata_and_ready(tc):
    assert tc.is_model_ready(NAME) and tc.is_model_ready(MODEL)
    meta = tc.get_model_metadata(NAME)
    assert meta["platform"] == "turboserve_dlrm"
    assert meta["inputs"][0] == {"name": "dense", "datatype": "FP32", "shape": [-1, 3]}
    assert [i["name"] for i in meta["inputs"][1:]] == ["user", "item", "history"]
    assert meta["outputs"] == [{"name": "scores", "datatype": "FP32", "shape": [-1]}]


@pytest.mark.parametrize("binary_in,binary_out", [(True, True), (False, False), (True, False), (False, True)])
def test_kserve_infer_equals_the_dlrm(dlrm, tc, binary_in, binary_out):
    history = np.array([[1, 2, 3, -1], [-1, -1, -1, -1], [7, 7, 50, 99]], dtype=np.int64)  # -1 pads a bag
    inputs = []
    for name, array, dtype in [("dense", np.array(DENSE, np.float32), "FP32"),
                               ("user", np.array(SPARSE["user"], np.int64), "INT64"),
                               ("item", np.array(SPARSE["item"], np.int64)[:, None], "INT64"),
                               ("history", history, "INT64")]:
        inp = triton.InferInput(name, list(array.shape), dtype)
        inp.set_data_from_numpy(array, binary_data=binary_in)
        inputs.append(inp)
    result = tc.infer(NAME, inputs, outputs=[triton.InferRequestedOutput("scores", binary_data=binary_out)], request_id="r1")
    scores = result.as_numpy("scores")
    assert scores.shape == (3,) and scores.dtype == np.float32
    np.testing.assert_allclose(scores, reference_scores(dlrm, DENSE, SPARSE), atol=1e-5, rtol=0)
    assert result.get_response()["id"] == "r1"


def test_kserve_errors_reach_the_client(tc):
    dense = triton.InferInput("dense", [1, 3], "FP32")
    dense.set_data_from_numpy(np.zeros((1, 3), np.float32))
    user = triton.InferInput("user", [1], "INT64")
    user.set_data_from_numpy(np.array([500], np.int64))  # cardinality 200
    with pytest.raises(InferenceServerException) as err:
        tc.infer(NAME, [dense, user])
    assert err.value.status() == "400" and "missing ['history', 'item']" in err.value.message()
    item, history = triton.InferInput("item", [1], "INT64"), triton.InferInput("history", [1], "INT64")
    item.set_data_from_numpy(np.array([1], np.int64))
    history.set_data_from_numpy(np.array([1], np.int64))
    with pytest.raises(InferenceServerException) as err:
        tc.infer(NAME, [dense, user, item, history])
    assert err.value.status() == "400" and "key 500" in err.value.message() and "out of range" in err.value.message()


# -- bad input --------------------------------------------------------------------------------------------
def _sparse(**changes):
    return {**SPARSE, **changes}


@pytest.mark.parametrize("path,body,status,code,needle", [
    ("/v1/embeddings/lookup", {"table": "nope", "keys": [1]}, 404, "table_not_found", "no embedding table 'nope'"),
    ("/v1/embeddings/lookup", {"table": "users", "keys": [1.5]}, 400, "invalid_request", "keys"),
    ("/v1/embeddings/lookup", {"table": "users", "keys": ["1"]}, 400, "invalid_request", "keys"),
    ("/v1/embeddings/lookup", {"table": "users", "keys": [True]}, 400, "invalid_request", "keys"),
    ("/v1/embeddings/lookup", {"table": "users", "keys": [2 ** 63]}, 400, "invalid_request", "out of the int64 range"),
    ("/v1/embeddings/lookup", {"table": "users", "keys": list(range(65))}, 413, "payload_too_large", "embeddings.max_keys=64"),
    ("/v1/embeddings/update", {"table": "scratch", "keys": [1], "vectors": [[1, 2]]}, 400, "invalid_request", "has dim 3"),
    ("/v1/embeddings/update", {"table": "scratch", "keys": [1, 2], "vectors": [[1, 2, 3]]}, 400, "invalid_request", "[2, 3]"),
    ("/v1/embeddings/update", {"table": "scratch", "keys": [1, 2], "vectors": [[1, 2, 3], [1]]}, 400, "invalid_request", "3 values"),
    ("/v1/embeddings/update", {"table": "nope", "keys": [1], "vectors": [[1]]}, 404, "table_not_found", "nope"),
    ("/v1/recommend", {"dense": DENSE, "sparse": _sparse(user=[3, 200, 3])}, 400, "invalid_request", "key 200"),
    ("/v1/recommend", {"dense": DENSE, "sparse": _sparse(user=[3, -1, 3])}, 400, "invalid_request", "key -1"),
    ("/v1/recommend", {"dense": DENSE, "sparse": _sparse(user=[3, 4])}, 400, "invalid_request", "2 samples"),
    ("/v1/recommend", {"dense": [[1, 2]] * 3, "sparse": SPARSE}, 400, "invalid_request", "[batch, 3]"),
    ("/v1/recommend", {"dense": DENSE, "sparse": {"user": SPARSE["user"]}}, 400, "invalid_request", "missing ['history', 'item']"),
    ("/v1/recommend", {"dense": DENSE, "sparse": _sparse(extra=[1, 2, 3])}, 400, "invalid_request", "unknown ['extra']"),
    ("/v1/recommend", {"dense": DENSE, "sparse": _sparse(user=["a", 1, 2])}, 400, "invalid_request", "sparse.user"),
    ("/v1/recommend", {"dense": [[0, 0, 0]] * 9, "sparse": {f: [1] * 9 for f in SPARSE}}, 413, "payload_too_large", "max_batch=8"),
    ("/v1/recommend", {"dense": DENSE, "sparse": _sparse(history=[list(range(30))] * 3)}, 413, "payload_too_large", "max_keys"),
    ("/v1/recommend", {"model": "other", "dense": DENSE, "sparse": SPARSE}, 404, "model_not_found", "'ctr'"),
    ("/v1/recommend", {"dense": [[10 ** 400, 0, 0]] * 3, "sparse": SPARSE}, 400, "invalid_request", "finite"),
    ("/v1/embeddings/update", {"table": "scratch", "keys": [1], "vectors": [[1, 1, 10 ** 400]]}, 400, "invalid_request", "finite"),
])
def test_bad_input_is_a_4xx_in_openai_style(client, path, body, status, code, needle):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and needle in err["message"], err
    assert "Traceback" not in r.text


def test_bad_kserve_tensors_are_400_in_kserve_style(client):
    ok = {"name": "dense", "shape": [1, 3], "datatype": "FP32", "data": [0, 0, 0]}
    for inputs, needle in [
        ([ok, {"name": "user", "shape": [1], "datatype": "FP32", "data": [1.5]}], "integers"),
        ([ok, {"name": "user", "shape": [2], "datatype": "INT64", "data": [1]}], "says 2 elements"),
        ([{**ok, "datatype": "INT64"}], "must be FP32"),
        ([ok, {"name": "user", "shape": [1], "datatype": "INT64", "data": ["1"]}], "not a INT64 value"),
        ([{**ok, "shape": [], "data": [1.0]}], "[batch, num_dense]"),
    ]:
        r = client.post(f"/v2/models/{NAME}/infer", json={"inputs": inputs})
        assert r.status_code == 400 and needle in r.json()["error"], r.text


def test_routes_answer_404_when_embeddings_are_off():
    with dummy_server() as s, s.client() as c:
        r = c.post("/v1/recommend", json={"dense": DENSE, "sparse": SPARSE})
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_enabled"
        assert "embeddings.enabled=false" in r.json()["error"]["message"]
        r = c.post("/v1/embeddings/lookup", json={"table": "users", "keys": [1]})
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_enabled"
        r = c.post(f"/v2/models/{NAME}/infer", json={"inputs": [{"name": "dense", "shape": [1, 3], "datatype": "FP32", "data": [0, 0, 0]}]})
        assert r.status_code == 404 and "not served here" in r.json()["error"]
        assert "turboserve_embedding" not in c.get("/metrics").text


def test_parameter_server_without_a_dlrm_serves_tables_only(dlrm, tmp_path):
    sections = embedding_sections(dlrm, path=str(tmp_path / "db"))
    import_table(str(tmp_path / "db"), "users", str(dlrm["tables"]["users"]), progress=False)
    with dummy_server(embeddings=sections["embeddings"]) as s, s.client() as c:
        assert c.post("/v1/embeddings/lookup", json={"table": "users", "keys": [1]}).json()["found"] == [True]
        r = c.post("/v1/recommend", json={"dense": DENSE, "sparse": SPARSE})
        assert r.status_code == 404 and "recommend.model_path" in r.json()["error"]["message"]


def test_a_non_ascii_digit_header_length_is_a_400(client):
    """'²'.isdigit() is True in Python; int('²') is not a number."""
    body = b'{"inputs":[{"name":"text","shape":[1],"datatype":"BYTES","data":["a"]}]}'
    r = client.post(f"/v2/models/{NAME}/infer", content=body,
                    headers=[(b"content-type", b"application/json"), (b"inference-header-content-length", b"\xb2")])
    assert r.status_code == 400 and "does not fit" in r.json()["error"], r.text
