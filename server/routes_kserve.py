"""KServe v2 / Open Inference Protocol routes; `tritonclient.http` works against them unmodified.
Two models may be served: the text encoder (BYTES `text` -> FP32 `embedding`) and a DLRM (see _infer_dlrm)."""

from __future__ import annotations

import json
import time

import numpy as np
from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

import server
from models.runtime import finish_embedding
from scheduler.errors import NotReady
from server.deps import engine_of, engines_of, recommender_of, timing_of
from server.engine import Engine
from server.errors import InvalidRequest, ModelNotFound, error_responses
from server.kserve_codec import HEADER_LENGTH, encode_tensors, model_config, parse_infer, parse_tensors, place_outputs
from server.recommend import Recommender, bags_from_matrix

router = APIRouter(prefix="/v2", tags=["kserve"], responses=error_responses("kserve"))

_INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {
            "type": "object", "required": ["inputs"],
            "properties": {
                "id": {"type": "string"},
                "inputs": {"type": "array", "items": {"type": "object", "required": ["name", "shape", "datatype"], "properties": {
                    "name": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer"}},
                    "datatype": {"type": "string"}, "data": {"type": "array"}, "parameters": {"type": "object"}}}},
                "outputs": {"type": "array", "items": {"type": "object"}},
                "parameters": {"type": "object"},
            }}}},
    }
}


def dlrm_named(request, name: str) -> Recommender | None:
    """The recommender when `name` is its DLRM's served name (checked before the encoder's). `request`: anything
    with `.app` (the gRPC servicer passes itself)."""
    rec = request.app.state.recommender
    if rec is None or rec.model is None or name != rec.name:
        return None
    return recommender_of(request)


def encoder_named(request, name: str) -> Engine:
    """The ready engine if `name` is the encoder's served name; ModelNotFound naming what is served otherwise."""
    engine = engine_of(request)
    if name != engine.info.name:
        raise _not_served(request.app.state, name)
    return engine


def served_names(state) -> list[str]:
    """The KServe models this server serves: the encoder (once loaded) and a DLRM (HTTP, gRPC, Triton's repository)."""
    rec, engine = state.recommender, state.engine
    return ([engine.info.name] if engine is not None else []) + ([rec.name] if rec is not None and rec.model is not None else [])


def check_version(name: str, version: str | None) -> None:
    """ModelNotFound for a version other than the one every served model has, "1" (HTTP and gRPC; as Triton
    refuses a version it does not hold, ready included)."""
    if version not in (None, "", "1"):
        raise ModelNotFound(f"model {name!r} has no version {version!r}; its only version is '1'")


def bool_parameter(params: dict, name: str) -> bool | None:
    """A request parameter that must be a JSON boolean; None when absent or null (the default applies)."""
    value = params.get(name)
    if value is not None and not isinstance(value, bool):
        raise InvalidRequest(f"parameter {name!r} must be true or false, not {json.dumps(value)[:40]}")
    return value


def _not_served(state, name: str) -> ModelNotFound:
    return ModelNotFound(f"model {name!r} is not served here; this server serves {', '.join(map(repr, served_names(state)))}")


@router.get("")
async def server_metadata(request: Request):
    return {"name": "turboserve", "version": server.__version__, "extensions": extensions(request.app)}


def extensions(app) -> list[str]:
    """Triton's extension names for what this server speaks (HTTP and gRPC)."""
    names = ["binary_tensor_data", "model_configuration", "statistics", "model_repository"]
    return names + (["system_shared_memory"] if app.state.shared_memory.enabled else [])


@router.get("/health/live")
async def live(request: Request):
    """Live while loading, serving or draining; not once a batching worker has died (nothing but a restart
    brings it back, which is what a liveness probe on this route is for)."""
    if any(not engine.healthy for engine in _loaded_engines(request)):
        raise NotReady("the batching worker has stopped")
    return {"live": True}


@router.get("/health/ready")
async def ready(request: Request):
    if not all(engine.healthy for engine in engines_of(request)):  # NotReady too while loading or draining
        raise NotReady("the batching worker has stopped")
    return {"ready": True}


def _loaded_engines(request: Request) -> list:
    state = request.app.state
    return [e for e in (getattr(state, "engine", None), getattr(state, "reranker", None)) if e is not None]


@router.get("/models/stats")
@router.get("/models/{name}/stats")
@router.get("/models/{name}/versions/{version}/stats")
async def stats(request: Request, name: str | None = None, version: str | None = None):
    """Triton's statistics extension: per model, requests (succeeded, failed), time queued and in the model."""
    check_version(str(name), version)
    return {"model_stats": model_stats(request.app.state, name)}


def model_stats(state, name: str | None) -> list[dict]:
    """Statistics of the model `name`, or of every served model (HTTP and gRPC)."""
    out = []
    rec = state.recommender
    if rec is not None and rec.model is not None and name in (None, rec.name):
        out.append(rec.stats.as_dict(rec.name))
    for engine in (state.engine, getattr(state, "reranker", None)):  # each its own worker's batches
        if engine is not None and name in (None, engine.info.name):
            out.append(engine.stats.as_dict(engine.info.name, executions=engine.worker.executions))
    if name is not None and not out:
        raise _not_served(state, name)
    return out


@router.get("/models/{name}")
@router.get("/models/{name}/versions/{version}")
async def model_metadata(name: str, request: Request, version: str | None = None):
    check_version(name, version)
    rec = dlrm_named(request, name)
    if rec is not None:
        return rec.metadata()
    return encoder_metadata(encoder_named(request, name))


def encoder_metadata(engine: Engine) -> dict:
    """KServe v2 metadata of the text encoder (HTTP and gRPC)."""
    return {
        "name": engine.info.name,
        "versions": ["1"],
        "platform": "turboserve_" + engine.info.model_type,
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": "embedding", "datatype": "FP32", "shape": [-1, engine.info.dim]}],
    }


@router.get("/models/{name}/config")
@router.get("/models/{name}/versions/{version}/config")
async def config(name: str, request: Request, version: str | None = None):
    """Triton's model configuration, for tritonclient's get_model_config and perf_analyzer."""
    check_version(name, version)
    rec = dlrm_named(request, name)
    return model_config(rec.metadata() if rec is not None else encoder_metadata(encoder_named(request, name)))


@router.get("/models/{name}/ready")
@router.get("/models/{name}/versions/{version}/ready")
async def model_ready(name: str, request: Request, version: str | None = None):
    check_version(name, version)
    if dlrm_named(request, name) is not None:
        return {"name": name, "ready": True}
    engine = encoder_named(request, name)
    if not engine.healthy:
        raise NotReady("the batching worker has stopped")
    return {"name": name, "ready": True}


@router.post("/models/{name}/infer", openapi_extra=_INFER_BODY)
@router.post("/models/{name}/versions/{version}/infer", openapi_extra=_INFER_BODY)
async def infer(name: str, request: Request, version: str | None = None):
    check_version(name, version)
    rec = dlrm_named(request, name)
    if rec is not None:
        return await _infer_dlrm(rec, request)
    engine = encoder_named(request, name)
    shm = request.app.state.shared_memory
    parsed = parse_infer(await request.body(), request.headers.get(HEADER_LENGTH), shm)
    timing = timing_of(request)
    truncate = bool_parameter(parsed.parameters, "truncate")  # absent: model.auto_truncate decides
    normalize = bool_parameter(parsed.parameters, "normalize")
    encoded = await engine.tokenize(parsed.texts, timing, truncate)
    rows = await engine.run(encoded, request, timing)
    outputs = {"embedding": finish_embedding(rows, engine.info.normalize if normalize is None else normalize)}
    body, headers = encode_tensors(engine.info.name, parsed.id, outputs, parsed.binary_output,
                                   place_outputs(shm, parsed.targets, outputs))
    return Response(body, headers=headers)


async def _infer_dlrm(rec: Recommender, request: Request) -> Response:
    shm = request.app.state.shared_memory
    parsed = parse_tensors(await request.body(), request.headers.get(HEADER_LENGTH), shm)
    outputs = {"scores": await dlrm_scores(rec, parsed.inputs, parsed.outputs, timing_of(request))}
    body, headers = encode_tensors(rec.name, parsed.id, outputs, parsed.binary_output,
                                   place_outputs(shm, parsed.targets, outputs))
    return Response(body, headers=headers)


async def dlrm_scores(rec: Recommender, tensors: dict[str, np.ndarray], outputs: list[str], timing) -> np.ndarray:
    """DLRM inputs: `dense` FP32 [B, num_dense]; per sparse feature an INT64 (or INT32) tensor [B] (one key a
    sample) or [B, k] (k keys a sample, -1 pads a shorter bag). Output: `scores` FP32 [B] (HTTP and gRPC)."""
    unknown = [o for o in outputs if o != "scores"]
    if unknown:
        raise InvalidRequest(f"the only output is 'scores', not {unknown}")
    inputs = dict(tensors)
    dense = inputs.pop("dense", None)
    if dense is None:
        raise InvalidRequest("input 'dense' (FP32 [batch, num_dense]) is missing")
    if dense.dtype.kind != "f":
        raise InvalidRequest(f"input 'dense' must be FP32, got {dense.dtype}")
    if dense.ndim != 2:
        raise InvalidRequest(f"input 'dense' must be [batch, num_dense], got shape {list(dense.shape)}")
    sparse = {name: bags_from_matrix(name, values) for name, values in inputs.items()}
    started = time.perf_counter()
    try:
        scores = await run_in_threadpool(rec.score, dense.astype(np.float32), sparse)
    except BaseException:
        rec.stats.record(timing, len(dense), ok=False)
        raise
    timing.inference = time.perf_counter() - started
    rec.stats.record(timing, len(dense), ok=True, executions=1)
    return scores
