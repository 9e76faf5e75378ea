"""KServe v2 / Open Inference Protocol through the real `tritonclient.http` client."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.support import MODEL, expected_vector


@pytest.fixture
def tc(srv):
    client = triton.InferenceServerClient(srv.url.removeprefix("http://"))
    yield client
    client.close()


def _want(srv, texts):
    ids = srv.app.state.engine.tokenizer.encode(texts)
    rows = np.stack([expected_vector(e.ids) for e in ids])
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_health_and_metadata(tc):
    assert tc.is_server_live() and tc.is_server_ready()
    assert tc.is_model_ready(MODEL)
    meta = tc.get_model_metadata(MODEL)
    assert meta["inputs"][0] == {"name": "text", "datatype": "BYTES", "shape": [-1]}
    assert meta["outputs"][0]["shape"] == [-1, 8]
    assert tc.get_server_metadata()["name"] == "turboserve"
    config = tc.get_model_config(MODEL)  # Triton's configuration, as perf_analyzer reads it
    assert config["max_batch_size"] == 0 and config["input"] == [{"name": "text", "data_type": "TYPE_STRING", "dims": [-1]}]
    assert config["output"] == [{"name": "embedding", "data_type": "TYPE_FP32", "dims": [-1, 8]}]


@pytest.mark.parametrize("binary_in,binary_out", [(True, True), (False, False), (True, False), (False, True)])
def test_infer_binary_and_json(srv, tc, binary_in, binary_out):
    texts = ["héllo wörld", "second text", "3"]
    inp = triton.InferInput("text", [len(texts)], "BYTES")
    inp.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object), binary_data=binary_in)
    out = triton.InferRequestedOutput("embedding", binary_data=binary_out)
    result = tc.infer(MODEL, [inp], outputs=[out], request_id="req-7")
    got = result.as_numpy("embedding")
    assert got.shape == (3, 8) and got.dtype == np.float32
    np.testing.assert_allclose(got, _want(srv, texts), rtol=1e-5)
    assert result.get_response()["id"] == "req-7"


def test_infer_without_requested_outputs(srv, tc):
    inp = triton.InferInput("text", [1], "BYTES")
    inp.set_data_from_numpy(np.array([b"only"], dtype=object))
    np.testing.assert_allclose(tc.infer(MODEL, [inp]).as_numpy("embedding"), _want(srv, ["only"]), rtol=1e-5)


def test_errors_reach_the_client(tc):
    inp = triton.InferInput("text", [1], "BYTES")
    inp.set_data_from_numpy(np.array([b"x"], dtype=object))
    with pytest.raises(InferenceServerException) as err:
        tc.infer("missing-model", [inp])
    assert err.value.status() == "404"
    bad = triton.InferInput("text", [2], "FP32")
    bad.set_data_from_numpy(np.array([1.0, 2.0], dtype=np.float32))
    with pytest.raises(InferenceServerException) as err:
        tc.infer(MODEL, [bad])
    assert err.value.status() == "400" and "BYTES" in err.value.message()
    # Triton's answers for an input the model does not have, and a version it does not hold
    misnamed = triton.InferInput("not_text", [1], "BYTES")
    misnamed.set_data_from_numpy(np.array([b"x"], dtype=object))
    with pytest.raises(InferenceServerException) as err:
        tc.infer(MODEL, [misnamed])
    assert err.value.status() == "400" and "unexpected inference input 'not_text'" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        tc.infer(MODEL, [inp], model_version="7")
    assert err.value.status() == "404" and "no version '7'" in err.value.message()
    assert not tc.is_model_ready(MODEL, "2") and tc.is_model_ready(MODEL, "1") and tc.is_model_ready(MODEL)
    with pytest.raises(InferenceServerException):
        tc.get_model_metadata(MODEL, "7")


def test_raw_json_infer(srv, client):
    body = {"inputs": [{"name": "text", "shape": [2, 1], "datatype": "BYTES", "data": [["a"], ["b"]]}]}
    r = client.post(f"/v2/models/{MODEL}/infer", json=body)
    assert r.status_code == 200
    out = r.json()["outputs"][0]
    assert out["shape"] == [2, 8] and out["datatype"] == "FP32"
    np.testing.assert_allclose(np.array(out["data"]).reshape(2, 8), _want(srv, ["a", "b"]), rtol=1e-5)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests_from_tritonclient(srv, tc, algorithm):
    """tritonclient's request_compression_algorithm (Content-Encoding gzip / deflate), binary and JSON bodies."""
    texts = ["compressed request", "second"]
    for binary in (True, False):
        inp = triton.InferInput("text", [len(texts)], "BYTES")
        inp.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object), binary_data=binary)
        got = tc.infer(MODEL, [inp], request_compression_algorithm=algorithm).as_numpy("embedding")
        np.testing.assert_allclose(got, _want(srv, texts), rtol=1e-5)


def test_request_content_encodings_on_every_family(client):
    """gzip (several members too), zlib and raw deflate bodies are decoded on every route; an unknown coding is a 415,
    a corrupt or truncated body a 400/422 in the route's shape, and a small body that decodes past payload_limit
    a 413 (a 'zip bomb'); the server keeps serving."""
    import gzip  # noqa: PLC0415
    import json  # noqa: PLC0415
    import zlib  # noqa: PLC0415

    body = json.dumps({"inputs": ["deep", "learning"]}).encode()
    plain = client.post("/embed", content=body, headers={"content-type": "application/json"}).json()
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    encoded = {"gzip": gzip.compress(body), "x-gzip": gzip.compress(body[:10]) + gzip.compress(body[10:]),
               "deflate": zlib.compress(body), "identity, deflate": raw.compress(body) + raw.flush()}
    for coding, data in encoded.items():
        r = client.post("/embed", content=data, headers={"content-type": "application/json", "content-encoding": coding})
        assert r.status_code == 200 and r.json() == plain, (coding, r.text)
    openai = client.post("/v1/embeddings", content=gzip.compress(json.dumps({"input": "deep", "model": MODEL}).encode()),
                         headers={"content-type": "application/json", "content-encoding": "gzip"})
    assert openai.status_code == 200 and openai.json()["data"][0]["embedding"]
    r = client.post("/embed", content=body, headers={"content-type": "application/json", "content-encoding": "br"})
    assert r.status_code == 415 and "'br'" in r.json()["error"] and r.json()["error_type"] == "Validation"
    r = client.post("/v1/embeddings", content=b"\x1f\x8bnot gzip", headers={"content-type": "application/json",
                                                                            "content-encoding": "gzip"})
    assert r.status_code == 400 and "not valid gzip" in r.json()["error"]["message"]
    r = client.post("/embed", content=gzip.compress(body)[:-12], headers={"content-type": "application/json",
                                                                         "content-encoding": "gzip"})
    assert r.status_code in (400, 422) and "gzip" in r.json()["error"]
    bomb = gzip.compress(b" " * 3_000_000)  # 3 MB of spaces in ~3 kB, over the 2 MB payload_limit
    r = client.post("/v2/models/x/infer", content=bomb, headers={"content-type": "application/json", "content-encoding": "gzip"})
    assert r.status_code == 413 and set(r.json()) == {"error"} and len(bomb) < 10_000
    assert client.post("/embed", json={"inputs": "still serving"}).status_code == 200


def test_a_json_type_that_fastapi_does_not_read_is_a_415(client):
    """text/json passes for JSON nowhere in FastAPI (application/json and application/*+json do): say so."""
    r = client.post("/embed", content=b'{"inputs": "x"}', headers={"content-type": "text/json"})
    assert r.status_code == 415 and "text/json" in r.json()["error"]
    r = client.post("/embed", content=b'{"inputs": "x"}', headers={"content-type": "application/vnd.api+json"})
    assert r.status_code == 200


def test_the_classification_extension_is_refused(tc):
    inp = triton.InferInput("text", [1], "BYTES")
    inp.set_data_from_numpy(np.array([b"x"], dtype=object))
    with pytest.raises(InferenceServerException) as err:
        tc.infer(MODEL, [inp], outputs=[triton.InferRequestedOutput("embedding", class_count=3)])
    assert "classification" in str(err.value)


BIG = "1" * 5000  # past Python's int-from-text limit (4,300 digits): json.loads raises a plain ValueError
DEEP = "[" * 600 + '"x"' + "]" * 600  # within json.loads' nesting, past any tensor's
TEXT_INPUT = '{"name":"text","shape":[1],"datatype":"BYTES","data":%s}'


@pytest.mark.parametrize("path, body, needle", [
    (f"/v2/models/{MODEL}/infer", '{"id": %s, "inputs":[%s]}' % (BIG, TEXT_INPUT % '["a"]'), "4,300 digits"),
    (f"/v2/models/{MODEL}/infer", '{"inputs":[{"name":"text","shape":[%s],"datatype":"BYTES","data":["a"]}]}' % BIG, "4,300"),
    ("/v2/systemsharedmemory/region/r/register", '{"key":"/x","offset":%s,"byte_size":1}' % BIG, "4,300 digits"),
    ("/v2/repository/index", '{"ready": %s}' % BIG, "4,300 digits"),
    (f"/v2/models/{MODEL}/infer", '{"inputs":[%s]}' % (TEXT_INPUT % DEEP), "nested more than 32"),
    (f"/v2/models/{MODEL}/infer", '{"id": "\\ud800", "inputs":[%s]}' % (TEXT_INPUT % '["a"]'), "surrogate"),
])
def test_bodies_that_broke_the_kserve_parsers_are_400s(client, path, body, needle):
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and needle in r.json()["error"], r.text
    r = client.post(f"/v2/models/{MODEL}/infer", content=TEXT_INPUT % '["a"]', headers={"inference-header-content-length": BIG})
    assert r.status_code == 400 and len(r.json()["error"]) < 200
