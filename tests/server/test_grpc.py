"""KServe v2 over gRPC through the real `tritonclient.grpc` client: health, metadata, inference (the same
vectors as over HTTP), parameters, errors as gRPC status codes, the API key, metrics, and cancellation."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.support import MODEL, DummyEmbedder, dummy_server, expected_vector

KEY = "grpc-secret"


@pytest.fixture(scope="module")
def grpc_srv():
    embedder = DummyEmbedder(delay_s=0.002)  # a batch's fixed time: dp's profile of an instant dummy is timer noise
    with dummy_server(embedder, server={"grpc_port": 0}) as s:
        yield s


@pytest.fixture
def gc(grpc_srv):
    client = tgrpc.InferenceServerClient(f"127.0.0.1:{grpc_srv.app.state.grpc_port}")
    yield client
    client.close()


def _input(texts):
    inp = tgrpc.InferInput("text", [len(texts)], "BYTES")
    inp.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
    return inp


def _want(srv, texts, normalize=True):
    rows = np.stack([expected_vector(e.ids) for e in srv.app.state.engine.tokenizer.encode(texts)])
    return rows / np.linalg.norm(rows, axis=1, keepdims=True) if normalize else rows


def test_health_and_metadata(gc):
    assert gc.is_server_live() and gc.is_server_ready() and gc.is_model_ready(MODEL)
    # as Triton answers: a model or version not served is not ready, not an error
    assert not gc.is_model_ready(MODEL, "2") and not gc.is_model_ready("nope")
    meta = gc.get_model_metadata(MODEL, as_json=True)
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": ["-1"]}]
    assert meta["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": ["-1", "8"]}]
    assert gc.get_server_metadata(as_json=True)["name"] == "turboserve"
    config = gc.get_model_config(MODEL, as_json=True)["config"]  # Triton's configuration, as perf_analyzer reads it
    assert config["input"] == [{"name": "text", "data_type": "TYPE_STRING", "dims": ["-1"]}]
    assert config["output"] == [{"name": "embedding", "data_type": "TYPE_FP32", "dims": ["-1", "8"]}]


def test_infer_matches_http_and_takes_parameters(grpc_srv, gc):
    texts = ["héllo wörld", "second text", "3"]
    result = gc.infer(MODEL, [_input(texts)], outputs=[tgrpc.InferRequestedOutput("embedding")], request_id="g-7")
    got = result.as_numpy("embedding")
    assert got.shape == (3, 8) and got.dtype == np.float32 and result.get_response().id == "g-7"
    np.testing.assert_allclose(got, _want(grpc_srv, texts), rtol=1e-5)
    with grpc_srv.client() as http:  # the same engine over HTTP answers the same vectors
        body = {"inputs": [{"name": "text", "shape": [3], "datatype": "BYTES", "data": texts}]}
        doc = http.post(f"/v2/models/{MODEL}/infer", json=body).json()
        np.testing.assert_allclose(np.asarray(doc["outputs"][0]["data"]).reshape(3, 8), got, rtol=1e-6)
    raw = gc.infer(MODEL, [_input(texts)], parameters={"normalize": False}).as_numpy("embedding")
    np.testing.assert_allclose(raw, _want(grpc_srv, texts, normalize=False), rtol=1e-5)
    long_text = " ".join(f"w{i}" for i in range(100))
    with pytest.raises(InferenceServerException) as err:
        gc.infer(MODEL, [_input([long_text])])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and "more than the limit" in err.value.message()
    cut = gc.infer(MODEL, [_input([long_text])], parameters={"truncate": True}).as_numpy("embedding")
    assert cut.shape == (1, 8)


@pytest.mark.parametrize("call,status,words", [
    (lambda c: c.infer("missing-model", [_input(["x"])]), "NOT_FOUND", "not served"),
    (lambda c: c.infer(MODEL, [tgrpc.InferInput("text", [2], "FP32").set_data_from_numpy(
        np.zeros(2, np.float32))]), "INVALID_ARGUMENT", "BYTES"),
    (lambda c: c.infer(MODEL, [tgrpc.InferInput("not_text", [1], "BYTES").set_data_from_numpy(
        np.array([b"x"], dtype=object))]), "INVALID_ARGUMENT", "unexpected inference input 'not_text'"),
    (lambda c: c.infer(MODEL, [_input(["x"])], model_version="2"), "NOT_FOUND", "no version '2'"),
    (lambda c: c.get_model_metadata(MODEL, "7"), "NOT_FOUND", "no version '7'"),
    (lambda c: c.infer(MODEL, [_input(["x"])], outputs=[tgrpc.InferRequestedOutput("other")]), "INVALID_ARGUMENT",
     "only output"),
    (lambda c: c.infer(MODEL, [_input(["x"])], parameters={"truncate": "yes"}), "INVALID_ARGUMENT", "must be a bool"),
    (lambda c: c.infer(MODEL, [_input([""])]), "INVALID_ARGUMENT", "empty"),
    (lambda c: c.infer(MODEL, [_input(["x"] * 33)]), "INVALID_ARGUMENT", "max_client_batch_size"),
    (lambda c: c.get_model_metadata("missing-model"), "NOT_FOUND", "not served"),
])
def test_errors_are_grpc_status_codes_and_the_server_keeps_serving(grpc_srv, gc, call, status, words):
    with pytest.raises(InferenceServerException) as err:
        call(gc)
    assert err.value.status() == f"StatusCode.{status}" and words in err.value.message()
    assert "Traceback" not in err.value.message()
    assert gc.infer(MODEL, [_input(["still serving"])]).as_numpy("embedding").shape == (1, 8)


def test_request_id_and_timings_come_back_as_trailing_metadata(grpc_srv):
    request = service_pb2.ModelInferRequest(model_name=MODEL, inputs=[service_pb2.ModelInferRequest.InferInputTensor(
        name="text", datatype="BYTES", shape=[1], contents=service_pb2.InferTensorContents(bytes_contents=[b"hello"]))])
    with grpc.insecure_channel(f"127.0.0.1:{grpc_srv.app.state.grpc_port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        response, call = stub.ModelInfer.with_call(request, metadata=[("x-request-id", "trace-9")], timeout=30)
        trailing = dict(call.trailing_metadata())
        assert trailing["x-request-id"] == "trace-9" and int(trailing["x-compute-tokens"]) == 3
        assert float(trailing["x-total-time"]) >= float(trailing["x-inference-time"]) > 0
        np.testing.assert_allclose(np.frombuffer(response.raw_output_contents[0], "<f4"), _want(grpc_srv, ["hello"])[0],
                                   rtol=1e-5)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(service_pb2.ModelInferRequest(model_name="nope"), metadata=[("x-request-id", "trace-10")])
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert dict(err.value.trailing_metadata())["x-request-id"] == "trace-10"


def test_a_message_over_the_payload_limit_is_refused():
    with dummy_server(server={"grpc_port": 0, "payload_limit": 4096}) as s:
        client = tgrpc.InferenceServerClient(f"127.0.0.1:{s.app.state.grpc_port}")
        with pytest.raises(InferenceServerException) as err:
            client.infer(MODEL, [_input(["x" * 5000])])
        assert err.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert client.infer(MODEL, [_input(["small"])]).as_numpy("embedding").shape == (1, 8)
        client.close()


def test_inference_statistics_count_requests_sequences_and_batches(grpc_srv, gc):
    before = gc.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
    gc.infer(MODEL, [_input(["one", "two", "three"])])
    after = gc.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
    assert after["name"] == MODEL
    assert int(after["inference_count"]) - int(before.get("inference_count", 0)) == 3
    assert int(after["execution_count"]) > int(before.get("execution_count", 0))
    ok, was = after["inference_stats"]["success"], before["inference_stats"].get("success", {})
    assert int(ok["count"]) - int(was.get("count", 0)) == 1 and int(ok["ns"]) > int(was.get("ns", 0))
    with grpc_srv.client() as http:  # the same numbers over HTTP
        assert http.get(f"/v2/models/{MODEL}/stats").json()["model_stats"][0]["inference_count"] == int(after["inference_count"])
        assert http.get("/v2/models/nope/stats").status_code == 404
    with pytest.raises(InferenceServerException) as err:
        gc.get_inference_statistics("nope")
    assert err.value.status() == "StatusCode.NOT_FOUND"


def test_calls_are_counted_in_metrics(grpc_srv, gc):
    gc.infer(MODEL, [_input(["counted"])])
    with grpc_srv.client() as http:
        text = http.get("/metrics").text
    assert 'turboserve_requests_total{route="grpc ModelInfer",status="OK"}' in text
    assert 'route="grpc ModelInfer",status="NOT_FOUND"' in text


def test_a_cancelled_call_drops_its_queued_work():
    embedder = DummyEmbedder()
    with dummy_server(embedder, server={"grpc_port": 0}) as s, s.client() as http:
        client = tgrpc.InferenceServerClient(f"127.0.0.1:{s.app.state.grpc_port}")
        with ThreadPoolExecutor(2) as pool:
            blocker = embedder.occupy(pool, http)  # the worker is busy: the next call waits in the queue
            with pytest.raises(InferenceServerException) as err:
                client.infer(MODEL, [_input(["waits"])], client_timeout=0.5)
            assert "Deadline" in err.value.message() or err.value.status() == "StatusCode.DEADLINE_EXCEEDED"
            queue, until = s.app.state.engine.queue, time.monotonic() + 10
            while queue.depth and time.monotonic() < until:  # the server sees the deadline on its own clock
                time.sleep(0.01)
            assert queue.depth == 0  # withdrawn while the worker was still busy: it will never be computed
            embedder.gate.set()
            assert blocker.result(10).status_code == 200
        metrics = http.get("/metrics").text
        assert 'turboserve_requests_dropped_total{reason="disconnect"} 1.0' in metrics
        assert not any("waits" in str(b) for b in embedder.batches)  # never computed
        client.close()


def test_a_grpc_port_another_server_holds_is_not_shared():
    """grpcio's default SO_REUSEPORT let the server bind a port another grpcio server held (and clients were split
    between them): the bind must fail instead."""
    import asyncio  # noqa: PLC0415
    from types import SimpleNamespace  # noqa: PLC0415

    from server.grpc_kserve import start_grpc  # noqa: PLC0415

    async def main():
        other = grpc.aio.server()
        port = other.add_insecure_port("127.0.0.1:0")
        await other.start()
        try:
            with pytest.raises(OSError, match="cannot bind"):
                await start_grpc(SimpleNamespace(state=SimpleNamespace()), "127.0.0.1", port, None, 1 << 20)
        finally:
            await other.stop(None)

    asyncio.run(main())


def test_an_error_echoing_a_huge_name_reaches_the_client_as_itself(gc):
    """A 100 kB model name echoed in NOT_FOUND passed the trailers' limit: the client got RESOURCE_EXHAUSTED."""
    with pytest.raises(InferenceServerException) as err:
        gc.infer("m" * 100_000, [_input(["x"])])
    assert err.value.status() == "StatusCode.NOT_FOUND" and len(err.value.message()) < 4000


def test_grpc_probes_follow_the_open_paths():
    """With api_key_open_paths [] the HTTP probes need the key: so do gRPC's ServerLive / ServerReady."""
    with dummy_server(server={"grpc_port": 0, "api_key": KEY, "api_key_open_paths": ["/health"]}) as s:
        client = tgrpc.InferenceServerClient(f"127.0.0.1:{s.app.state.grpc_port}")
        for probe in (client.is_server_live, client.is_server_ready):
            with pytest.raises(InferenceServerException) as err:
                probe()
            assert err.value.status() == "StatusCode.UNAUTHENTICATED"
            assert probe(headers={"authorization": f"Bearer {KEY}"})
        client.close()
        assert s.client().get("/v2/health/live").status_code == 401


def test_the_api_key_guards_grpc_too():
    with dummy_server(server={"grpc_port": 0, "api_key": KEY}) as s:
        client = tgrpc.InferenceServerClient(f"127.0.0.1:{s.app.state.grpc_port}")
        assert client.is_server_live()  # probes stay open, as /health does
        with pytest.raises(InferenceServerException) as err:
            client.infer(MODEL, [_input(["x"])])
        assert err.value.status() == "StatusCode.UNAUTHENTICATED"
        ok = client.infer(MODEL, [_input(["x"])], headers={"authorization": f"Bearer {KEY}"})
        assert ok.as_numpy("embedding").shape == (1, 8)
        client.close()
        for headers, want in (({}, "UNAUTHENTICATED"), ({"authorization": f"Bearer {KEY}"}, None)):  # streams too
            import queue  # noqa: PLC0415

            answers: queue.Queue = queue.Queue()
            client = tgrpc.InferenceServerClient(f"127.0.0.1:{s.app.state.grpc_port}")
            client.start_stream(callback=lambda result, error: answers.put((result, error)), headers=headers)
            try:
                client.async_stream_infer(MODEL, [_input(["x"])])
            except InferenceServerException:  # refused before the request left: the status went to the callback
                assert want is not None
            result, error = answers.get(timeout=10)
            assert (error is None and result.as_numpy("embedding").shape == (1, 8)) if want is None else want in str(error)
            client.stop_stream()
            client.close()



def test_access_log_lines_for_grpc_calls(caplog):
    with dummy_server(server={"grpc_port": 0, "access_log": True}) as s, caplog.at_level("INFO", logger="turboserve.access"):
        client = tgrpc.InferenceServerClient(f"127.0.0.1:{s.app.state.grpc_port}")
        client.infer(MODEL, [_input(["logged"])], request_id="r")
        client.close()
    lines = [r for r in caplog.records if r.name == "turboserve.access" and r.getMessage() == "gRPC ModelInfer OK"]
    assert len(lines) == 1
    fields = lines[0].fields
    assert fields["route"] == "grpc ModelInfer" and fields["tokens"] == 3 and fields["inference_ms"] > 0


def test_streaming_inference_answers_each_request_batches_them_and_reports_errors_in_band(grpc_srv):
    """tritonclient's start_stream / async_stream_infer (ModelStreamInfer): one answer a request, matched by id;
    requests of one stream queued together run in one batch; a bad request is an error message, not the end."""
    import queue  # noqa: PLC0415

    embedder = grpc_srv.app.state.embedder
    answers: queue.Queue = queue.Queue()
    client = tgrpc.InferenceServerClient(f"127.0.0.1:{grpc_srv.app.state.grpc_port}")
    texts = ["first streamed text", "second", "a third, longer streamed text"]
    embedder.gate.clear()  # the worker holds its first batch: the rest of the stream queues behind it
    embedder.entered.clear()  # set by earlier batches (and the warm-up): wait for the opener's own
    try:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        client.async_stream_infer(MODEL, [_input(["opener"])], request_id="opener")
        assert embedder.entered.wait(10)
        for i, text in enumerate(texts):
            client.async_stream_infer(MODEL, [_input([text])], request_id=f"s{i}")
        client.async_stream_infer("not-a-model", [_input(["x"])], request_id="bad")
        time.sleep(0.2)
        embedder.gate.set()
        got = [answers.get(timeout=10) for _ in range(len(texts) + 2)]
        client.async_stream_infer(MODEL, [_input(["after the error"])], request_id="after")
        last, error = answers.get(timeout=10)
        assert error is None and last.get_response().id == "after"
    finally:
        embedder.gate.set()
        client.stop_stream()
        client.close()
    errors = [e for _, e in got if e is not None]
    assert len(errors) == 1 and "not-a-model" in str(errors[0]) and "Traceback" not in str(errors[0])
    vectors = {r.get_response().id: r.as_numpy("embedding") for r, e in got if e is None}
    assert sorted(vectors) == ["opener", "s0", "s1", "s2"]
    for i, text in enumerate(texts):
        np.testing.assert_allclose(vectors[f"s{i}"], _want(grpc_srv, [text]), atol=1e-6)
    ids = {tuple(e.ids) for e in grpc_srv.app.state.engine.tokenizer.encode(texts)}
    assert any(len(ids & {tuple(x) for x in batch}) == 3 for batch in embedder.batches)  # one batch for the three


def test_stream_answers_carry_tritons_final_response_flag(grpc_srv):
    """Clients of decoupled-aware code (`async_stream_infer(..., enable_empty_final_response=True)`) read
    `triton_final_response` to know a request is done: every answer, error or not, is its request's last, as
    Triton's for a model that is not decoupled, and no empty message follows; a flag that is not a bool is refused."""
    import queue  # noqa: PLC0415

    answers: queue.Queue = queue.Queue()
    client = tgrpc.InferenceServerClient(f"127.0.0.1:{grpc_srv.app.state.grpc_port}")
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(f"127.0.0.1:{grpc_srv.app.state.grpc_port}"))
    try:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        client.async_stream_infer(MODEL, [_input(["one"])], request_id="a", enable_empty_final_response=True)
        client.async_stream_infer(MODEL, [_input(["two"])], request_id="b")
        got = [answers.get(timeout=10) for _ in range(2)]
        time.sleep(0.3)
        assert answers.empty()  # one message a request, none empty
    finally:
        client.stop_stream()
        client.close()
    assert all(e is None for _, e in got)
    assert {r.get_response().id: r.get_response().parameters["triton_final_response"].bool_param for r, _ in got} == {
        "a": True, "b": True}
    unknown = service_pb2.ModelInferRequest(model_name="not-a-model", id="z")
    typed = service_pb2.ModelInferRequest(model_name=MODEL, id="t")  # tritonclient refuses to send it; others may
    typed.parameters["triton_enable_empty_final_response"].int64_param = 1
    replies = {r.infer_response.id: r for r in stub.ModelStreamInfer(iter([unknown, typed]), timeout=10)}
    assert sorted(replies) == ["t", "z"] and "not-a-model" in replies["z"].error_message
    assert "expected bool_param" in replies["t"].error_message
    assert all(r.infer_response.parameters["triton_final_response"].bool_param for r in replies.values())


def test_a_long_stream_holds_one_call_not_one_a_message(grpc_srv):
    """Each message of a stream used to make its own Call, which added a done callback to the stream's context, kept
    by grpc until the stream ends: ~1 KB a message for as long as a client keeps its stream (perf_analyzer
    --streaming). Now the stream's messages share one; it is let go when the stream ends."""
    import gc as collector  # noqa: PLC0415
    import queue  # noqa: PLC0415

    from server import grpc_common  # noqa: PLC0415
    from tests.server.test_failures import wait_for  # noqa: PLC0415

    def calls() -> int:
        collector.collect()
        return sum(isinstance(o, grpc_common.Call) for o in collector.get_objects())

    answers: queue.Queue = queue.Queue()
    client = tgrpc.InferenceServerClient(f"127.0.0.1:{grpc_srv.app.state.grpc_port}")
    before = calls()
    try:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        for i in range(200):
            client.async_stream_infer(MODEL, [_input([f"message {i}"])], request_id=str(i))
        got = [answers.get(timeout=20) for _ in range(200)]
        during = calls()  # the stream still open
    finally:
        client.stop_stream()
        client.close()
    assert all(e is None for _, e in got)
    assert during - before <= 1, (before, during)
    wait_for(lambda: not grpc_common._LIVE)


def test_a_cancelled_stream_drops_its_queued_requests():
    from tests.server.test_failures import wait_for  # noqa: PLC0415
    from tests.server.test_overload import dropped  # noqa: PLC0415

    embedder = DummyEmbedder()
    with dummy_server(embedder, server={"grpc_port": 0}) as s:
        engine = s.app.state.engine
        client = tgrpc.InferenceServerClient(f"127.0.0.1:{s.app.state.grpc_port}")
        embedder.gate.clear()
        embedder.entered.clear()  # the warm-up's batch set it: wait for the opener's own
        try:
            client.start_stream(callback=lambda result, error: None)
            client.async_stream_infer(MODEL, [_input(["opener"])])
            assert embedder.entered.wait(10)
            client.async_stream_infer(MODEL, [_input(["queued one", "queued two"])])
            wait_for(lambda: engine.queue.depth == 2)
            client.stop_stream(cancel_requests=True)
            wait_for(lambda: dropped(s, "disconnect") == 2 and engine.queue.depth == 0)
            # counted as cancelled, as a unary call is (it was counted OK)
            wait_for(lambda: s.app.state.metrics.registry.get_sample_value(
                "turboserve_requests_total", {"route": "grpc ModelStreamInfer", "status": "CANCELLED"}) == 2)  # both
        finally:
            embedder.gate.set()
            client.close()
        gone = [engine.tokenizer.encode([t])[0].ids for t in ("queued one", "queued two")]
        assert not any(ids in batch for batch in embedder.batches for ids in gone)


def test_triton_rpcs_not_supported_answer_unimplemented_without_a_traceback(grpc_srv, gc, caplog):
    for call in (gc.get_log_settings, gc.get_trace_settings):
        with pytest.raises(InferenceServerException) as err:
            call()
        assert "StatusCode.UNIMPLEMENTED" in str(err.value.status()) and "not supported" in err.value.message()
    assert "Traceback" not in caplog.text and "NotImplementedError" not in caplog.text


def test_shared_memory_inputs_are_held_to_the_payload_limit(grpc_srv):
    from server.errors import TooLarge  # noqa: PLC0415
    from server.shared_memory import SharedMemoryRegistry, Target  # noqa: PLC0415

    registry = SharedMemoryRegistry(True, max_read=1000)
    with pytest.raises(TooLarge, match="over the 1000-byte payload limit"):
        registry.read(Target("r", 5000, 0), "input 'text'")
    assert grpc_srv.app.state.shared_memory.max_read == 2_000_000  # server.payload_limit's default


def test_triton_classification_and_double_contents_are_refused(gc):
    """An output's classification parameter (tritonclient's class_count) is refused, not answered with the full
    tensor; an input with both contents and raw_input_contents is refused, as Triton refuses it."""
    with pytest.raises(InferenceServerException) as err:
        gc.infer(MODEL, [_input(["x"])], outputs=[tgrpc.InferRequestedOutput("embedding", class_count=3)])
    assert "classification" in err.value.message()
    from tritonclient.grpc import service_pb2 as pb  # noqa: PLC0415

    request = pb.ModelInferRequest(model_name=MODEL)
    tensor = request.inputs.add(name="text", datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(b"x")
    request.raw_input_contents.append(b"\\x01\\x00\\x00\\x00y")
    stub = gc._client_stub
    import grpc  # noqa: PLC0415

    with pytest.raises(grpc.RpcError) as rpc:
        stub.ModelInfer(request)
    assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "both contents" in rpc.value.details()
