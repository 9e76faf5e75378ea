"""TEI's gRPC API (tei.v1) beside KServe's on server.grpc_port: every service through plain grpc stubs built from
the same message table (server/tei_proto.py), against the HTTP routes' answers; the wire bytes of a request as
TEI's field numbers make them; streams answer in order; errors are TEI's status codes."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from server.app import create_app
from server.tei_proto import SERVICES
from server.tei_proto import messages as m
from tests.cross_encoders import cross_encoder_folder
from tests.support import DummyEmbedder, ServerThread, dummy_server, settings

TEXTS = ["héllo wörld", "a second text to embed", "3"]
KIND = {name: (request, response, cs, ss) for service, methods in SERVICES.items()
        for name, request, response, cs, ss in methods for name in [f"{service}/{name}"]}


def stub(channel: grpc.Channel, rpc: str):
    request, response, client_streams, server_streams = KIND[rpc]
    make = {(False, False): channel.unary_unary, (True, True): channel.stream_stream,
            (True, False): channel.stream_unary}[(client_streams, server_streams)]
    return make(f"/tei.v1.{rpc}", request_serializer=m[request].SerializeToString,
                response_deserializer=m[response].FromString)


@pytest.fixture(scope="module")
def embedder_server():
    with dummy_server(DummyEmbedder(), server={"grpc_port": 0}) as s, \
            grpc.insecure_channel(f"127.0.0.1:{s.app.state.grpc_port}") as channel, s.client() as http:
        yield s, channel, http


def test_info_embed_embed_all_tokenize_decode(embedder_server):
    s, channel, http = embedder_server
    info = stub(channel, "Info/Info")(m["InfoRequest"](), timeout=10)
    assert info.model_id == "dummy" and info.model_type == 0 and info.max_input_length == s.app.state.engine.info.max_input_length
    got = stub(channel, "Embed/Embed")(m["EmbedRequest"](inputs=TEXTS[0], normalize=True), timeout=10)
    np.testing.assert_allclose(got.embeddings, http.post("/embed", json={"inputs": TEXTS[0]}).json()[0], atol=1e-6)
    assert got.metadata.compute_tokens > 0 and got.metadata.total_time_ns > 0
    raw = stub(channel, "Embed/Embed")(m["EmbedRequest"](inputs=TEXTS[1], normalize=False), timeout=10)
    np.testing.assert_allclose(raw.embeddings, http.post("/embed", json={"inputs": TEXTS[1], "normalize": False}).json()[0],
                               atol=1e-6)
    every = stub(channel, "Embed/EmbedAll")(m["EmbedAllRequest"](inputs=TEXTS[1]), timeout=10)
    np.testing.assert_allclose([t.embeddings for t in every.token_embeddings],
                               http.post("/embed_all", json={"inputs": TEXTS[1]}).json()[0], atol=1e-6)
    tokens = stub(channel, "Tokenize/Tokenize")(m["EncodeRequest"](inputs=TEXTS[0], add_special_tokens=True), timeout=10)
    want = http.post("/tokenize", json={"inputs": TEXTS[0]}).json()[0]
    assert [(t.id, t.text, t.special) for t in tokens.tokens] == [(t["id"], t["text"], t["special"]) for t in want]
    assert [t.start if t.HasField("start") else None for t in tokens.tokens] == [t["start"] for t in want]
    text = stub(channel, "Tokenize/Decode")(m["DecodeRequest"](ids=[t["id"] for t in want], skip_special_tokens=True), timeout=10)
    assert text.text == http.post("/decode", json={"ids": [t["id"] for t in want]}).json()[0]


def test_the_wire_bytes_are_teis(embedder_server):
    """An EmbedRequest as TEI's field numbers encode it (inputs = 1, normalize = 3), sent as raw bytes; the answer's
    field 1 is the packed float vector."""
    s, channel, http = embedder_server
    call = channel.unary_unary("/tei.v1.Embed/Embed", request_serializer=lambda b: b, response_deserializer=lambda b: b)
    text = TEXTS[1].encode()
    answer = call(b"\x0a" + bytes([len(text)]) + text + b"\x18\x01", timeout=10)
    assert answer[0] == 0x0A  # field 1, length-delimited (packed floats)
    length = answer[1] if answer[1] < 128 else (answer[1] & 0x7F) | (answer[2] << 7)
    start = 2 if answer[1] < 128 else 3
    vector = np.frombuffer(answer[start:start + length], "<f4")
    np.testing.assert_allclose(vector, http.post("/embed", json={"inputs": TEXTS[1]}).json()[0], atol=1e-6)


def test_streams_answer_in_order(embedder_server):
    s, channel, http = embedder_server
    answers = list(stub(channel, "Embed/EmbedStream")(iter(m["EmbedRequest"](inputs=t, normalize=True) for t in TEXTS), timeout=10))
    want = http.post("/embed", json={"inputs": TEXTS}).json()
    assert len(answers) == 3
    for got, row in zip(answers, want):
        np.testing.assert_allclose(got.embeddings, row, atol=1e-6)
    decoded = list(stub(channel, "Tokenize/DecodeStream")(iter([m["DecodeRequest"](ids=[101, 7592, 102], skip_special_tokens=True),
                                                                m["DecodeRequest"](ids=[101, 2088, 102], skip_special_tokens=True)]), timeout=10))
    assert [d.text for d in decoded] == ["hello", "world"]


@pytest.mark.parametrize("rpc, request_, code, needle", [
    ("Embed/Embed", m["EmbedRequest"](inputs=""), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    ("Embed/Embed", m["EmbedRequest"](inputs="word " * 400), grpc.StatusCode.INVALID_ARGUMENT, "tokens"),
    ("Embed/EmbedSparse", m["EmbedSparseRequest"](inputs="x"), grpc.StatusCode.FAILED_PRECONDITION, "splade"),
    ("Rerank/Rerank", m["RerankRequest"](query="q", texts=["a"]), grpc.StatusCode.FAILED_PRECONDITION, "reranker"),
    ("Tokenize/Decode", m["DecodeRequest"](ids=[10 ** 9]), grpc.StatusCode.INVALID_ARGUMENT, "vocabulary"),
    ("Embed/Embed", m["EmbedRequest"](inputs="x", truncation_direction=7), grpc.StatusCode.INVALID_ARGUMENT, "truncation"),
])
def test_errors_are_teis_status_codes_and_the_server_keeps_serving(embedder_server, rpc, request_, code, needle):
    s, channel, http = embedder_server
    with pytest.raises(grpc.RpcError) as err:
        stub(channel, rpc)(request_, timeout=10)
    assert err.value.code() == code and needle in err.value.details().lower(), err.value.details()
    assert "Traceback" not in err.value.details()
    assert stub(channel, "Embed/Embed")(m["EmbedRequest"](inputs="still here"), timeout=10).embeddings


def test_rerank_and_predict_on_a_cross_encoder(tmp_path):
    folder = cross_encoder_folder(tmp_path)
    app = create_app(settings(model={"path": str(folder), "name": "ce"}, server={"grpc_port": 0}))
    with ServerThread(app) as s, grpc.insecure_channel(f"127.0.0.1:{s.app.state.grpc_port}") as channel, s.client() as http:
        query, texts = "what is deep learning?", ["Deep learning uses many layers.", "Paris is in France.", "cats"]
        ranks = stub(channel, "Rerank/Rerank")(m["RerankRequest"](query=query, texts=texts, return_text=True), timeout=30)
        want = http.post("/rerank", json={"query": query, "texts": texts, "return_text": True}).json()
        assert [(r.index, r.text) for r in ranks.ranks] == [(w["index"], w["text"]) for w in want]
        np.testing.assert_allclose([r.score for r in ranks.ranks], [w["score"] for w in want], atol=1e-6)
        streamed = stub(channel, "Rerank/RerankStream")(iter(m["RerankStreamRequest"](query=query, text=t) for t in texts), timeout=30)
        assert [r.index for r in streamed.ranks] == [w["index"] for w in want] and not streamed.ranks[0].HasField("text")
        pair = stub(channel, "Predict/PredictPair")(m["PredictPairRequest"](inputs=[query, texts[0]]), timeout=30)
        want = http.post("/predict", json={"inputs": [query, texts[0]]}).json()
        assert [p.label for p in pair.predictions] == [w["label"] for w in want]
        np.testing.assert_allclose([p.score for p in pair.predictions], [w["score"] for w in want], atol=1e-6)
        one = stub(channel, "Predict/Predict")(m["PredictRequest"](inputs=texts[1], raw_scores=True), timeout=30)
        assert one.predictions[0].label == "LABEL_0"
        assert stub(channel, "Info/Info")(m["InfoRequest"](), timeout=30).model_type == 2  # reranker
        with pytest.raises(grpc.RpcError) as err:
            stub(channel, "Predict/PredictPair")(m["PredictPairRequest"](inputs=["only one"]), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_the_api_key_guards_tei_services_and_streams():
    with dummy_server(server={"grpc_port": 0, "api_key": "tei-secret"}) as s, \
            grpc.insecure_channel(f"127.0.0.1:{s.app.state.grpc_port}") as channel:
        key = [("authorization", "Bearer tei-secret")]
        for rpc, make in (("Embed/Embed", lambda: m["EmbedRequest"](inputs="x")),
                          ("Embed/EmbedStream", lambda: iter([m["EmbedRequest"](inputs="x")]))):
            call = stub(channel, rpc)
            with pytest.raises(grpc.RpcError) as err:
                answer = call(make(), timeout=10)
                list(answer) if rpc.endswith("Stream") else answer
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            answer = call(make(), timeout=10, metadata=key)
            assert (list(answer)[0] if rpc.endswith("Stream") else answer).embeddings


def test_streams_cancelled_mid_work_with_the_access_log_on_leave_the_server_serving(caplog):
    """Messages still in work when the client cancels its stream finish after the call ended: they used to read the
    peer from the finished call for the access log, and grpc.aio crashed the process (SIGSEGV) within ~20 cancels."""
    import time  # noqa: PLC0415

    from tests.server.test_failures import wait_for  # noqa: PLC0415

    embedder = DummyEmbedder()
    with dummy_server(embedder, server={"grpc_port": 0, "access_log": True}) as s, \
            grpc.insecure_channel(f"127.0.0.1:{s.app.state.grpc_port}") as channel, s.client() as http:
        from tritonclient.grpc import service_pb2 as pb  # noqa: PLC0415

        infer = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                      request_serializer=pb.ModelInferRequest.SerializeToString,
                                      response_deserializer=pb.ModelStreamInferResponse.FromString)
        tensor = pb.ModelInferRequest.InferInputTensor(name="text", datatype="BYTES", shape=[1],
                                                       contents=pb.InferTensorContents(bytes_contents=[b"hello " * 20]))
        request = pb.ModelInferRequest(model_name="dummy", inputs=[tensor])
        queue = s.app.state.engine.queue
        for _ in range(10):
            for answers in (stub(channel, "Embed/EmbedStream")(iter([m["EmbedRequest"](inputs="hello " * 20)] * 8), timeout=10),
                            infer(iter([request] * 8), timeout=10)):
                embedder.gate.clear()  # the stream's messages are held in work when the client cancels
                wait_for(lambda: queue.depth > 0 or embedder.entered.is_set())
                answers.cancel()
                embedder.gate.set()
                time.sleep(0.05)
        assert http.get("/health").status_code == 200
        with caplog.at_level("INFO", logger="turboserve.access"):
            assert stub(channel, "Embed/Embed")(m["EmbedRequest"](inputs="still here"), timeout=10).embeddings
        (line,) = [r for r in caplog.records if r.name == "turboserve.access" and "tei.Embed/Embed " in r.getMessage()]
        assert line.fields["path"] == "/tei.v1.Embed/Embed" and line.fields["client"].startswith("ipv")


def test_a_stream_is_not_read_past_its_window_while_the_client_reads_no_answer():
    """At most stream_window (the queue's size) messages are in hand: a client that sends and never reads makes the
    server stop reading, not pile up answers; once it reads, every message is answered, in order."""
    import re  # noqa: PLC0415
    import time  # noqa: PLC0415

    with dummy_server(DummyEmbedder(), server={"grpc_port": 0, "max_client_batch_size": 4},
                      scheduler={"max_queue_size": 4}) as s, \
            grpc.insecure_channel(f"127.0.0.1:{s.app.state.grpc_port}") as channel, s.client() as http:
        def handled() -> int:
            found = re.search(r'turboserve_requests_total\{code="OK",route="grpc tei.Tokenize/TokenizeStream"\} (\S+)|'
                              r'turboserve_requests_total\{route="grpc tei.Tokenize/TokenizeStream",\w+="OK"\} (\S+)',
                              http.get("/metrics").text)
            return int(float(next(g for g in found.groups() if g))) if found else 0

        long = "word " * 30000  # ~1 MB an answer: HTTP/2 flow control holds the server's writes after a few
        answers = stub(channel, "Tokenize/TokenizeStream")(
            iter(m["EncodeRequest"](inputs=f"{i} {long}", add_special_tokens=False) for i in range(60)), timeout=60)
        time.sleep(1.0)
        early = handled()
        firsts = [a.tokens[0].text for a in answers]
        assert 1 <= early <= 16, early  # the window (4), one waiting on it, the ones being written
        assert firsts == [str(i) for i in range(60)] and handled() == 60


def test_rerank_stream_is_refused_before_reading_and_held_to_the_batch_limit(embedder_server):
    """RerankStream read every message into memory before any check: a server with no re-ranker now refuses at once,
    and a re-ranker's stream ends past max_client_batch_size messages (as /rerank's texts) or payload_limit bytes."""
    s, channel, http = embedder_server
    sent = []

    def messages():
        for i in range(1000):
            sent.append(i)
            yield m["RerankStreamRequest"](query="q", text="x" * 1000)

    with pytest.raises(grpc.RpcError) as err:
        stub(channel, "Rerank/RerankStream")(messages(), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and len(sent) < 1000


def test_rerank_stream_past_the_batch_limit_is_refused(tmp_path):
    folder = cross_encoder_folder(tmp_path)
    app = create_app(settings(model={"path": str(folder), "name": "ce"}, server={"grpc_port": 0, "max_client_batch_size": 8}))
    with ServerThread(app) as s, grpc.insecure_channel(f"127.0.0.1:{s.app.state.grpc_port}") as channel:
        call = stub(channel, "Rerank/RerankStream")
        with pytest.raises(grpc.RpcError) as err:
            call(iter(m["RerankStreamRequest"](query="q", text=f"text {i}") for i in range(9)), timeout=30)
        assert "max_client_batch_size=8" in err.value.details()
        assert len(call(iter(m["RerankStreamRequest"](query="q", text=f"text {i}") for i in range(8)), timeout=30).ranks) == 8


def test_a_stream_cancelled_with_its_window_full_leaves_no_task_behind():
    """The reader, blocked on a full window when the stream ended, waited forever to put its end mark."""
    import asyncio  # noqa: PLC0415

    from server.grpc_tei import TEIService  # noqa: PLC0415

    class Servicer:
        app, stream_window = None, 2

        def _check_key(self, metadata):
            pass

        def _record(self, *args):
            pass

    class Context:
        def invocation_metadata(self):
            return ()

        def peer(self):
            return "ipv4:127.0.0.1:1"

        def add_done_callback(self, callback):
            pass

    async def work(request, timing, call):
        await asyncio.sleep(0.01)
        return request

    async def requests():
        for i in range(100):
            yield i

    async def main() -> list:
        answers = TEIService(Servicer()).stream("X/XStream", work)(requests(), Context())
        assert await answers.__anext__() == 0
        await asyncio.sleep(0.2)  # the reader fills the window and waits on it
        await answers.aclose()  # the client cancels
        await asyncio.sleep(0.2)
        return [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]

    assert asyncio.run(main()) == []
