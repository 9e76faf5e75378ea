"""Small accessors the routes share."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal, TypeVar

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, BeforeValidator, StrictInt, StrictStr, ValidationError

from scheduler.errors import NotReady
from server.engine import Engine
from server.errors import NotEnabled
from server.jsonout import dumps
from server.middleware import SCOPE_KEY, Timing

if TYPE_CHECKING:
    from server.recommend import Recommender


M = TypeVar("M", bound=BaseModel)


def json_media_type(value: str) -> bool:
    """Whether FastAPI reads a body of this Content-Type as JSON: application/json or application/*+json."""
    main, _, sub = value.split(";", 1)[0].strip().lower().partition("/")
    return main == "application" and (sub == "json" or sub.endswith("+json"))


async def json_body(request: Request, model: type[M]) -> M:
    """The body validated as `model`, parsed and validated in one pass by pydantic's JSON parser: a route that takes
    large bodies (26,000 keys of a DLRM batch) reads it so; FastAPI's body parameters go through the standard
    library's json.loads first (7 ms of such a body, against 2 ms for both here). Errors are FastAPI's own: a
    RequestValidationError with the locations under "body", for a body without a JSON Content-Type too (which
    FastAPI does not read as JSON either: the error handler answers it as an unsupported media type)."""
    if not json_media_type(request.headers.get("content-type", "")):
        raise RequestValidationError([{"type": "model_attributes_type", "loc": ("body",), "input": None,
                                       "msg": "Input should be a valid dictionary or object to extract fields from"}])
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]) from None


def json_body_schema(model: type[BaseModel]) -> dict:
    """A route's `openapi_extra` declaring the JSON body of `model` it reads with json_body (FastAPI documents only
    the bodies it parses itself)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def _lower(value):
    return value.lower() if isinstance(value, str) else value


# A truncation direction in TEI's bodies: TEI spells them "Right" / "Left" too.
Direction = Annotated[Literal["right", "left"], BeforeValidator(_lower)]

# Embedding inputs, strictly typed (no true as token id 1, no "5" as 5), as TEI's serde and OpenAI's API take them:
# a text, texts, one list of token ids, or lists of them. TEI also takes a batch mixing texts and id lists.
Ids = list[StrictInt]
OpenAIInputs = StrictStr | list[StrictStr] | Ids | list[Ids]
TEIInputs = StrictStr | list[StrictStr] | Ids | list[Ids] | list[StrictStr | Ids]


def engine_of(request: Request) -> Engine:
    """The ready engine, or NotReady (503) while the model loads or the server drains."""
    engine = request.app.state.engine
    if request.app.state.draining:
        raise NotReady("server is shutting down")
    if engine is None:
        failed = request.app.state.load_error
        raise NotReady(f"model failed to load: {failed}" if failed else "model is loading")
    return engine


def engine_for(request: Request, *kinds: str) -> Engine:
    """The ready engine whose model is of one of `kinds`: the model's own, else the reranker's (reranker.path);
    the model's when neither is (its require() then names what it serves)."""
    engine = engine_of(request)
    second = request.app.state.reranker
    if engine.info.kind not in kinds and second is not None and second.info.kind in kinds:
        return second
    return engine


def engines_of(request: Request) -> list[Engine]:
    """Every ready engine: the model's, then the reranker's when one is served."""
    second = request.app.state.reranker
    return [engine_of(request)] + ([second] if second is not None else [])


def timing_of(request: Request) -> Timing:
    return request.scope[SCOPE_KEY]


def json_response(payload, status: int = 200) -> Response:
    """Serialise with orjson directly (numpy arrays included): far cheaper than FastAPI's encoder."""
    return Response(dumps(payload), status_code=status, media_type="application/json")


def recommender_of(request: Request) -> Recommender:
    """The ready Recommender; NotEnabled (404) when embeddings are off, NotReady (503) while loading or draining."""
    state = request.app.state
    if not state.embeddings_enabled:
        raise NotEnabled("the embedding parameter server is off on this server (embeddings.enabled=false)")
    if state.draining:
        raise NotReady("server is shutting down")
    if state.recommender is None:
        failed = state.load_error
        raise NotReady(f"model failed to load: {failed}" if failed else "model is loading")
    return state.recommender
