"""Text Embeddings Inference API: POST /embed, GET /info, GET /health."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field, field_validator

import server
from models.runtime import finish_embedding
from scheduler.errors import NotReady
from server.deps import engine_of, json_response, timing_of
from server.errors import InvalidRequest, error_responses

router = APIRouter(tags=["tei"], responses=error_responses("tei"))


class EmbedRequest(BaseModel):
    inputs: str | list[str] | list[int] | list[list[int]] = Field(description="Text, texts, or token ids.")
    normalize: bool = True
    truncate: bool | None = Field(None, description="Cut inputs over max_input_length instead of refusing them (413).")
    truncation_direction: Literal["right", "left"] = "right"
    dimensions: int | None = Field(None, ge=1)
    prompt_name: str | None = None

    @field_validator("truncation_direction", mode="before")
    @classmethod
    def _lower(cls, value):
        # TEI spells them "Right" / "Left"; accept both spellings.
        return value.lower() if isinstance(value, str) else value


@router.post("/embed", response_model=list[list[float]])
async def embed(body: EmbedRequest, request: Request):
    engine = engine_of(request)
    if body.prompt_name is not None:
        raise InvalidRequest("prompt_name is not supported: this model defines no prompts")
    dimensions = engine.check_dimensions(body.dimensions)
    timing = timing_of(request)
    encoded = await engine.tokenize(body.inputs, timing, bool(body.truncate), body.truncation_direction)
    vectors = finish_embedding(await engine.run(encoded, request, timing), body.normalize, dimensions)
    return json_response(vectors)


class Info(BaseModel):
    model_id: str
    model_sha: str | None
    model_dtype: str
    model_type: dict
    max_concurrent_requests: int
    max_input_length: int
    max_batch_tokens: int
    max_batch_requests: int | None
    max_client_batch_size: int
    auto_truncate: bool
    tokenization_workers: int
    version: str
    sha: str | None = None
    docker_label: str | None = None
    scheduler: dict | None = None


@router.get("/info", response_model=Info)
async def info(request: Request):
    engine = engine_of(request)
    s = engine.settings
    return {
        "model_id": engine.info.name,
        "model_sha": None,
        "model_dtype": engine.info.dtype,
        "model_type": {"embedding": {"pooling": engine.info.pooling}},
        "max_concurrent_requests": s.scheduler.max_queue_size,
        "max_input_length": engine.info.max_input_length,
        "max_batch_tokens": s.scheduler.max_batch_tokens,
        "max_batch_requests": s.scheduler.max_batch_requests,
        "max_client_batch_size": s.server.max_client_batch_size,
        "auto_truncate": False,
        "tokenization_workers": 1,
        "version": server.__version__,
        "scheduler": engine.scheduler_info(),
    }


@router.get("/health")
async def health(request: Request):
    """200 when the model is loaded and its worker runs; 503 otherwise."""
    engine = engine_of(request)
    if not engine.healthy:
        raise NotReady("the batching worker has stopped")
    return json_response({"status": "ok"})
