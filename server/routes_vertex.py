"""Google Vertex AI's prediction route, as TEI serves it: POST /vertex with {"instances": [...]} answers
{"predictions": [...]}, one prediction per instance. An instance with `query` and `texts` is a /rerank body; any
other is the body of the route the model answers: /embed for an embedding model (/embed_sparse for a SPLADE one),
/predict for a classifier or a re-ranker. Instances run concurrently, so they batch together (the planner sees
them as one client request, so server.max_client_batch_size bounds their inputs in all: a larger request is a 413
before any work, never a 429 it could retry forever); the first error fails the request (TEI's error body and status)
and withdraws the other instances' queued work. On Vertex AI, upload the model with
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


def _parse(instance: dict, kind: str) -> BaseModel:
    """The instance as the body of the route it stands for (a 422 when it is not a valid one)."""
    if "query" in instance and "texts" in instance:  # the only body that can be told apart safely (TEI)
        model: type[BaseModel] = routes_rerank.TEIRerankRequest
    else:
        model = {"sparse": routes_tei.EmbedSparseRequest, "embedding": routes_tei.EmbedRequest}.get(
            kind, routes_rerank.PredictRequest)
    try:
        return model.model_validate(instance)
    except ValidationError as exc:  # the same 422 as a body FastAPI validates itself
        raise RequestValidationError(exc.errors()) from None


def _inputs(body: BaseModel) -> int:
    """How many sequences the body queues, counted as its route counts them."""
    if isinstance(body, routes_rerank.TEIRerankRequest):
        return len(body.texts)
    inputs = body.inputs  # type: ignore[attr-defined]
    if isinstance(inputs, str):
        return 1
    if isinstance(body, routes_rerank.PredictRequest):  # two strings are one pair (TEI's reading)
        return 1 if len(inputs) == 2 and all(isinstance(x, str) for x in inputs) else len(inputs)
    return 1 if inputs and isinstance(inputs[0], int) else len(inputs)  # one list of token ids, or a batch


async def _one(body: BaseModel, request: Request):
    if isinstance(body, routes_rerank.TEIRerankRequest):
        return await routes_rerank.ranks(body, request)
    if isinstance(body, routes_tei.EmbedSparseRequest):
        return await routes_tei.sparse_embeddings(body, request)
    if isinstance(body, routes_tei.EmbedRequest):
        return await routes_tei.embeddings(body, request)
    return await routes_rerank.predictions(body, request)  # type: ignore[arg-type]


def _view(request: Request, timing: Timing, group: int | None) -> Request:
    """The request as one instance sees it: the same headers and connection, its own timings; its sequences in the
    client request `group` (None: the instance is the whole request) with every other instance's."""
    return Request({**request.scope, SCOPE_KEY: timing, GROUP_KEY: group}, request.receive)


async def vertex(body: VertexRequest, request: Request):
    engine = engine_of(request)
    if not body.instances:
        raise EmptyInput("instances is empty: give at least one")
    engine.check_batch(len(body.instances))
    kind = "sparse" if engine.info.sparse else engine.info.kind
    bodies = [_parse(inst, kind) for inst in body.instances]
    # The instances are one client request, held to max_client_batch_size inputs in all: a larger one could pass
    # max_queue_size, and the queue would refuse it (429) however long the client waited. No inputs at all: each
    # instance's route answers its own error.
    if inputs := sum(_inputs(b) for b in bodies):
        engine.check_batch(inputs)
    total = timing_of(request)
    timings = [replace(total, tokenization=0.0, queue=0.0, inference=0.0, tokens=0) for _ in bodies]
    group = new_group() if len(bodies) > 1 else None  # one client request for the planner, not one per instance
    tasks = [asyncio.ensure_future(_one(b, _view(request, t, group))) for b, t in zip(bodies, timings)]
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
