"""The HTTP front end's limits (server/http_protocol.py, the edge's body timeout), through raw sockets: what a
slowloris, a huge header or a client that pipelines without reading did to every other client."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from server import http_protocol, middleware
from tests.support import dummy_server


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _read_all(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


@pytest.fixture
def short_limits(monkeypatch):
    monkeypatch.setattr(http_protocol, "HEAD_TIMEOUT_S", 0.5)
    monkeypatch.setattr(middleware, "BODY_IDLE_TIMEOUT_S", 0.5)


def test_a_head_over_the_limit_is_431_at_once_and_others_are_served():
    with dummy_server() as s:
        sock = _connect(s.url)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
        started = time.monotonic()
        try:
            for _ in range(64):  # 64 x 64 KiB: it was read whole (a 128 MiB header stalled the event loop for seconds)
                sock.sendall(b"a" * 65536)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed by the server: what this test wants
        answer = _read_all(sock)
        assert answer.startswith(b"HTTP/1.1 431") and time.monotonic() - started < 5, answer[:200]
        whole = _connect(s.url)  # a head over the limit that arrives in one piece
        whole.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n")
        assert _read_all(whole).startswith(b"HTTP/1.1 431")
        assert httpx.get(f"{s.url}/health", headers={"x-fine": "a" * 8000}).status_code == 200


def test_a_head_that_stops_arriving_is_408_and_an_idle_connection_is_closed(short_limits):
    with dummy_server() as s:
        half, idle = _connect(s.url), _connect(s.url)
        half.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Ty")  # and then nothing (slowloris)
        started = time.monotonic()
        assert _read_all(half).startswith(b"HTTP/1.1 408") and time.monotonic() - started < 5
        assert _read_all(idle) == b""  # connected and sent nothing: closed, not held forever
        assert httpx.get(f"{s.url}/health").status_code == 200


def test_a_body_dripping_in_slower_than_the_idle_limit_still_ends_at_the_total_limit(monkeypatch):
    """A byte just under every idle limit held a request (and its connection) forever: the body has a total time."""
    monkeypatch.setattr(middleware, "BODY_IDLE_TIMEOUT_S", 0.6)
    monkeypatch.setattr(middleware, "BODY_TOTAL_TIMEOUT_S", 1.5)
    with dummy_server() as s:
        sock = _connect(s.url)
        sock.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n")
        started = time.monotonic()
        try:
            for _ in range(20):
                sock.sendall(b" ")
                time.sleep(0.3)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = _read_all(sock)
        assert answer.startswith(b"HTTP/1.1 408") and b"took more than" in answer, answer
        assert 1.4 < time.monotonic() - started < 5


def test_the_body_of_a_request_answered_early_is_not_read_as_the_next_head():
    """A 401 sent before the body was read: the 200 kB body arriving afterwards was counted as the next request's
    head (an unsolicited 431 and a closed connection); now it is the answered request's, and the connection serves on."""
    with dummy_server(server={"api_key": "k"}) as s:
        sock = _connect(s.url)
        body = b'{"inputs": "' + b"a" * 200_000 + b'"}'
        sock.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                     % len(body))
        time.sleep(0.3)
        first = sock.recv(65536)
        sock.sendall(body)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # /health is open: the same connection answers it
        sock.settimeout(5)
        rest = b""
        while b"HTTP/1.1 200" not in rest and b"HTTP/1.1 431" not in rest:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        sock.close()
    assert first.startswith(b"HTTP/1.1 401") and b"431" not in rest and b"HTTP/1.1 200" in rest, rest[:300]


def test_the_rest_of_a_body_answered_early_cannot_hold_the_connection(monkeypatch):
    """After an early 401, a body dripping in forever (a byte every 0.2 s) is given the head's time, then closed."""
    monkeypatch.setattr(http_protocol, "HEAD_TIMEOUT_S", 0.5)
    with dummy_server(server={"api_key": "k"}) as s:
        sock = _connect(s.url)
        sock.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n")
        time.sleep(0.3)
        assert sock.recv(65536).startswith(b"HTTP/1.1 401")
        started, closed = time.monotonic(), None
        sock.settimeout(0.01)
        while closed is None and time.monotonic() - started < 6:
            try:
                sock.sendall(b"a")
                if sock.recv(65536) == b"":
                    closed = time.monotonic() - started
            except socket.timeout:
                pass
            except OSError:
                closed = time.monotonic() - started
            time.sleep(0.2)
        sock.close()
    assert closed is not None and closed < 3, closed


def test_a_body_that_stops_arriving_is_408_in_the_routes_shape(short_limits):
    with dummy_server() as s:
        sock = _connect(s.url)
        sock.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"in")
        answer = _read_all(sock)
        assert answer.startswith(b"HTTP/1.1 408") and b'"error_type":"Validation"' in answer.replace(b" ", b""), answer
        r = httpx.post(f"{s.url}/embed", json={"inputs": "x"})
        assert r.status_code == 200


def test_a_client_pipelining_without_reading_is_held_to_a_few_queued_requests():
    """It sent ~60k requests a connection without reading an answer: every one was parsed and queued (170 MB). Now
    reading pauses while PIPELINE_LIMIT wait: at most one read's worth (256 KiB) more is ever parsed ahead, and the
    kernel's buffers then push back on the client."""
    with dummy_server() as s:
        sock = _connect(s.url)
        sock.setblocking(False)
        request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
        # Send until the sends make no progress for a second. How much gets out first is the kernel's socket buffers'
        # business (0.5 MB on a CI run, 2 MB on a quiet one); a server that parsed everything keeps reading, so the
        # client is never held back before the 8 MB cap (250k requests).
        sent, stalled_since, held_back = 0, None, False
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and sent < 8_000_000:
            try:
                sent += sock.send(request * 256)
                stalled_since = None
            except BlockingIOError:
                stalled_since = stalled_since or time.monotonic()
                if time.monotonic() - stalled_since >= 1.0:
                    held_back = True
                    break
                time.sleep(0.05)
        queued = max(len(p.pipeline) for p in s.server.server_state.connections)
        bound = http_protocol.PIPELINE_LIMIT + 262_144 // len(request)  # requests parsed ahead at most
        assert held_back and queued <= bound, (sent, queued, bound)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # reset
        sock.close()
        assert httpx.get(f"{s.url}/health").status_code == 200
