"""Recommendation and embedding-table routes (OpenAI-style JSON and errors, under /v1):
POST /v1/recommend, POST /v1/embeddings/lookup, POST /v1/embeddings/update.
The DLRM's KServe v2 routes live in routes_kserve.py beside the encoder's."""

from __future__ import annotations

import logging
import time

import numpy as np
import redis
from fastapi import APIRouter, Request
from pydantic import BaseModel, Field, StrictFloat, StrictInt
from starlette.concurrency import run_in_threadpool

from scheduler.errors import BackendError
from server.deps import json_body, json_body_schema, json_response, recommender_of, timing_of
from server.errors import InvalidRequest, error_responses
from server.recommend import Bag, bags_from_rows

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["recommend"], responses=error_responses("openai"))

Number = StrictInt | StrictFloat  # no numeric strings, no booleans


class RecommendRequest(BaseModel):
    dense: list[list[Number]] = Field(description="Dense features, one row of num_dense numbers per sample.")
    sparse: dict[str, list[StrictInt | list[StrictInt]]] = Field(
        description="Per sparse feature, one entry per sample: a key, or a list of keys (a bag, pooled).")
    model: str | None = Field(None, description="The recommendation model's served name (checked when given).")


class LookupRequest(BaseModel):
    table: str
    keys: list[StrictInt]


class UpdateRequest(BaseModel):
    table: str
    keys: list[StrictInt]
    vectors: list[list[Number]] = Field(description="One row of the table's dim numbers per key.")


async def _timed(request: Request, fn, *args):
    """Run fn off the event loop, its time reported as x-inference-time."""
    started = time.perf_counter()
    try:
        return await run_in_threadpool(fn, *args)
    finally:
        timing_of(request).inference = time.perf_counter() - started


@router.post("/recommend", openapi_extra=json_body_schema(RecommendRequest))
async def recommend(request: Request):
    body = await json_body(request, RecommendRequest)  # a DLRM batch's 26,000 keys: pydantic's JSON parser, one pass
    rec = recommender_of(request)
    rec.require_model(body.model)
    sparse: dict[str, Bag] = {name: bags_from_rows(name, rows) for name, rows in body.sparse.items()}
    if len({len(row) for row in body.dense}) > 1:  # ragged rows would make np.asarray raise (a 500)
        raise InvalidRequest(f"dense rows must all have the same length, got {sorted({len(row) for row in body.dense})}")
    try:
        with np.errstate(over="ignore"):  # beyond float32's range becomes inf, refused with NaN by the scorer
            dense = np.asarray(body.dense, dtype=np.float32) if body.dense else np.zeros((0, 0), np.float32)
    except OverflowError:  # a JSON integer past any float
        raise InvalidRequest("dense features must be finite (no NaN or infinity)") from None
    scores = await _timed(request, rec.score, dense, sparse)
    return json_response({"model": rec.name, "scores": scores})


@router.post("/embeddings/lookup", openapi_extra=json_body_schema(LookupRequest))
async def lookup(request: Request):
    body = await json_body(request, LookupRequest)
    rec = recommender_of(request)
    dim = rec.dim(body.table)
    vectors, found = await _timed(request, rec.lookup, body.table, body.keys)
    return json_response({"table": body.table, "dim": dim, "vectors": vectors, "found": found})


@router.post("/embeddings/update", openapi_extra=json_body_schema(UpdateRequest))
async def update(request: Request):
    """Write rows here (RocksDB first, fsynced), then, with an update stream, publish them to every replica."""
    body = await json_body(request, UpdateRequest)
    rec = recommender_of(request)
    rec.dim(body.table)
    consumer = rec.consumer
    publishing = consumer is not None and consumer.publishes
    if publishing:  # no older stream entry writes these keys over this update before its own entry is published
        consumer.order.hold(body.table, body.keys)
    try:
        n = await _timed(request, rec.update, body.table, body.keys, body.vectors)
    except BaseException:
        if publishing:
            consumer.order.release(body.table, body.keys)
        raise
    if not publishing or n == 0:  # nothing to tell the other replicas
        return json_response({"table": body.table, "updated": n})
    # After the local write, so a 200 means durable here; this replica's consumer re-applies the entry in
    # stream order like every other replica, which is what makes all of them end on the same value.
    try:
        entry_id = await run_in_threadpool(consumer.publish, body.table, body.keys, body.vectors)
    except redis.RedisError as exc:  # publish ended the keys' hold (a cancelled request's goes on in its thread)
        log.warning("update of table %r written here but not published to %s: %s", body.table, consumer.stream, exc)
        raise BackendError(f"the update was written on this replica but could not be published to the update stream "
                           f"{consumer.stream!r} ({type(exc).__name__}), so other replicas do not have it; retry the "
                           f"request (an update is idempotent)") from None
    return json_response({"table": body.table, "updated": n, "stream_id": entry_id.decode()})
