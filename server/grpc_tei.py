"""Text Embeddings Inference's gRPC API (`tei.v1`: Info, Embed, Predict, Rerank, Tokenize, with their streaming
variants) on the same gRPC port as KServe v2 (server.grpc_port), so clients generated from TEI's `tei.proto` work
unmodified. Same engine, scheduler, API key, metrics and errors as the HTTP routes; the messages are built in
server/tei_proto.py. A stream answers its messages in order (they carry no id) but runs them concurrently, so a
stream's inputs batch together; the first error ends the stream with its status, as TEI's do."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

import server
from models.runtime import finish_embedding
from server.deps import engine_for, engine_of
from server.errors import EmptyInput, InvalidRequest, TooLarge, kind_of
from server.grpc_common import call_metadata, call_of, call_peer, call_timing, status_text
from server.middleware import Timing
from server.routes_rerank import labelled, ranked
from server.routes_tei import sparse_entries
from server.tei_proto import PACKAGE, SERVICES, messages

log = logging.getLogger(__name__)
m = messages

# TEI's error type -> the gRPC status TEI answers with.
CODES = {"Validation": grpc.StatusCode.INVALID_ARGUMENT, "Empty": grpc.StatusCode.INVALID_ARGUMENT,
         "Tokenizer": grpc.StatusCode.FAILED_PRECONDITION, "Backend": grpc.StatusCode.FAILED_PRECONDITION,
         "Overloaded": grpc.StatusCode.RESOURCE_EXHAUSTED, "Unhealthy": grpc.StatusCode.UNAVAILABLE,
         "Unauthorized": grpc.StatusCode.UNAUTHENTICATED}
_DIRECTIONS = ("right", "left")


def _metadata(timing: Timing, chars: int):
    return m["Metadata"](compute_chars=chars, compute_tokens=timing.tokens,
                         total_time_ns=int((time.perf_counter() - timing.started) * 1e9),
                         tokenization_time_ns=int(timing.tokenization * 1e9), queue_time_ns=int(timing.queue * 1e9),
                         inference_time_ns=int(timing.inference * 1e9))


def _direction(value: int) -> str:
    if value not in (0, 1):
        raise InvalidRequest(f"truncation_direction {value} is not RIGHT (0) or LEFT (1)")
    return _DIRECTIONS[value]


class _Failed(Exception):
    """A call's failure as the status to end it with (counted and logged once, where it happened)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class TEIService:
    """The tei.v1 services, answered with the KServe servicer's app, API key check and call accounting."""

    def __init__(self, servicer):
        self.app = servicer.app  # engine_of / engine_for read `.app`
        self.servicer = servicer

    def _status(self, exc: Exception, timing: Timing) -> tuple[grpc.StatusCode, str]:
        kind = kind_of(exc)
        if kind is None:
            log.exception("unhandled error in a tei.v1 call (request id %s)", timing.request_id)
            return grpc.StatusCode.INTERNAL, f"internal error (request id {timing.request_id})"
        return CODES.get(kind.tei_type, grpc.StatusCode.INTERNAL), status_text(exc)

    async def _counted(self, rpc: str, work, request, metadata: dict[str, str], peer: str, context):
        """work(request, timing, call), counted in the metrics (and the access log) under `grpc tei.<rpc>`; `call`
        is what Engine.run watches for the client going away; peer: call_peer's, read at the call's start."""
        timing, code = call_timing(metadata), grpc.StatusCode.OK
        try:
            return await work(request, timing, call_of(metadata, context))
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            code, message = self._status(exc, timing)
            raise _Failed(code, message) from None
        finally:
            self.servicer._record(f"tei.{rpc}", code, timing, metadata, peer)

    async def _authorized(self, context) -> dict[str, str]:
        """The call's metadata, once its API key is checked (the call ends UNAUTHENTICATED otherwise)."""
        metadata = call_metadata(context)
        try:
            self.servicer._check_key(metadata)
        except Exception as exc:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        return metadata

    def unary(self, rpc: str, work):
        async def handler(request, context):
            metadata = await self._authorized(context)
            try:
                return await self._counted(rpc, work, request, metadata, call_peer(context), context)
            except _Failed as failed:
                await context.abort(failed.code, failed.message)
        return handler

    def stream(self, rpc: str, work):
        async def handler(request_iterator, context):
            metadata, peer = await self._authorized(context), call_peer(context)
            # answers go back in order; stream_window messages wait in hand (read, not answered; two more in passing):
            # the stream is not read past it, and an answered message's task is let go
            pending: asyncio.Queue = asyncio.Queue(self.servicer.stream_window)
            started: set[asyncio.Task] = set()

            async def read() -> None:
                cancelled = False
                try:
                    async for request in request_iterator:
                        task = asyncio.ensure_future(self._counted(rpc, work, request, metadata, peer, context))
                        started.add(task)
                        task.add_done_callback(started.discard)
                        await pending.put(task)
                except asyncio.CancelledError:
                    cancelled = True  # the stream is over: nobody waits for the end mark (a full window would hold it)
                    raise
                finally:
                    if not cancelled:
                        await pending.put(None)

            reader = asyncio.ensure_future(read())
            try:
                while (task := await pending.get()) is not None:
                    try:
                        answer = await task
                    except _Failed as failed:
                        await context.abort(failed.code, failed.message)
                    yield answer
            finally:
                reader.cancel()
                for other in list(started):
                    other.cancel()
        return handler

    # -- the work of each method: (request, timing, call) -> response ---------------------------------------------
    async def info(self, request, timing, call):
        engine = engine_of(self)
        s, kinds = engine.settings, {"embedding": 0, "classifier": 1, "reranker": 2}
        return m["InfoResponse"](
            version=server.__version__, model_id=engine.info.name, model_dtype=engine.info.dtype,
            model_type=kinds[engine.info.kind], max_concurrent_requests=s.scheduler.max_queue_size,
            max_input_length=engine.info.max_input_length, max_batch_tokens=s.scheduler.max_batch_tokens,
            max_batch_requests=s.scheduler.max_batch_requests, max_client_batch_size=s.server.max_client_batch_size,
            tokenization_workers=1)

    @staticmethod
    async def _encode_run(engine, request, timing, call, per_token: bool = False):
        """One input of an Embed* request through the engine: [1, dim], or its per-token states."""
        encoded = await engine.tokenize(request.inputs, timing, request.truncate or None, _direction(request.truncation_direction),
                                        request.prompt_name if request.HasField("prompt_name") else None)
        return await engine.run(encoded, call, timing, per_token=per_token)  # type: ignore[arg-type]

    async def embed(self, request, timing, call):
        engine = engine_of(self)
        if request.normalize:
            engine.refuse_sparse("normalize")
        rows = await self._encode_run(engine, request, timing, call)
        return m["EmbedResponse"](embeddings=finish_embedding(rows, request.normalize)[0].tolist(),
                                  metadata=_metadata(timing, len(request.inputs)))

    async def embed_sparse(self, request, timing, call):
        engine = engine_of(self)
        engine.require_sparse()
        row = (await self._encode_run(engine, request, timing, call))[0]
        return m["EmbedSparseResponse"](sparse_embeddings=[m["SparseValue"](**e) for e in sparse_entries(row)],
                                        metadata=_metadata(timing, len(request.inputs)))

    async def embed_all(self, request, timing, call):
        engine = engine_of(self)
        engine.refuse_sparse("embed_all")
        states = (await self._encode_run(engine, request, timing, call, per_token=True))[0]
        return m["EmbedAllResponse"](token_embeddings=[m["TokenEmbedding"](embeddings=row.tolist()) for row in states],
                                     metadata=_metadata(timing, len(request.inputs)))

    @staticmethod
    async def _predictions(engine, encoded, request, timing, call, chars: int):
        answer = labelled(await engine.run(encoded, call, timing), engine.info.labels, request.raw_scores)[0]
        return m["PredictResponse"](predictions=[m["Prediction"](**p) for p in answer], metadata=_metadata(timing, chars))

    async def predict(self, request, timing, call):
        engine = engine_for(self, "classifier", "reranker")
        encoded = await engine.tokenize(request.inputs, timing, request.truncate or None,
                                        _direction(request.truncation_direction), kinds=("classifier", "reranker"))
        return await self._predictions(engine, encoded, request, timing, call, len(request.inputs))

    async def predict_pair(self, request, timing, call):
        engine = engine_for(self, "classifier", "reranker")
        engine.require("classifier", "reranker")
        if len(request.inputs) != 2:
            raise InvalidRequest(f"a pair is two texts; got {len(request.inputs)}")
        encoded = await engine.tokenize_pairs([tuple(request.inputs)], timing, request.truncate or None,
                                              _direction(request.truncation_direction))  # type: ignore[arg-type]
        return await self._predictions(engine, encoded, request, timing, call, sum(map(len, request.inputs)))

    async def _ranks(self, pairs: list[tuple[str, str]], first, timing, call):
        engine = engine_for(self, "reranker")
        engine.require("reranker")
        if not pairs:
            raise EmptyInput("no texts to rank")
        encoded = await engine.tokenize_pairs(pairs, timing, first.truncate or None, _direction(first.truncation_direction))
        logits = await engine.run(encoded, call, timing)
        answer = ranked(logits[:, 0], [text for _, text in pairs], first.raw_scores, first.return_text)
        return m["RerankResponse"](ranks=[m["Rank"](**r) for r in answer],
                                   metadata=_metadata(timing, sum(len(a) + len(b) for a, b in pairs)))

    async def rerank(self, request, timing, call):
        return await self._ranks([(request.query, t) for t in request.texts], request, timing, call)

    async def rerank_stream(self, request_iterator, timing, call):
        """One ranking of every (query, text) message; raw_scores, return_text and truncation from the first. A
        server with no re-ranker refuses before reading; the messages are held to /rerank's limits (at most
        max_client_batch_size of them, payload_limit bytes in all) as they arrive."""
        engine = engine_for(self, "reranker")
        engine.require("reranker")
        requests, size = [], 0
        async for r in request_iterator:
            size += r.ByteSize()
            requests.append(r)
            engine.check_batch(len(requests))
            if size > self.servicer.payload_limit:
                raise TooLarge(f"the stream's messages pass payload_limit={self.servicer.payload_limit} bytes")
        return await self._ranks([(r.query, r.text) for r in requests], requests[0] if requests else m["RerankStreamRequest"](),
                                 timing, call)

    async def tokenize(self, request, timing, call):
        engine = engine_of(self)
        tokens = (await engine.describe([request.inputs], request.add_special_tokens,
                                        request.prompt_name if request.HasField("prompt_name") else None))[0]
        return m["EncodeResponse"](tokens=[m["SimpleToken"](**{k: v for k, v in t.items() if v is not None}) for t in tokens])

    async def decode(self, request, timing, call):
        engine = engine_of(self)
        return m["DecodeResponse"](text=engine.tokenizer.decode([list(request.ids)], request.skip_special_tokens)[0])


_WORK = {"Info": "info", "Embed": "embed", "EmbedSparse": "embed_sparse", "EmbedAll": "embed_all", "Predict": "predict",
         "PredictPair": "predict_pair", "Rerank": "rerank", "RerankStream": "rerank_stream", "Tokenize": "tokenize",
         "Decode": "decode"}


def handlers(servicer) -> list[grpc.GenericRpcHandler]:
    """The tei.v1 services' handlers, for grpc.aio's add_generic_rpc_handlers."""
    tei = TEIService(servicer)
    out = []
    for service, methods in SERVICES.items():
        table = {}
        for method, request, response, client_streams, server_streams in methods:
            codec = dict(request_deserializer=m[request].FromString, response_serializer=m[response].SerializeToString)
            rpc = f"{service}/{method}"
            if client_streams and server_streams:  # the unary method's work, message by message
                work = getattr(tei, _WORK[method.removesuffix("Stream")])
                table[method] = grpc.stream_stream_rpc_method_handler(tei.stream(rpc, work), **codec)
            elif client_streams:  # RerankStream: all the messages, one answer
                table[method] = grpc.stream_unary_rpc_method_handler(tei.unary(rpc, getattr(tei, _WORK[method])), **codec)
            else:
                table[method] = grpc.unary_unary_rpc_method_handler(tei.unary(rpc, getattr(tei, _WORK[method])), **codec)
        out.append(grpc.method_handlers_generic_handler(f"{PACKAGE}.{service}", table))
    return out
