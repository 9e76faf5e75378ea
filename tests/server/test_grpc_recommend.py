"""The DLRM over KServe v2 gRPC (tritonclient.grpc): metadata, the same scores as the reference DLRM and as
HTTP, raw and typed contents, errors as status codes."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.server.recommend_support import DENSE, NAME, SPARSE, embedding_sections, reference_scores
from tests.support import MODEL, dummy_server

HISTORY = np.array([[1, 2, 3, -1], [-1, -1, -1, -1], [7, 7, 50, 99]], dtype=np.int64)  # -1 pads a bag


@pytest.fixture(scope="module")
def address(dlrm):
    with dummy_server(**embedding_sections(dlrm), server={"grpc_port": 0}) as s:
        yield f"127.0.0.1:{s.app.state.grpc_port}"


@pytest.fixture
def gc(address):
    client = tgrpc.InferenceServerClient(address)
    yield client
    client.close()


def _arrays(user=SPARSE["user"]):
    return [("dense", np.array(DENSE, np.float32), "FP32"), ("user", np.array(user, np.int64), "INT64"),
            ("item", np.array(SPARSE["item"], np.int64)[:, None], "INT64"), ("history", HISTORY, "INT64")]


def _inputs(user=SPARSE["user"]):
    out = []
    for name, array, dtype in _arrays(user):
        inp = tgrpc.InferInput(name, list(array.shape), dtype)
        inp.set_data_from_numpy(array)
        out.append(inp)
    return out


def test_metadata_and_ready(gc):
    assert gc.is_model_ready(NAME) and gc.is_model_ready(MODEL)
    meta = gc.get_model_metadata(NAME, as_json=True)
    assert meta["platform"] == "turboserve_dlrm"
    assert [(i["name"], i["datatype"]) for i in meta["inputs"]] == [("dense", "FP32"), ("user", "INT64"), ("item", "INT64"),
                                                                       ("history", "INT64")]
    assert meta["outputs"] == [{"name": "scores", "datatype": "FP32", "shape": ["-1"]}]
    config = gc.get_model_config(NAME, as_json=True)["config"]
    assert config["platform"] == "turboserve_dlrm" and config["input"][0] == {"name": "dense", "data_type": "TYPE_FP32",
                                                                               "dims": ["-1", "3"]}
    assert [(i["name"], i["data_type"]) for i in config["input"][1:]] == [(n, "TYPE_INT64") for n in ("user", "item", "history")]


def test_scores_equal_the_reference_dlrm_raw_and_typed(dlrm, gc, address):
    want = reference_scores(dlrm, DENSE, SPARSE)
    result = gc.infer(NAME, _inputs(), outputs=[tgrpc.InferRequestedOutput("scores")], request_id="s1")
    np.testing.assert_allclose(result.as_numpy("scores"), want, atol=1e-5, rtol=0)
    assert result.get_response().id == "s1"
    # The same request with typed contents instead of raw bytes (what other gRPC clients may send).
    request = service_pb2.ModelInferRequest(model_name=NAME)
    for name, array, dtype in _arrays():
        tensor = request.inputs.add(name=name, datatype=dtype, shape=list(array.shape))
        (tensor.contents.fp32_contents if dtype == "FP32" else tensor.contents.int64_contents).extend(array.reshape(-1).tolist())
    with grpc.insecure_channel(address) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    np.testing.assert_allclose(np.frombuffer(response.raw_output_contents[0], "<f4"), want, atol=1e-5, rtol=0)


def test_dlrm_statistics(gc):
    gc.infer(NAME, _inputs())
    stats = {m["name"]: m for m in gc.get_inference_statistics(as_json=True)["model_stats"]}
    assert set(stats) == {NAME, MODEL}
    assert int(stats[NAME]["inference_count"]) >= 3 and int(stats[NAME]["inference_stats"]["success"]["count"]) >= 1


def test_errors_are_status_codes(gc):
    with pytest.raises(InferenceServerException) as err:
        gc.infer(NAME, _inputs(user=[500, 1, 2]))  # cardinality 200
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and "key 500" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        gc.infer(NAME, _inputs()[:2])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and "missing ['history', 'item']" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        gc.infer(NAME, _inputs(), outputs=[tgrpc.InferRequestedOutput("embedding")])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and "only output is 'scores'" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        gc.infer("nope", _inputs())
    assert err.value.status() == "StatusCode.NOT_FOUND" and NAME in err.value.message()
