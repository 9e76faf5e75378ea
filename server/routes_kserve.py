"""KServe v2 / Open Inference Protocol routes; `tritonclient.http` works against them unmodified."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

import server
from models.runtime import finish_embedding
from scheduler.errors import NotReady
from server.deps import engine_of, timing_of
from server.engine import Engine
from server.errors import ModelNotFound
from server.kserve_codec import HEADER_LENGTH, encode_infer_response, parse_infer

router = APIRouter(prefix="/v2", tags=["kserve"])

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


def _model(request: Request, name: str) -> Engine:
    engine = engine_of(request)
    if name != engine.info.name:
        raise ModelNotFound(f"model {name!r} is not served here; this server serves {engine.info.name!r}")
    return engine


@router.get("")
async def server_metadata():
    return {"name": "turboserve", "version": server.__version__, "extensions": ["binary_tensor_data"]}


@router.get("/health/live")
async def live():
    return {"live": True}


@router.get("/health/ready")
async def ready(request: Request):
    engine_of(request)
    return {"ready": True}


@router.get("/models/{name}")
@router.get("/models/{name}/versions/{version}")
async def model_metadata(name: str, request: Request, version: str | None = None):
    engine = _model(request, name)
    return {
        "name": engine.info.name,
        "versions": ["1"],
        "platform": "turboserve_" + engine.info.model_type,
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": "embedding", "datatype": "FP32", "shape": [-1, engine.info.dim]}],
    }


@router.get("/models/{name}/ready")
@router.get("/models/{name}/versions/{version}/ready")
async def model_ready(name: str, request: Request, version: str | None = None):
    engine = _model(request, name)
    if not engine.healthy:
        raise NotReady("the batching worker has stopped")
    return {"name": name, "ready": True}


@router.post("/models/{name}/infer", openapi_extra=_INFER_BODY)
@router.post("/models/{name}/versions/{version}/infer", openapi_extra=_INFER_BODY)
async def infer(name: str, request: Request, version: str | None = None):
    engine = _model(request, name)
    parsed = parse_infer(await request.body(), request.headers.get(HEADER_LENGTH))
    timing = timing_of(request)
    truncate = bool(parsed.parameters.get("truncate", False))
    encoded = await engine.tokenize(parsed.texts, timing, truncate)
    normalize = bool(parsed.parameters.get("normalize", engine.info.normalize))
    vectors = finish_embedding(await engine.run(encoded, request, timing), normalize)
    body, headers = encode_infer_response(engine.info.name, parsed.id, vectors, parsed.binary_output)
    return Response(body, headers=headers)
