"""Triton's extensions beyond KServe v2 that its clients call: system shared memory (CUDA shared memory
refused clearly) and the model repository API. `tritonclient.http` works against them unmodified; the gRPC
servicer (server/grpc_kserve.py) answers the same calls through the same functions.

The repository is what the server loaded at start-up, as Triton's `--model-control-mode=none`: the index
lists the served models, loading one that is served is a no-op, anything else is refused with a reason."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.deps import engine_of
from server.errors import InvalidRequest, error_responses
from server.kserve_codec import json_document
from server.routes_kserve import served_names
from server.shared_memory import cuda_refused

router = APIRouter(prefix="/v2", tags=["kserve"], responses=error_responses("kserve"))

CONTROL_MODE_NONE = ("turboserve serves the models it loaded at start-up (model.path, recommend.model_path), "
                     "as Triton's --model-control-mode=none")


async def _json(request: Request) -> dict:
    """The body as a JSON object; an empty body is {}."""
    raw = await request.body()
    if not raw.strip():
        return {}
    doc = json_document(raw)
    if not isinstance(doc, dict):
        raise InvalidRequest("request body must be a JSON object")
    return doc


@router.get("/systemsharedmemory/status")
@router.get("/systemsharedmemory/region/{name}/status")
async def shm_status(request: Request, name: str | None = None):
    return request.app.state.shared_memory.status(name)


@router.post("/systemsharedmemory/region/{name}/register")
async def shm_register(name: str, request: Request):
    doc = await _json(request)
    request.app.state.shared_memory.register(name, doc.get("key"), doc.get("offset", 0), doc.get("byte_size"))
    return {}


@router.post("/systemsharedmemory/unregister")
@router.post("/systemsharedmemory/region/{name}/unregister")
async def shm_unregister(request: Request, name: str | None = None):
    request.app.state.shared_memory.unregister(name)
    return {}


@router.get("/cudasharedmemory/status")
@router.get("/cudasharedmemory/region/{name}/status")
async def cuda_status(name: str | None = None):
    if name:
        raise InvalidRequest(f"unable to find CUDA shared memory region {name!r}")
    return []


@router.post("/cudasharedmemory/region/{name}/register")
async def cuda_register(name: str):
    raise cuda_refused()


@router.post("/cudasharedmemory/unregister")
@router.post("/cudasharedmemory/region/{name}/unregister")
async def cuda_unregister(name: str | None = None):
    return {}  # nothing is registered; Triton answers success for a name it does not hold


def served_models(request) -> list[str]:
    """The names of the models this server serves (503 while the encoder loads). `request`: anything with
    `.app` (the gRPC servicer passes itself)."""
    engine_of(request)
    return served_names(request.app.state)


def repository_index(request) -> list[dict]:
    return [{"name": n, "version": "1", "state": "READY", "reason": ""} for n in served_models(request)]


def repository_load(request, name: str) -> None:
    served = served_models(request)
    if name not in served:
        raise InvalidRequest(f"cannot load model {name!r}: {CONTROL_MODE_NONE}; it serves {', '.join(map(repr, served))}")


def repository_unload(name: str) -> None:
    raise InvalidRequest(f"cannot unload model {name!r}: {CONTROL_MODE_NONE}; stop the server to unload it")


@router.post("/repository/index")
async def index(request: Request):
    await _json(request)  # {"ready": bool}: every model listed is ready
    return repository_index(request)


@router.post("/repository/models/{name}/load")
async def load(name: str, request: Request):
    await _json(request)
    repository_load(request, name)
    return {}


@router.post("/repository/models/{name}/unload")
async def unload(name: str, request: Request):
    await _json(request)
    repository_unload(name)
    return {}
