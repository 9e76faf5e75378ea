"""What the gRPC servicer (server/grpc_kserve.py) and its Triton extensions (server/grpc_triton.py) share."""

from __future__ import annotations

import asyncio
import uuid

import grpc

from server.errors import InvalidRequest
from server.middleware import Timing

# HTTP status of an error kind -> the gRPC code Triton answers for the same condition.
CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED, 404: grpc.StatusCode.NOT_FOUND,
         413: grpc.StatusCode.INVALID_ARGUMENT, 429: grpc.StatusCode.UNAVAILABLE, 499: grpc.StatusCode.CANCELLED,
         503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED}


def call_metadata(context) -> dict[str, str]:
    """The call's metadata, keys lower-cased (what HTTP headers carry: x-slo-ms, x-request-id, authorization...)."""
    return {k.lower(): v for k, v in context.invocation_metadata() or () if isinstance(v, str)}


STATUS_TEXT_LIMIT = 2048  # a status message travels in the trailers, which HTTP/2 peers hold to ~8 KiB in all


def status_text(exc: BaseException) -> str:
    """An error's message for a gRPC status, cut short: one that echoes a 100 kB model name would pass the trailers'
    limit and reach the client as RESOURCE_EXHAUSTED instead of the real error."""
    text = str(exc)
    return text if len(text) <= STATUS_TEXT_LIMIT else text[:STATUS_TEXT_LIMIT] + "..."


def call_peer(context) -> str:
    """The client's address, read while the call is live: grpc.aio's context.peer() on a call that has ended (a
    stream message's task finishing after the client cancelled the stream) dereferences freed memory (SIGSEGV)."""
    return context.peer()


def call_timing(metadata: dict[str, str]) -> Timing:
    return Timing(metadata.get("x-request-id", "")[:128] or uuid.uuid4().hex)


class Call:
    """What Engine.run reads of an HTTP request, from a gRPC call: the scheduling headers (the call's
    metadata) and `receive`, which returns http.disconnect once the call is over (cancelled, or timed out)."""

    def __init__(self, metadata: dict[str, str], context: grpc.aio.ServicerContext):
        self.headers = metadata
        self._over = asyncio.Event()
        context.add_done_callback(lambda _: self._over.set())

    async def receive(self) -> dict:
        await self._over.wait()
        return {"type": "http.disconnect"}


_LIVE: dict[int, tuple[grpc.aio.ServicerContext, Call]] = {}  # id(context) -> (it, its Call), while the call lasts


def call_of(metadata: dict[str, str], context: grpc.aio.ServicerContext) -> Call:
    """The one Call of a gRPC call, shared by a stream's messages: each Call adds a done callback to the context, and
    grpc holds every callback until the call ends (a Call a message grew a long stream by ~1 KB a message, for good).
    metadata: the call's (a stream's messages all have the same)."""
    key = id(context)
    held = _LIVE.get(key)
    if held is not None and held[0] is context:  # (the context is held too: its id cannot pass to another call)
        return held[1]
    call = Call(metadata, context)
    _LIVE[key] = context, call
    context.add_done_callback(lambda _: _LIVE.pop(key, None))
    return call


def bool_param(params, name: str) -> bool | None:
    if name not in params:
        return None
    value = params[name]
    if value.WhichOneof("parameter_choice") != "bool_param":
        raise InvalidRequest(f"invalid value type for {name!r} parameter, expected bool_param: it must be a bool")
    return value.bool_param


def plain_params(params) -> dict:
    """A gRPC parameters map as plain values (Triton sends shared memory sizes as int64_param)."""
    out = {}
    for key, value in params.items():
        choice = value.WhichOneof("parameter_choice")
        out[key] = getattr(value, choice) if choice is not None else None
    return out
