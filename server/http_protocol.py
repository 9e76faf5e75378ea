"""uvicorn's httptools protocol with the limits an internet-facing server needs, as TEI's hyper has them.

uvicorn bounds none of these (checked in uvicorn 0.55; bench/RESULTS.md has no figures, the tests do):
- the request head (line and headers): a 128 MiB header was read whole, parsed in quadratic time (4 s of CPU for
  64 MiB) while every other client waited; now at most MAX_HEAD_BYTES, else 431 and the connection closed;
- the time to send a head: a connection that sent half a header (or nothing) was held forever, and enough of them
  used up the process's file descriptors for every client; now HEAD_TIMEOUT_S, else 408 and closed;
- pipelined requests of a client that never reads its answers: each was parsed and queued (170 MB a connection);
  now reading pauses while PIPELINE_LIMIT requests wait (the kernel's buffers push back on the client).
A body that stops arriving is the edge middleware's (server/middleware.py, BODY_IDLE_TIMEOUT_S).
"""

from __future__ import annotations

from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 64 * 1024  # hyper's default read buffer is ~400 KB; TEI's clients send a few hundred bytes
HEAD_TIMEOUT_S = 30.0  # as hyper's header_read_timeout in TEI's axum server
PIPELINE_LIMIT = 16


class _PipelineFlow(FlowControl):
    """uvicorn resumes reading whenever a request's body is read (every request reads its body) or an answer is
    done; while PIPELINE_LIMIT requests wait on the connection, reading stays paused."""

    def __init__(self, transport, pipeline) -> None:
        super().__init__(transport)
        self._pipeline = pipeline

    def resume_reading(self) -> None:
        if len(self._pipeline) < PIPELINE_LIMIT:
            super().resume_reading()


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol with a bounded request head, a head-read deadline and a bounded pipeline."""

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.flow = _PipelineFlow(transport, self.pipeline)
        self._head_bytes: int | None = 0  # bytes of the head read so far; None between a head and the next
        self._oversized = False  # a whole head over the limit arrived at once: refused after this read
        self._in_message = False  # between a head and its message's end: what arrives is body, even after an answer
        self._head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self._head_timed_out)

    def connection_lost(self, exc) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        answered = self.cycle is None or self.cycle.response_complete
        if self._head_bytes is None and not self._in_message and answered:
            self._start_head()  # a keep-alive connection's next request begins
        elif self._in_message and answered and self._head_timer is None:
            # the rest of a body answered early (401, 413): it has the head's time to arrive, then the connection closes
            self._head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self._leftover_timed_out)
        super().data_received(data)
        if self._oversized and not self.transport.is_closing():
            self._refuse(431, f"request head over {MAX_HEAD_BYTES} bytes")
        elif self._head_bytes is not None and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:  # still incomplete: stop reading it
                self._refuse(431, f"request head over {MAX_HEAD_BYTES} bytes")
        if len(self.pipeline) >= PIPELINE_LIMIT and not self.transport.is_closing():
            self.flow.pause_reading()  # a client that sends without reading waits on its own answers

    def on_headers_complete(self) -> None:
        self._stop_head_timer()
        if len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers) > MAX_HEAD_BYTES:
            self._oversized = True  # no request is made of it; data_received answers 431
            return
        self._head_bytes = None
        self._in_message = True
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._oversized:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._in_message = False
        if not self._oversized:
            super().on_message_complete()

    def _start_head(self) -> None:
        self._head_bytes = 0
        self._stop_head_timer()
        self._head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._head_bytes is not None and not self.transport.is_closing():
            if self._head_bytes:
                self._refuse(408, f"request head not received within {HEAD_TIMEOUT_S:.0f} s")
            else:  # nothing sent at all: just close, as hyper does
                self.transport.close()

    def _leftover_timed_out(self) -> None:
        self._head_timer = None
        if self._in_message and not self.transport.is_closing():
            self.transport.close()

    def _refuse(self, status: int, message: str) -> None:
        self.logger.warning("%s from %s: %d, connection closed", message, "%s:%d" % self.client if self.client else "?", status)
        reason = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}[status]
        body = message.encode()
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n%s" % (status, reason, len(body), body))
        self._head_bytes = None
        self._stop_head_timer()
        self.transport.close()
