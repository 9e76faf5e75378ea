"""The edge of every request, as plain ASGI: request id, API key, body limit, timing headers,
request metrics, the access log line, and the last-resort 500 that never carries a traceback."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from scheduler.errors import NotReady
from server.errors import (
    INTERNAL,
    BodyTimeout,
    InvalidRequest,
    TooLarge,
    Unauthorized,
    UnsupportedMedia,
    api_family,
    error_body,
    kind_of,
)
from server.logs import ACCESS_LOGGER, REQUEST_ID, printable
from server.metrics import Metrics

log = logging.getLogger(__name__)
access_log = logging.getLogger(ACCESS_LOGGER)

SCOPE_KEY = "turboserve"
BODY_IDLE_TIMEOUT_S = 30.0  # a request body that stops arriving for this long is a 408 (it held its connection forever)
# ... and one still arriving after this long in all (a byte every 20 s never trips the idle limit): at payload_limit's
# default, 2 MB, that asks for 17 kB/s at least
BODY_TOTAL_TIMEOUT_S = 120.0


@dataclass
class Timing:
    """Per-request timings the routes fill in; sent back as TEI-style headers (milliseconds)."""

    request_id: str
    started: float = field(default_factory=time.perf_counter)
    tokenization: float = 0.0
    queue: float = 0.0
    inference: float = 0.0
    tokens: int = 0


async def _within(awaitable, seconds: float):
    """await `awaitable`, TimeoutError past `seconds`: asyncio.timeout where there is one (Python 3.11+: 4.8 us a call
    here, where wait_for's task costs 11.9 us, on every request's body read)."""
    if hasattr(asyncio, "timeout"):
        async with asyncio.timeout(seconds):
            return await awaitable
    return await asyncio.wait_for(awaitable, seconds)


def _header(scope: dict, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value
    return None


class EdgeMiddleware:
    """Wraps the FastAPI app; every response leaves through `send` here."""

    def __init__(self, app, metrics: Metrics, payload_limit: int, api_key: str | None, counters: dict | None = None,
                 open_paths: Iterable[str] = (), access_log: bool = False):
        self.app = app
        self.counters = counters if counters is not None else {"in_flight": 0, "last_activity": 0.0}  # for the drain
        self.metrics = metrics
        self.payload_limit = payload_limit
        self.api_key = api_key.encode() if api_key else None
        self.open_paths = frozenset(open_paths)  # reachable without the key (probes and scrapers carry none)
        self.access_log = access_log

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.counters["in_flight"] += 1
        self.counters["last_activity"] = time.monotonic()
        try:
            await self._handle(scope, receive, send)
        finally:
            self.counters["in_flight"] -= 1
            self.counters["last_activity"] = time.monotonic()  # a client often sends its next request right away

    async def _handle(self, scope, receive, send):
        incoming_id = _header(scope, b"x-request-id")
        request_id = incoming_id.decode("latin-1")[:128] if incoming_id else uuid.uuid4().hex
        timing = Timing(request_id)
        scope[SCOPE_KEY] = timing
        REQUEST_ID.set(request_id)  # this task's context only: uvicorn runs each request in its own task
        sent = {"status": 0, "bytes": 0}
        try:
            await self._respond(scope, receive, send, timing, sent)
        finally:
            if self.access_log:
                self._log_access(scope, timing, sent)

    async def _respond(self, scope, receive, send, timing: Timing, sent: dict) -> None:
        request_id = timing.request_id
        family = api_family(scope["path"])

        async def send_with_headers(message):
            if message["type"] == "http.response.body":
                sent["bytes"] += len(message.get("body", b""))
            elif message["type"] == "http.response.start":
                sent["status"] = message["status"]
                total = time.perf_counter() - timing.started
                headers = list(message.get("headers", []))
                headers += [
                    (b"x-request-id", request_id.encode("latin-1")),
                    (b"x-total-time", f"{total * 1000:.3f}".encode()),
                    (b"x-tokenization-time", f"{timing.tokenization * 1000:.3f}".encode()),
                    (b"x-queue-time", f"{timing.queue * 1000:.3f}".encode()),
                    (b"x-inference-time", f"{timing.inference * 1000:.3f}".encode()),
                    (b"x-compute-tokens", str(timing.tokens).encode()),
                ]
                message = {**message, "headers": headers}
                route = scope.get("route")
                label = getattr(route, "path", "unmatched")
                self.metrics.request_duration.labels(label).observe(total)
                self.metrics.requests.labels(label, str(message["status"])).inc()
            await send(message)

        async def refuse(exc: Exception, extra_headers: list[tuple[bytes, bytes]] = ()) -> None:
            status, body = error_body(family, kind_of(exc), str(exc))
            await send_with_headers({"type": "http.response.start", "status": status, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra_headers]})
            await send_with_headers({"type": "http.response.body", "body": body})

        if self.api_key is not None and scope["path"] not in self.open_paths:
            given = _header(scope, b"authorization") or b""
            token = given[7:] if given[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(token, self.api_key):
                await refuse(Unauthorized("missing or wrong API key (Authorization: Bearer <key>)"),
                             [(b"www-authenticate", b"Bearer")])
                return

        declared = _header(scope, b"content-length")
        if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > self.payload_limit:
            await refuse(TooLarge(f"request body of {int(declared)} bytes is over the {self.payload_limit}-byte limit"))
            return
        try:
            body, too_large = await self._read_body(receive)
        except BodyTimeout as exc:  # the rest of the body may still come: the connection cannot carry another request
            await refuse(exc, [(b"connection", b"close")])
            return
        except asyncio.CancelledError:  # shut down while the client was still sending its body
            await refuse(*_shut_down("received"))
            return
        if too_large:
            await refuse(TooLarge(f"request body is over the {self.payload_limit}-byte limit"))
            return
        coding = _header(scope, b"content-encoding")
        if coding is not None:  # tritonclient's request_compression_algorithm, any client's gzip
            try:
                body = decode_body(body, coding, self.payload_limit)
            except (UnsupportedMedia, InvalidRequest, TooLarge) as exc:
                await refuse(exc)
                return
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k not in (b"content-encoding", b"content-length")] \
                + [(b"content-length", str(len(body)).encode())]
        try:
            await self.app(scope, self._replay(body, receive), send_with_headers)
        except asyncio.CancelledError:
            # uvicorn cancels the requests still running when its graceful-shutdown time is up (the drain deadline:
            # their batch did not end in time), and answers them itself with a plain-text 500. Answer in the API's
            # shape instead, and let the task end: the cancellation is uvicorn's last word to it.
            if sent["status"]:
                raise
            log.warning("request %s %s (request id %s) not answered before shutdown: 503", scope.get("method"),
                        printable(scope["path"]), printable(request_id))
            await refuse(*_shut_down("answered"))
        except Exception:
            log.exception("unhandled error in request %s %s (request id %s)", scope.get("method"), printable(scope["path"]),
                          printable(request_id))
            if sent["status"]:
                raise  # the response already started; nothing clean is left to send
            status, payload = error_body(family, INTERNAL, f"internal error; request id {request_id}")
            await send_with_headers({"type": "http.response.start", "status": status, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
            await send_with_headers({"type": "http.response.body", "body": payload})

    @staticmethod
    def _log_access(scope, timing: Timing, sent: dict) -> None:
        """One access line: after the response (or its failure), so status, bytes and timings are final."""
        client = scope.get("client")
        user_agent = _header(scope, b"user-agent")
        route = scope.get("route")
        # No response started: the client went away first (nginx's 499, as the request counter says).
        status = sent["status"] or 499
        access_log.info("%s %s %d", scope.get("method"), printable(scope["path"]), status, extra={"fields": {
            "request_id": timing.request_id,
            "method": scope.get("method"),
            "path": scope["path"],
            "route": getattr(route, "path", None),
            "status": status,
            "duration_ms": round((time.perf_counter() - timing.started) * 1000, 3),
            "client": f"{client[0]}:{client[1]}" if client else None,
            "bytes_out": sent["bytes"],
            "tokens": timing.tokens,
            "tokenization_ms": round(timing.tokenization * 1000, 3),
            "queue_ms": round(timing.queue * 1000, 3),
            "inference_ms": round(timing.inference * 1000, 3),
            "user_agent": user_agent.decode("latin-1")[:256] if user_agent else None,  # as the request id: bounded
        }})

    async def _read_body(self, receive) -> tuple[bytes, bool]:
        """Read the whole body, stopping once it passes the limit."""
        chunks, size = [], 0
        deadline = time.monotonic() + BODY_TOTAL_TIMEOUT_S
        while True:
            left = deadline - time.monotonic()
            try:
                message = await _within(receive(), min(BODY_IDLE_TIMEOUT_S, max(left, 0.0)))
            except asyncio.TimeoutError:
                raise BodyTimeout(f"the request body stopped arriving for {BODY_IDLE_TIMEOUT_S:.0f} s" if left > BODY_IDLE_TIMEOUT_S
                                  else f"the request body took more than {BODY_TOTAL_TIMEOUT_S:.0f} s to arrive") from None
            if message["type"] != "http.request":
                return b"", False  # disconnected while sending; the app sees the disconnect next
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.payload_limit:
                return b"", True
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), False

    @staticmethod
    def _replay(body: bytes, receive):
        """A receive() that yields the buffered body once, then the real channel (for disconnects)."""
        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay


def _shut_down(what: str) -> tuple[NotReady, list[tuple[bytes, bytes]]]:
    """The 503 (and its Retry-After) of a request uvicorn cancelled at shutdown before it was `what`."""
    return NotReady(f"the server shut down before this request was {what}; retry it"), [(b"retry-after", b"1")]


def decode_body(body: bytes, coding: bytes, limit: int) -> bytes:
    """Undo a request's Content-Encoding (gzip, deflate, identity, in the order listed), as Triton's HTTP server
    does: the decoded body is held to the same byte limit as a plain one (a small gzip can expand a thousandfold)."""
    names = [c.strip().lower() for c in coding.decode("latin-1").split(",") if c.strip()]
    for name in reversed(names):  # the last coding listed was applied last
        if name == "identity":
            continue
        if name in ("gzip", "x-gzip"):
            wbits = 16 + zlib.MAX_WBITS
        elif name == "deflate":  # zlib-wrapped as HTTP says (tritonclient's zlib.compress); raw deflate too, as browsers send
            wrapped = len(body) >= 2 and body[0] & 0x0F == 8 and (body[0] << 8 | body[1]) % 31 == 0
            wbits = zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS
        else:
            raise UnsupportedMedia(f"Content-Encoding {name!r} is not supported: send gzip, deflate or identity")
        out, rest = b"", body
        while rest:  # gzip allows several members one after another
            decoder = zlib.decompressobj(wbits)
            try:
                out += decoder.decompress(rest, limit + 1 - len(out))
            except zlib.error as exc:
                raise InvalidRequest(f"request body is not valid {name} data ({exc})") from None
            if len(out) > limit:
                raise TooLarge(f"request body decoded from {name} is over the {limit}-byte limit")
            if not decoder.eof:
                raise InvalidRequest(f"request body is not valid {name} data (it ends early)")
            rest = decoder.unused_data if name != "deflate" else b""
        body = out
    return body


class HeadAsGet:
    """HEAD answered wherever GET is, as TEI's axum and Triton answer it: the GET route runs and its headers go back
    without the body. Routes are declared GET only (FastAPI adds no HEAD)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return await self.app(scope, receive, send)

        inner = dict(scope, method="GET")

        async def headers_only(message):
            if "route" in inner:  # the matched route, for the edge's metrics label and access line
                scope["route"] = inner["route"]
            if message["type"] == "http.response.body":
                message = {"type": "http.response.body", "body": b"", "more_body": message.get("more_body", False)}
            await send(message)

        await self.app(inner, receive, headers_only)
