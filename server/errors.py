"""Map domain errors to each API family's error body, once, at the edge.

OpenAI routes (/v1/...) answer {"error": {"message", "type", "code", "param"}}; TEI routes answer
{"error", "error_type"}; KServe v2 routes (/v2/...) answer {"error"}. An unexpected exception is a 500
carrying the request id, with the traceback in the log only.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from pydantic import BaseModel

from models.config import ModelFolderError
from models.tokenizer import InputTooLong, InvalidText, InvalidTokens
from scheduler.errors import BackendError, DeadlineExceeded, NotReady, Overloaded

log = logging.getLogger(__name__)


class InvalidRequest(ValueError):
    """The request is well-formed JSON but asks for something this server cannot do."""


class EmptyInput(ValueError):
    """The request has no input, or an empty one."""


class TooLarge(ValueError):
    """Too many inputs, or a body over the payload limit."""


class ModelNotFound(LookupError):
    """The request names a model this server does not serve."""


class NotEnabled(LookupError):
    """The request needs a part of the server its settings leave off (the embedding parameter server, a DLRM)."""


class TableNotFound(LookupError):
    """The request names an embedding table the parameter server does not hold."""


class WrongModelKind(LookupError):
    """The route needs another kind of model (an embedding model, a re-ranker, a classifier) than the one served."""


class Unauthorized(PermissionError):
    """Missing or wrong API key."""


class BodyTimeout(ValueError):
    """The client stopped sending its request body."""


class UnsupportedMedia(ValueError):
    """A body in a type or content coding the route does not read."""


class ClientDisconnected(Exception):
    """The client went away before its answer was ready; its queued work was dropped."""


@dataclass(frozen=True)
class ErrorKind:
    status: int
    openai_type: str
    openai_code: str
    tei_type: str
    tei_status: int | None = None  # TEI's own status where it differs


# The one table from domain error to HTTP.
KINDS: dict[type, ErrorKind] = {
    InvalidRequest: ErrorKind(400, "invalid_request_error", "invalid_request", "Validation", 422),
    InvalidTokens: ErrorKind(400, "invalid_request_error", "invalid_tokens", "Validation", 422),
    InvalidText: ErrorKind(400, "invalid_request_error", "invalid_text", "Validation", 422),
    EmptyInput: ErrorKind(400, "invalid_request_error", "empty_input", "Empty"),
    TooLarge: ErrorKind(413, "invalid_request_error", "payload_too_large", "Validation"),
    InputTooLong: ErrorKind(413, "invalid_request_error", "context_length_exceeded", "Validation"),
    ModelNotFound: ErrorKind(404, "invalid_request_error", "model_not_found", "Validation"),
    TableNotFound: ErrorKind(404, "invalid_request_error", "table_not_found", "Validation"),
    NotEnabled: ErrorKind(404, "invalid_request_error", "not_enabled", "Validation"),
    WrongModelKind: ErrorKind(400, "invalid_request_error", "model_not_supported", "Backend", 424),  # TEI's 424
    Unauthorized: ErrorKind(401, "authentication_error", "invalid_api_key", "Unauthorized"),
    Overloaded: ErrorKind(429, "rate_limit_error", "overloaded", "Overloaded"),
    NotReady: ErrorKind(503, "service_unavailable", "not_ready", "Unhealthy"),
    DeadlineExceeded: ErrorKind(504, "timeout", "deadline_exceeded", "Overloaded"),
    BackendError: ErrorKind(500, "server_error", "backend_error", "Backend", 424),
    ModelFolderError: ErrorKind(500, "server_error", "model_error", "Backend"),
    ClientDisconnected: ErrorKind(499, "client_closed_request", "client_disconnected", "Validation"),
    UnsupportedMedia: ErrorKind(415, "invalid_request_error", "unsupported_media_type", "Validation"),
    BodyTimeout: ErrorKind(408, "invalid_request_error", "request_timeout", "Validation"),
}
VALIDATION = KINDS[InvalidRequest]
UNSUPPORTED_MEDIA = KINDS[UnsupportedMedia]
INTERNAL = ErrorKind(500, "server_error", "internal_error", "Backend")


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    code: str
    param: str | None = None


class OpenAIError(BaseModel):
    """The OpenAI family's error body."""

    error: OpenAIErrorDetail


class TEIError(BaseModel):
    """The TEI family's error body."""

    error: str
    error_type: str


class KServeError(BaseModel):
    """The KServe v2 family's error body."""

    error: str


ERROR_MODELS: dict[str, type[BaseModel]] = {"openai": OpenAIError, "tei": TEIError, "kserve": KServeError}


def error_responses(family: str) -> dict[int | str, dict]:
    """OpenAPI `responses` for a router of `family`: every status KINDS can answer with, in the family's body
    shape (499 is left out: the client is gone and sees nothing)."""
    statuses = {(kind.tei_status or kind.status) if family == "tei" else kind.status for kind in (*KINDS.values(), INTERNAL)}
    return {status: {"model": ERROR_MODELS[family], "description": "error"} for status in sorted(statuses - {499})}


def api_family(path: str) -> str:
    """Which API family a path belongs to: openai, kserve or tei."""
    if path.startswith("/v1/") or path in ("/v1", "/embeddings", "/models", "/score", "/classify", "/pooling",  # vLLM's too
                                           "/detokenize", "/version"):
        return "openai"
    if path.startswith("/v2/") or path == "/v2":
        return "kserve"
    return "tei"


def kind_of(exc: BaseException) -> ErrorKind | None:
    for cls in type(exc).__mro__:
        if cls in KINDS:
            return KINDS[cls]
    return None


def error_body(family: str, kind: ErrorKind, message: str) -> tuple[int, bytes]:
    """(status, JSON body) for an error of `kind` in `family`'s shape."""
    if family == "openai":
        status = kind.status
        body = {"error": {"message": message, "type": kind.openai_type, "code": kind.openai_code, "param": None}}
    elif family == "kserve":
        status = kind.status
        body = {"error": message}
    else:
        status = kind.tei_status or kind.status
        body = {"error": message, "error_type": kind.tei_type}
    return status, json.dumps(body).encode()


def describe_validation(errors: list[dict]) -> str:
    """One readable line from pydantic/FastAPI validation errors (no input values echoed)."""
    parts = []
    for err in errors[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "invalid request: " + "; ".join(parts) + more
