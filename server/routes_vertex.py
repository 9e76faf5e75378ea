"""Google Vertex AI's prediction route, as TEI serves it: POST /vertex with {"instances": [...]} answers
{"predictions": [...]}, one prediction per instance. An instance with `query` and `texts` is a /rerank body; any
other is the body of the route the model answers: /embed for an embedding model (/embed_sparse for a SPLADE one),
/predict for a classifier or a re-ranker. Instances run concurrently, so they batch together (the planner sees
them as one client request); the first error fails the request (TEI's error body and status) and withdraws the other
instances' queued work. On Vertex AI, upload the model with
`--container-predict-route=/vertex --container-health-route=/health`."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, ValidationError

from scheduler.errors import DeadlineExceeded
from scheduler.queue import DEADLINE, DISCONNECT, FAILED
from server import routes_rerank, routes_tei
from server.deps import engine_of, json_response, timing_of
from server.engine import GROUP_KEY, new_group
from server.errors import ClientDisconnected, EmptyInput, error_responses
from server.middleware import SCOPE_KEY, Timing

router = APIRouter(tags=["tei"], responses=error_responses("tei"))


class VertexRequest(BaseModel):
    instances: list[dict] = Field(description="Request bodies of /embed, /rerank or /predict, by the model's kind.")


async def _one(instance: dict, request: Request, kind: str):
    try:
        if "query" in instance and "texts" in instance:  # the only body that can be told apart safely (TEI)
            return await routes_rerank.ranks(routes_rerank.TEIRerankRequest.model_validate(instance), request)
        if kind == "sparse":
            return await routes_tei.sparse_embeddings(routes_tei.EmbedSparseRequest.model_validate(instance), request)
        if kind == "embedding":
            return await routes_tei.embeddings(routes_tei.EmbedRequest.model_validate(instance), request)
        return await routes_rerank.predictions(routes_rerank.PredictRequest.model_validate(instance), request)
    except ValidationError as exc:  # the same 422 as a body FastAPI validates itself
        raise RequestValidationError(exc.errors()) from None


def _view(request: Request, timing: Timing, group: int | None) -> Request:
    """The request as one instance sees it: the same headers and connection, its own timings; its sequences in the
    client request `group` (None: the instance is the whole request) with every other instance's."""
    return Request({**request.scope, SCOPE_KEY: timing, GROUP_KEY: group}, request.receive)


async def vertex(body: VertexRequest, request: Request):
    engine = engine_of(request)
    if not body.instances:
        raise EmptyInput("instances is empty: give at least one")
    engine.check_batch(len(body.instances))
    total = timing_of(request)
    timings = [replace(total, tokenization=0.0, queue=0.0, inference=0.0, tokens=0) for _ in body.instances]
    kind = "sparse" if engine.info.sparse else engine.info.kind
    group = new_group() if len(body.instances) > 1 else None  # one client request for the planner, not one per instance
    tasks = [asyncio.ensure_future(_one(inst, _view(request, t, group), kind)) for inst, t in zip(body.instances, timings)]
    try:
        predictions = await asyncio.gather(*tasks)
    except BaseException as exc:
        # the others' queued sequences are withdrawn (their run is cancelled), counted as dropped for the reason why
        reason = DEADLINE if isinstance(exc, DeadlineExceeded) else \
            DISCONNECT if isinstance(exc, (ClientDisconnected, asyncio.CancelledError)) else FAILED
        for task in tasks:
            task.cancel(reason)
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    total.tokenization = sum(t.tokenization for t in timings)
    total.queue, total.inference = max(t.queue for t in timings), max(t.inference for t in timings)
    total.tokens = sum(t.tokens for t in timings)
    return json_response({"predictions": predictions})


router.add_api_route("/vertex", vertex, methods=["POST"])
