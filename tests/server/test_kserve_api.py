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
