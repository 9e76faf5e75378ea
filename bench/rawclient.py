"""A lean HTTP/1.1 client for the load generators: keep-alive connections over asyncio streams, nothing else.

On the 2-vCPU VM the benches share with the server, httpx's AsyncClient cost the load generator ~2.3 ms of CPU a
request (2.8 CPU-s for 1,200 short requests) against ~0.9 ms for the server's whole HTTP path: the client took a
fifth of the machine, and the batches it ran beside came out slower than the cost model's profile of them
(bench/RESULTS.md, section 2, session 19). This client costs ~0.2 ms a request; what the benches read of a response
(status, the timing headers, the body) it reads the same way. It speaks only what turboserve answers on loopback:
Content-Length or chunked bodies, keep-alive unless the server says close.

    async with RawClient("http://127.0.0.1:8000", max_connections=32, timeout=60) as client:
        r = await client.post("/embed", json={"inputs": "hi"}, headers={"x-slo-ms": "500"})
        r.status_code, r.headers.get("x-inference-time"), r.json()
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit


class RawClientError(Exception):
    """The request got no complete answer: connection refused or lost, a malformed answer, or the timeout."""


@dataclass
class RawResponse:
    status_code: int
    headers: dict[str, str] = field(default_factory=dict)  # names in lower case; a repeated header keeps its last value
    content: bytes = b""

    async def aread(self) -> bytes:  # the body is read already (httpx.Response's spelling, for shared code)
        return self.content

    def json(self) -> Any:
        return json.loads(self.content)


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.used = False  # has answered a request: the server may have closed it since (keep-alive timeout)

    def close(self) -> None:
        self.writer.close()


class RawClient:
    """POST (and GET) over a pool of at most `max_connections` keep-alive connections to one host (as many requests in
    flight; more wait their turn)."""

    def __init__(self, base_url: str, max_connections: int = 100, timeout: float = 60.0) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"RawClient speaks plain http to one host, not {base_url!r}")
        self.host, self.port, self.timeout = parts.hostname, parts.port or 80, timeout
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(max_connections)

    async def __aenter__(self) -> RawClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        while self._idle:
            self._idle.pop().close()

    async def post(self, path: str, content: bytes | None = None, json: Any = None,
                   headers: dict[str, str] | None = None) -> RawResponse:
        if json is not None:
            content = _json_bytes(json)
            headers = {"content-type": "application/json", **(headers or {})}
        return await self.request("POST", path, content or b"", headers or {})

    async def get(self, path: str, headers: dict[str, str] | None = None) -> RawResponse:
        return await self.request("GET", path, None, headers or {})

    async def request(self, method: str, path: str, content: bytes | None, headers: dict[str, str]) -> RawResponse:
        head = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        if content is not None:
            head.append(f"Content-Length: {len(content)}")
        message = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + (content or b"")
        async with self._slots:
            try:
                return await asyncio.wait_for(self._exchange(message), self.timeout)
            except asyncio.TimeoutError:
                raise RawClientError(f"no answer within {self.timeout} s") from None

    async def _exchange(self, message: bytes) -> RawResponse:
        for attempt in (0, 1):
            conn = (attempt == 0 and self._take_idle()) or await self._connect()
            try:
                conn.writer.write(message)
                await conn.writer.drain()
                response, keep = await _read_response(conn.reader)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
                conn.close()
                # A reused connection the server closed while it sat idle (its close not yet seen) answers nothing:
                # send once more on a fresh one (as httpx does). Anything else, or a second failure, is the request's.
                if attempt == 0 and conn.used and isinstance(exc, (ConnectionError, asyncio.IncompleteReadError)):
                    continue
                raise RawClientError(f"{type(exc).__name__}: {exc}") from exc
            except BaseException:  # cancelled or timed out mid-answer: the connection's state is unknown
                conn.close()
                raise
            conn.used = True
            if keep:
                self._idle.append(conn)
            else:
                conn.close()
            return response
        raise AssertionError("unreachable")

    def _take_idle(self) -> _Connection | None:
        """An idle connection the server has not closed (uvicorn closes one idle for 5 s: after a lull in the trace every
        idle connection may be closed; the retry alone, on another of them, lost a twentieth of the requests of session
        19's live runs at the next burst)."""
        while self._idle:
            conn = self._idle.pop()
            if not conn.reader.at_eof():
                return conn
            conn.close()
        return None

    async def _connect(self) -> _Connection:
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port)
        except OSError as exc:
            raise RawClientError(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        return _Connection(reader, writer)


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


async def _read_response(reader: asyncio.StreamReader) -> tuple[RawResponse, bool]:
    """One response; (it, whether the connection stays open)."""
    lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    status = int(rest.split(" ", 1)[0])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while size := int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16):
            parts.append((await reader.readexactly(size + 2))[:-2])
        while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, up to the empty line
            pass
        body = b"".join(parts)
    elif status in (204, 304) or 100 <= status < 200:
        body = b""
    else:  # the body runs to the end of the connection
        body, keep = await reader.read(), False
    return RawResponse(status, headers, body), keep
