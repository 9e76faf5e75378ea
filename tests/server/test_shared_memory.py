"""Triton's system shared memory and model repository extensions, through tritonclient's own HTTP and gRPC
clients and its shared memory utility (real POSIX shared memory): inputs read from and outputs written to
registered regions give the same results as inline tensors, for the encoder and the DLRM; one registry for
both protocols; bad registrations and bad targets are clear 400s / INVALID_ARGUMENT and the server keeps
serving; CUDA shared memory is refused clearly; the repository lists what is served."""

from __future__ import annotations

import os
import uuid

import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
import tritonclient.utils.shared_memory as shm
from google.protobuf import json_format
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

from server.shared_memory import MAX_NAME, MAX_REGIONS
from tests.server.recommend_support import DENSE, NAME, SPARSE, embedding_sections, reference_scores
from tests.support import MODEL, dummy_server, expected_vector

HISTORY = np.array([[1, 2, 3, -1], [-1, -1, -1, -1], [7, 7, 50, 99]], dtype=np.int64)  # -1 pads a bag
TEXTS = ["héllo wörld", "a second, longer text to embed", "3"]


@pytest.fixture(scope="module")
def srv(dlrm):
    with dummy_server(**embedding_sections(dlrm), server={"grpc_port": 0}) as s:
        yield s


@pytest.fixture(params=["http", "grpc"])
def client(request, srv):
    if request.param == "http":
        c = thttp.InferenceServerClient(srv.url.removeprefix("http://"))
    else:
        c = tgrpc.InferenceServerClient(f"127.0.0.1:{srv.app.state.grpc_port}")
    c.protocol = request.param
    yield c
    c.unregister_system_shared_memory()
    c.close()


def _lib(c):
    return thttp if c.protocol == "http" else tgrpc


@pytest.fixture
def region():
    """A factory of POSIX shared memory objects (tritonclient's utility), destroyed after the test."""
    made = []

    def make(byte_size: int):
        key = f"/turboserve-test-{uuid.uuid4().hex[:12]}"
        handle = shm.create_shared_memory_region(key.strip("/"), key, byte_size)
        made.append(handle)
        return key, handle
    yield make
    for handle in made:
        shm.destroy_shared_memory_region(handle)


def _no_data_in(result) -> bool:
    """The response carries no tensor data (HTTP: no 'data' and no binary part; gRPC: no raw contents)."""
    response = result.get_response()
    if isinstance(response, dict):
        return all("data" not in o and "binary_data_size" not in o.get("parameters", {}) for o in response["outputs"])
    return len(response.raw_output_contents) == 0


def _want(srv, texts):
    rows = np.stack([expected_vector(e.ids) for e in srv.app.state.engine.tokenizer.encode(texts)])
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_embeddings_in_and_out_through_shared_memory(srv, client, region):
    lib = _lib(client)
    data = serialize_byte_tensor(np.array([t.encode() for t in TEXTS], dtype=object))
    raw = data.item() if data.size else b""
    in_key, in_handle = region(len(raw) + 16)
    out_key, out_handle = region(4096)
    shm.set_shared_memory_region(in_handle, [data], offset=16)  # the tensor 16 bytes into the object
    client.register_system_shared_memory("texts", in_key, len(raw), offset=16)
    client.register_system_shared_memory("vectors", out_key, 4096)
    status = client.get_system_shared_memory_status(**({"as_json": True} if client.protocol == "grpc" else {}))
    regions = status if client.protocol == "http" else list(status["regions"].values())
    assert sorted(r["name"] for r in regions) == ["texts", "vectors"]
    assert {r["name"]: int(r["byte_size"]) for r in regions} == {"texts": len(raw), "vectors": 4096}

    inp = lib.InferInput("text", [len(TEXTS)], "BYTES")
    inp.set_shared_memory("texts", len(raw))
    out = lib.InferRequestedOutput("embedding")
    out.set_shared_memory("vectors", 4096 - 64, offset=64)
    result = client.infer(MODEL, [inp], outputs=[out])
    assert _no_data_in(result)  # the data is in the region, not the response
    meta = result.get_output("embedding")
    if client.protocol == "grpc":  # (tritonclient's get_output(as_json=True) returns None)
        meta = json_format.MessageToDict(meta, preserving_proto_field_name=True)
    assert [int(d) for d in meta["shape"]] == [len(TEXTS), 8]
    written = len(TEXTS) * 8 * 4
    params = meta["parameters"]
    got_size = params["shared_memory_byte_size"]
    assert int(got_size if client.protocol == "http" else got_size["int64_param"]) == written
    vectors = shm.get_contents_as_numpy(out_handle, np.float32, [1024])[16:16 + len(TEXTS) * 8].reshape(len(TEXTS), 8)
    np.testing.assert_allclose(vectors, _want(srv, TEXTS), atol=1e-6)
    # The same texts inline: the same vectors (and the region's bytes were only read).
    inline = lib.InferInput("text", [len(TEXTS)], "BYTES")
    inline.set_data_from_numpy(np.array([t.encode() for t in TEXTS], dtype=object))
    np.testing.assert_array_equal(client.infer(MODEL, [inline]).as_numpy("embedding"), vectors)


def test_dlrm_inputs_and_scores_through_shared_memory(dlrm, client, region):
    lib = _lib(client)
    arrays = [("dense", np.array(DENSE, np.float32), "FP32"), ("user", np.array(SPARSE["user"], np.int64), "INT64"),
              ("item", np.array(SPARSE["item"], np.int64)[:, None], "INT64"), ("history", HISTORY, "INT64")]
    total = sum(a.nbytes for _, a, _ in arrays)
    key, handle = region(total + 12)
    client.register_system_shared_memory("features", key, total)
    out_key, out_handle = region(12)
    client.register_system_shared_memory("scores", out_key, 12)
    inputs, offset = [], 0
    for i, (name, array, dtype) in enumerate(arrays):
        shm.set_shared_memory_region(handle, [array], offset=offset)
        inp = lib.InferInput(name, list(array.shape), dtype)
        if i == 2:  # one input inline among shared memory ones: gRPC's raw contents then map to it alone
            inp.set_data_from_numpy(array)
        else:
            inp.set_shared_memory("features", array.nbytes, offset=offset)
        inputs.append(inp)
        offset += array.nbytes
    out = lib.InferRequestedOutput("scores")
    out.set_shared_memory("scores", 12)
    result = client.infer(NAME, inputs, outputs=[out])
    assert _no_data_in(result)
    np.testing.assert_allclose(shm.get_contents_as_numpy(out_handle, np.float32, [3]),
                               reference_scores(dlrm, DENSE, SPARSE), atol=1e-5, rtol=0)


def _refused(call, *words):
    with pytest.raises(InferenceServerException) as err:
        call()
    message = str(err.value)
    assert all(w in message for w in words), message
    assert "Traceback" not in message


def test_bad_registrations_are_refused_clearly(srv, client, region):
    key, handle = region(64)
    _refused(lambda: client.register_system_shared_memory("r", "/turboserve-no-such-object", 8), "cannot open")
    _refused(lambda: client.register_system_shared_memory("r", "/../etc/passwd", 8), "POSIX shared memory object")
    _refused(lambda: client.register_system_shared_memory("r", key, 65), "runs past the 64 bytes")
    _refused(lambda: client.register_system_shared_memory("r", key, 32, offset=40), "runs past")
    client.register_system_shared_memory("r", key, 64)
    _refused(lambda: client.register_system_shared_memory("r", key, 8), "already registered")
    _refused(lambda: client.get_system_shared_memory_status("nope"), "unable to find", "'nope'")
    client.unregister_system_shared_memory("nope")  # as Triton: unregistering an unknown name succeeds
    client.unregister_system_shared_memory("r")
    assert srv.app.state.shared_memory.status() == []
    _refused(lambda: client.register_system_shared_memory("n" * (MAX_NAME + 1), key, 8), f"1 to {MAX_NAME} characters")
    # each region holds a file descriptor: their number is bounded, so a client cannot take every descriptor
    for i in range(MAX_REGIONS):
        srv.app.state.shared_memory.register(f"r{i}", key, 0, 8)
    _refused(lambda: client.register_system_shared_memory("one-more", key, 8), f"{MAX_REGIONS} shared memory regions")
    client.unregister_system_shared_memory()
    client.register_system_shared_memory("again", key, 8)


def test_bad_targets_are_refused_and_the_server_keeps_serving(srv, client, region):
    lib = _lib(client)
    data = serialize_byte_tensor(np.array([b"some text"], dtype=object))
    raw = data.item()
    key, handle = region(64)
    shm.set_shared_memory_region(handle, [data])
    client.register_system_shared_memory("in", key, 64)

    def infer(size=len(raw), offset=0, region_name="in", out=None):
        inp = lib.InferInput("text", [1], "BYTES")
        inp.set_shared_memory(region_name, size, offset)
        return client.infer(MODEL, [inp], outputs=out)
    _refused(lambda: infer(region_name="absent"), "unable to find", "'absent'")
    _refused(lambda: infer(size=60, offset=8), "runs past the 64 bytes of region 'in'")
    _refused(lambda: infer(size=len(raw) + 3), "beyond 1 elements")  # bytes after the last element
    small = lib.InferRequestedOutput("embedding")
    small.set_shared_memory("in", 16)  # 8 floats need 32 bytes
    _refused(lambda: infer(out=[small]), "needs 32 bytes", "holds 16")
    # A client that shrinks its object after registering gets an error, not a server killed by SIGBUS.
    out_key, _ = region(64)
    client.register_system_shared_memory("out", out_key, 64)
    target = lib.InferRequestedOutput("embedding")
    target.set_shared_memory("out", 64)
    os.truncate(f"/dev/shm/{out_key.strip('/')}", 8)
    _refused(lambda: infer(out=[target]), "has shrunk below region 'out'")
    assert os.path.getsize(f"/dev/shm/{out_key.strip('/')}") == 8  # not grown back behind the client's back
    os.truncate(f"/dev/shm/{key.strip('/')}", 4)
    _refused(lambda: infer(), "has shrunk below region 'in'")
    inline = lib.InferInput("text", [1], "BYTES")
    inline.set_data_from_numpy(np.array([b"still serving"], dtype=object))
    assert client.infer(MODEL, [inline]).as_numpy("embedding").shape == (1, 8)


def test_cuda_shared_memory_is_refused_clearly(client):
    if client.protocol == "http":
        assert client.get_cuda_shared_memory_status() == []
    else:
        assert not client.get_cuda_shared_memory_status(as_json=True).get("regions")
    _refused(lambda: client.register_cuda_shared_memory("g", b"\0" * 64, 0, 64), "CUDA shared memory is not supported")
    client.unregister_cuda_shared_memory()


def test_repository_lists_the_served_models(client):
    index = client.get_model_repository_index(**({"as_json": True} if client.protocol == "grpc" else {}))
    models = index if client.protocol == "http" else index["models"]
    assert sorted((m["name"], m["state"]) for m in models) == sorted([(MODEL, "READY"), (NAME, "READY")])
    client.load_model(MODEL)  # already served: nothing to do
    _refused(lambda: client.load_model("other"), "cannot load model 'other'", "--model-control-mode=none")
    _refused(lambda: client.unload_model(MODEL), "cannot unload model")
    assert client.is_model_ready(MODEL)
    extensions = client.get_server_metadata(**({"as_json": True} if client.protocol == "grpc" else {}))["extensions"]
    assert {"system_shared_memory", "model_repository", "binary_tensor_data"} <= set(extensions)


def test_shared_memory_can_be_turned_off(region):
    key, _ = region(64)
    with dummy_server(server={"shared_memory": False}) as s:
        c = thttp.InferenceServerClient(s.url.removeprefix("http://"))
        _refused(lambda: c.register_system_shared_memory("r", key, 8), "turned off")
        inp = thttp.InferInput("text", [1], "BYTES")
        inp.set_shared_memory("r", 8)
        _refused(lambda: c.infer(MODEL, [inp]), "turned off")
        assert "system_shared_memory" not in c.get_server_metadata()["extensions"]
        c.close()
