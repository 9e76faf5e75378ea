"""KServe v2 / Triton gRPC inference protocol (GRPCInferenceService) for the text encoder and the DLRM, on
server.grpc_port beside HTTP: `tritonclient.grpc` works against it unmodified. Same engine, scheduler,
limits, API key and errors as the HTTP routes; the servicer base class and messages are the ones
tritonclient[grpc] ships (generated from the KServe/Triton protos).

ModelInfer takes one BYTES input named `text`, shape [n] or [n, 1] (in raw_input_contents, as tritonclient
sends it, or in contents.bytes_contents), request parameters `truncate` and `normalize` (bool), and answers the
FP32 output `embedding` [n, dim] in raw_output_contents. Metadata keys x-slo-ms, x-priority and
x-request-timeout-ms act as the HTTP headers do; a cancelled call drops its queued work. The DLRM takes and
answers the same tensors as over HTTP (`dense` FP32, one INT64/INT32 tensor per sparse feature -> `scores` FP32).
Inputs and outputs may lie in system shared memory regions registered through the SystemSharedMemory RPCs;
the repository RPCs answer as the HTTP routes do (server/routes_triton.py).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Sequence

import grpc
import numpy as np
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

import server
from configs.settings import OPEN_PATHS
from models.runtime import finish_embedding
from scheduler.errors import NotReady
from server import grpc_tei
from server.errors import InvalidRequest, ModelNotFound, Unauthorized, kind_of
from server.grpc_common import CODES, bool_param, call_metadata, call_of, call_peer, call_timing, plain_params, status_text
from server.grpc_triton import TritonExtensions
from server.kserve_codec import (
    CLASSIFICATION_REFUSED,
    NUMPY_TYPES,
    decode_bytes_tensor,
    fp32_bytes,
    model_config,
    numeric_from_bytes,
    place_outputs,
    texts_count,
    utf8_element,
)
from server.logs import ACCESS_LOGGER
from server.middleware import Timing
from server.routes_kserve import (
    check_version,
    dlrm_named,
    dlrm_scores,
    encoder_metadata,
    encoder_named,
    extensions,
    model_stats,
)
from server.shared_memory import SharedMemoryRegistry, Target, target

log = logging.getLogger(__name__)
access_log = logging.getLogger(ACCESS_LOGGER)

def _shm_target(tensor, what: str) -> Target | None:
    return target(plain_params(tensor.parameters), what) if "shared_memory_region" in tensor.parameters else None


def _texts(request: pb.ModelInferRequest, shm: SharedMemoryRegistry) -> list[str]:
    if len(request.inputs) != 1:
        raise InvalidRequest(f"expected exactly one input (BYTES texts), got {len(request.inputs)}")
    tensor = request.inputs[0]
    if tensor.name != "text":
        raise InvalidRequest(f"unexpected inference input {tensor.name!r}: the model's input is 'text'")
    if tensor.datatype != "BYTES":
        raise InvalidRequest(f"input {tensor.name!r} must have datatype BYTES, not {tensor.datatype!r}")
    count = texts_count(list(tensor.shape))
    where = _shm_target(tensor, f"input {tensor.name!r}")
    if where is not None:
        if request.raw_input_contents:
            raise InvalidRequest("raw_input_contents given, but the only input is in shared memory")
        return decode_bytes_tensor(shm.read(where, f"input {tensor.name!r}"), count)
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise InvalidRequest(f"{len(request.raw_input_contents)} raw_input_contents for one input")
        if tensor.contents.bytes_contents:  # as Triton: one or the other
            raise InvalidRequest(f"input {tensor.name!r} has both contents and raw_input_contents")
        return decode_bytes_tensor(request.raw_input_contents[0], count)
    elements = tensor.contents.bytes_contents
    if len(elements) != count:
        raise InvalidRequest(f"shape says {count} elements, contents hold {len(elements)}")
    return [utf8_element(e, i) for i, e in enumerate(elements)]


# The typed `contents` field of each numeric datatype (FP16 has none: raw_input_contents only).
_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
             "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
             "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents"}


def _tensors(request: pb.ModelInferRequest, shm: SharedMemoryRegistry) -> dict[str, np.ndarray]:
    """Numeric inputs by name, from a shared memory region, raw_input_contents (one per input not in shared
    memory, in order, as tritonclient sends them) or each input's contents."""
    raw = list(request.raw_input_contents)
    where = [_shm_target(t, f"input {t.name!r}") for t in request.inputs]
    if raw and len(raw) != where.count(None):
        raise InvalidRequest(f"{len(raw)} raw_input_contents for {where.count(None)} inputs not in shared memory")
    out: dict[str, np.ndarray] = {}
    for tensor, place in zip(request.inputs, where):
        if tensor.name in out:
            raise InvalidRequest(f"input {tensor.name!r} is given twice")
        if place is not None:
            data = shm.read(place, f"input {tensor.name!r}")
        elif raw:
            data = raw.pop(0)
        elif tensor.datatype in _CONTENTS:
            data = np.asarray(getattr(tensor.contents, _CONTENTS[tensor.datatype]), dtype=NUMPY_TYPES[tensor.datatype]).tobytes()
        else:
            data = b""  # numeric_from_bytes names the datatype or the missing values
        out[tensor.name] = numeric_from_bytes(tensor.name, tensor.datatype, list(tensor.shape), data)
    return out


def _output_targets(request: pb.ModelInferRequest, shm: SharedMemoryRegistry) -> dict[str, Target]:
    """Requested outputs to write to shared memory, checked against their regions before any work."""
    targets = {}
    for out in request.outputs:
        if "classification" in out.parameters:
            raise InvalidRequest(CLASSIFICATION_REFUSED)
        place = _shm_target(out, f"output {out.name!r}")
        if place is not None:
            shm.check(place, f"output {out.name!r}")
            targets[out.name] = place
    return targets


def _infer_response(model: str, request_id: str, outputs: dict[str, np.ndarray], placed: dict[str, dict]):
    """FP32 outputs in raw_output_contents, or, for those written to shared memory, their parameters."""
    tensors, raws = [], []
    for name, array in outputs.items():
        tensor = pb.ModelInferResponse.InferOutputTensor(name=name, datatype="FP32", shape=list(array.shape))
        if name in placed:
            for key, value in placed[name].items():
                if isinstance(value, str):
                    tensor.parameters[key].string_param = value
                else:
                    tensor.parameters[key].int64_param = value
        else:
            raws.append(fp32_bytes(array))
        tensors.append(tensor)
    return pb.ModelInferResponse(model_name=model, model_version="1", id=request_id, outputs=tensors, raw_output_contents=raws)


def _method_path(rpc: str) -> str:
    """The gRPC method's path as the client called it: `/tei.v1.Embed/Embed` for TEI's (rpc `tei.Embed/Embed`)."""
    return f"/tei.v1.{rpc[4:]}" if rpc.startswith("tei.") else f"/inference.GRPCInferenceService/{rpc}"


class InferenceService(TritonExtensions, pb_grpc.GRPCInferenceServiceServicer):
    """The servicer; every RPC reads the app's state as the HTTP routes do (engine, draining)."""

    def __init__(self, app, api_key: str | None, access_log: bool = False, payload_limit: int = 2_000_000,
                 stream_window: int = 1024, max_client_batch_size: int = 32, open_paths: Sequence[str] = OPEN_PATHS):
        self.app = app
        # the probes answer without the key where their HTTP routes do (server.api_key_open_paths)
        self.open_rpcs = {rpc for rpc, path in (("ServerLive", "/v2/health/live"), ("ServerReady", "/v2/health/ready"))
                          if path in open_paths}
        self.api_key = api_key.encode() if api_key else None
        self.access_log = access_log
        self.payload_limit = payload_limit  # RerankStream's messages together, as one HTTP body
        self.max_client_batch_size = max_client_batch_size  # RerankStream's messages, as /rerank's texts
        # A stream's messages read and not yet answered to the client: past it, the stream is not read until the
        # client takes answers (no answers pile up for a client that does not read). The queue's size: more could
        # not be admitted anyway (TEI bounds its streams' parallel requests at 1,024 too).
        self.stream_window = stream_window

    def _metadata(self, name: str) -> dict:
        """KServe metadata of the DLRM or the encoder named `name` (the HTTP routes' own)."""
        rec = dlrm_named(self, name)
        return rec.metadata() if rec is not None else encoder_metadata(encoder_named(self, name))

    async def _answer(self, rpc: str, context, work):
        """Run `work(metadata, timing)`, count it, and turn a domain error into the matching gRPC status (message
        only: never a traceback). The request id and the timings go back as trailing metadata, as HTTP headers do."""
        code = grpc.StatusCode.OK
        metadata, peer = call_metadata(context), call_peer(context)
        timing = call_timing(metadata)
        request_id = timing.request_id
        try:
            if rpc not in self.open_rpcs:
                self._check_key(metadata)
            answer = await work(metadata, timing)
            context.set_trailing_metadata((
                ("x-request-id", request_id), ("x-total-time", f"{(time.perf_counter() - timing.started) * 1000:.3f}"),
                ("x-tokenization-time", f"{timing.tokenization * 1000:.3f}"), ("x-queue-time", f"{timing.queue * 1000:.3f}"),
                ("x-inference-time", f"{timing.inference * 1000:.3f}"), ("x-compute-tokens", str(timing.tokens))))
            return answer
        except asyncio.CancelledError:  # the client cancelled, or its deadline passed: nobody reads an answer
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            kind = kind_of(exc)
            if kind is None:
                log.exception("unhandled error in gRPC %s (request id %s)", rpc, request_id)
                code, message = grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})"
            else:
                code, message = CODES.get(kind.status, grpc.StatusCode.INTERNAL), status_text(exc)
            await context.abort(code, message, trailing_metadata=(("x-request-id", request_id),))
        finally:
            self._record(rpc, code, timing, metadata, peer)

    def _check_key(self, metadata: dict[str, str]) -> None:
        """Unauthorized unless the call carries the API key (when one is set)."""
        if self.api_key is not None:
            given = metadata.get("authorization", "").encode()
            if not hmac.compare_digest(given[7:] if given[:7].lower() == b"bearer " else b"", self.api_key):
                raise Unauthorized("missing or wrong API key (metadata authorization: Bearer <key>)")

    def _record(self, rpc: str, code: grpc.StatusCode, timing: Timing, metadata: dict[str, str], peer: str) -> None:
        """Count a call (or one message of a stream) in the metrics, and write its access line (peer: call_peer's,
        read at the call's start)."""
        request_id = timing.request_id
        seconds = time.perf_counter() - timing.started
        metrics = self.app.state.metrics
        metrics.request_duration.labels(f"grpc {rpc}").observe(seconds)
        metrics.requests.labels(f"grpc {rpc}", code.name).inc()
        if self.access_log:
            access_log.info("gRPC %s %s", rpc, code.name, extra={"fields": {
                "request_id": request_id, "method": "gRPC", "path": _method_path(rpc),
                "route": f"grpc {rpc}", "status": code.name, "duration_ms": round(seconds * 1000, 3),
                "client": peer, "tokens": timing.tokens, "tokenization_ms": round(timing.tokenization * 1000, 3),
                "queue_ms": round(timing.queue * 1000, 3), "inference_ms": round(timing.inference * 1000, 3),
                "user_agent": (metadata.get("user-agent") or "")[:256] or None}})

    async def ServerLive(self, request, context):
        async def work(metadata, timing):
            state = self.app.state  # as HTTP /v2/health/live: not once a batching worker has died
            return pb.ServerLiveResponse(live=all(e.healthy for e in (state.engine, state.reranker) if e is not None))
        return await self._answer("ServerLive", context, work)

    async def ServerReady(self, request, context):
        async def work(metadata, timing):
            state = self.app.state
            engines = [state.engine] + ([state.reranker] if state.reranker is not None else [])
            return pb.ServerReadyResponse(ready=state.engine is not None and not state.draining
                                          and all(e.healthy for e in engines))
        return await self._answer("ServerReady", context, work)

    async def ModelReady(self, request, context):
        async def work(metadata, timing):
            try:  # as Triton: a model or version not served, or not loaded yet, is not ready (not an error)
                check_version(request.name, request.version)
                if dlrm_named(self, request.name) is not None:
                    return pb.ModelReadyResponse(ready=True)
                return pb.ModelReadyResponse(ready=encoder_named(self, request.name).healthy)
            except (ModelNotFound, NotReady):
                return pb.ModelReadyResponse(ready=False)
        return await self._answer("ModelReady", context, work)

    async def ServerMetadata(self, request, context):
        async def work(metadata, timing):
            return pb.ServerMetadataResponse(name="turboserve", version=server.__version__, extensions=extensions(self.app))
        return await self._answer("ServerMetadata", context, work)

    async def ModelMetadata(self, request, context):
        async def work(metadata, timing):
            check_version(request.name, request.version)
            meta = self._metadata(request.name)
            tensors = {side: [pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta[side]] for side in ("inputs", "outputs")}
            return pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"], **tensors)
        return await self._answer("ModelMetadata", context, work)

    async def ModelConfig(self, request, context):
        async def work(metadata, timing):
            check_version(request.name, request.version)
            config = json_format.ParseDict(model_config(self._metadata(request.name)), model_config_pb2.ModelConfig())
            return pb.ModelConfigResponse(config=config)
        return await self._answer("ModelConfig", context, work)

    async def ModelStatistics(self, request, context):
        async def work(metadata, timing):
            check_version(request.name, request.version)
            stats = model_stats(self.app.state, request.name or None)
            return json_format.ParseDict({"model_stats": stats}, pb.ModelStatisticsResponse())
        return await self._answer("ModelStatistics", context, work)

    async def ModelInfer(self, request, context):
        async def work(metadata, timing):
            return await self._infer(request, metadata, timing, context)
        return await self._answer("ModelInfer", context, work)

    async def _infer(self, request: pb.ModelInferRequest, metadata: dict[str, str], timing: Timing, context):
        """One inference (ModelInfer, or one message of ModelStreamInfer): the DLRM's or the encoder's."""
        check_version(request.model_name, request.model_version)
        shm = self.app.state.shared_memory
        rec = dlrm_named(self, request.model_name)
        if rec is not None:
            targets = _output_targets(request, shm)
            outputs = {"scores": await dlrm_scores(rec, _tensors(request, shm), [o.name for o in request.outputs], timing)}
            return _infer_response(rec.name, request.id, outputs, place_outputs(shm, targets, outputs))
        engine = encoder_named(self, request.model_name)
        wrong = [o.name for o in request.outputs if o.name != "embedding"]
        if wrong:
            raise InvalidRequest(f"the only output is 'embedding', not {wrong}")
        targets = _output_targets(request, shm)
        texts = _texts(request, shm)
        truncate, normalize = bool_param(request.parameters, "truncate"), bool_param(request.parameters, "normalize")
        encoded = await engine.tokenize(texts, timing, truncate)
        rows = await engine.run(encoded, call_of(metadata, context), timing)  # type: ignore[arg-type]
        outputs = {"embedding": finish_embedding(rows, engine.info.normalize if normalize is None else normalize)}
        return _infer_response(engine.info.name, request.id, outputs, place_outputs(shm, targets, outputs))


async def start_grpc(app, host: str, port: int, api_key: str | None, payload_limit: int, access_log: bool = False,
                     stream_window: int = 1024, max_client_batch_size: int = 32,
                     open_paths: Sequence[str] = OPEN_PATHS) -> tuple[grpc.aio.Server, int]:
    """Start the gRPC server on host:port (0: a free port) in the running event loop; (server, bound port).
    A request message over payload_limit bytes is refused (RESOURCE_EXHAUSTED), as HTTP refuses the body (413)."""
    # grpcio binds with SO_REUSEPORT unless told not to: a port another server took while the model loaded would be
    # shared with it silently (clients split between the two); Triton refuses a shared port too (--reuse-grpc-port)
    grpc_server = grpc.aio.server(options=[("grpc.max_receive_message_length", payload_limit), ("grpc.so_reuseport", 0)])
    servicer = InferenceService(app, api_key, access_log, payload_limit, stream_window, max_client_batch_size, open_paths)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, grpc_server)
    grpc_server.add_generic_rpc_handlers(grpc_tei.handlers(servicer))  # TEI's tei.v1 services on the same port
    try:
        bound = grpc_server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:  # grpcio raises "Failed to bind" where older versions returned 0
        bound = 0
    if bound == 0:
        await grpc_server.stop(None)  # released here, not by a collector racing the loop's close (a C++ abort)
        raise OSError(f"cannot bind the gRPC port {host}:{port} (in use?)")
    await grpc_server.start()
    log.info("KServe v2 gRPC on %s:%d", host, bound)
    return grpc_server, bound
