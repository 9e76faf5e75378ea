"""OpenAI embeddings API: POST /v1/embeddings, GET /v1/models."""

from __future__ import annotations

import base64
from typing import Literal

import numpy as np
from fastapi import APIRouter, Request
from pydantic import BaseModel, Field, StrictBool, StrictInt

from models.runtime import finish_embedding
from server.deps import OpenAIInputs, engine_of, engines_of, json_response, timing_of
from server.engine import Engine
from server.errors import ModelNotFound, WrongModelKind, error_responses

router = APIRouter(prefix="/v1", tags=["openai"], responses=error_responses("openai"))


class EmbeddingRequest(BaseModel):
    input: OpenAIInputs = Field(description="Text, texts, token ids, or lists of token ids (ids are used as given).")
    model: str | None = Field(None, description="Served model name (see GET /v1/models); optional, as TEI and vLLM take it.")
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: StrictInt | None = Field(None, ge=0, description="Truncate to this size and renormalise (Matryoshka "
                                         "models); 0, as infinity's client always sends it, is the full size.")
    user: str | None = None
    truncate_prompt_tokens: StrictInt | None = Field(None, description="vLLM's: cut each input to this many tokens (-1: the model's limit).")
    normalize: StrictBool | None = Field(None, description="vLLM's: L2-normalise (default: the model's own setting).")


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class InfinityModelCard(ModelCard):
    """infinity's card (its un-prefixed /models): its generated client requires `stats` and owned_by "infinity"."""

    stats: dict
    backend: str
    capabilities: list[str]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class InfinityModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[InfinityModelCard]


@router.post("/embeddings", response_model=EmbeddingResponse)
async def create_embeddings(body: EmbeddingRequest, request: Request):
    engine = engine_of(request)
    beside = request.app.state.reranker
    if beside is not None and body.model is not None and body.model == beside.info.name:
        raise WrongModelKind(f"model {body.model!r} is the re-ranker served beside {engine.info.name!r}: use /v1/rerank")
    engine.check_model(body.model)
    vectors = await embedding_vectors(engine, request, body.input, body.dimensions, body.normalize,
                                      body.truncate_prompt_tokens)
    if body.encoding_format == "base64":  # None (null): the default, float
        rows = [base64_of(v) for v in vectors]
    else:
        rows = list(vectors)  # numpy rows: orjson writes them
    tokens = timing_of(request).tokens
    return json_response({
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)],
        "model": engine.info.name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })


async def embedding_vectors(engine: Engine, request: Request, inputs, dimensions: int | None, normalize: bool | None,
                            truncate_prompt_tokens: int | None, direction: Literal["right", "left"] = "right",
                            per_token: bool = False) -> np.ndarray | list[np.ndarray]:
    """The vectors /v1/embeddings answers (also vLLM's /pooling): [n, dim], cut to `dimensions` (Matryoshka; 0 or None:
    the full size), L2-normalised as `normalize` says (None: the model's own setting, and always for a cut vector).
    per_token: a list of [tokens, dim], every token's last hidden state, each cut and normalised as a vector is."""
    if engine.info.sparse:
        raise WrongModelKind("this server serves a sparse (SPLADE) embedding model: its vectors come from /embed_sparse")
    dimensions = engine.check_dimensions(dimensions or None)
    timing = timing_of(request)
    encoded = await engine.tokenize(inputs, timing, direction=direction, limit=engine.prompt_limit(truncate_prompt_tokens))
    # vLLM's `normalize` when given; else the model's default, and unit vectors for OpenAI's `dimensions` (a cut vector)
    normalize = normalize if normalize is not None else engine.info.normalize or dimensions is not None
    out = await engine.run(encoded, request, timing, per_token=per_token)
    if per_token:
        return [finish_embedding(states, normalize, dimensions) for states in out]
    return finish_embedding(out, normalize, dimensions)


def base64_of(array: np.ndarray, dtype: str = "<f4") -> str:
    """An array's values as base64 of their bytes in `dtype` (OpenAI's: little-endian float32), row after row."""
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode()


@router.get("/models", response_model=ModelList)
async def list_models(request: Request):
    return {"object": "list", "data": [_card(engine, request) for engine in engines_of(request)]}


@router.get("/models/{model:path}", response_model=ModelCard)
async def retrieve_model(model: str, request: Request):
    """OpenAI's GET /v1/models/{model} (the client's models.retrieve); model_not_found for a name not served."""
    engines = engines_of(request)
    for engine in engines:
        if engine.info.name == model:
            return _card(engine, request)
    raise ModelNotFound(f"model {model!r} is not served here; this server serves "
                        f"{', '.join(repr(e.info.name) for e in engines)}")


def _card(engine, request: Request) -> dict:
    return {"id": engine.info.name, "object": "model", "created": request.app.state.started_at, "owned_by": "turboserve"}


async def list_models_infinity(request: Request):
    """infinity's GET /models: OpenAI's cards with infinity's fields (its client refuses cards without them), the
    queue's state as infinity reports it in `stats`."""
    return {"object": "list", "data": [_infinity_card(engine, request) for engine in engines_of(request)]}


def _infinity_card(engine, request: Request) -> dict:
    queue = engine.queue
    capability = {"embedding": "embed", "reranker": "rerank", "classifier": "classify"}[engine.info.kind]
    return {**_card(engine, request), "owned_by": "infinity", "backend": "turboserve", "capabilities": [capability],
            "stats": {"queue_fraction": queue.depth / queue.max_size, "queue_absolute": queue.depth,
                      "results_pending": queue.depth, "batch_size": engine.settings.scheduler.max_batch_requests}}
