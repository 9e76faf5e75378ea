"""Graceful drain on SIGTERM: stop admitting, finish what was admitted, then exit, all within a deadline.

uvicorn on its own closes its listening socket at the first SIGTERM, so a client that connects during
the drain gets "connection refused" and a load balancer sees the pod vanish. Here the first SIGTERM only
flips the server to draining: readiness probes and every new request get 503 (with Retry-After), while
requests already admitted run to completion. When none is left and no request has arrived or been answered
for QUIET_S (at most QUIET_MAX_S more), or `shutdown_timeout_s` is nearly spent, uvicorn's own shutdown runs: sockets
close, the batching worker drains, the process exits. At the deadline, work still queued is answered 503 (in its
API's shape) rather than cut off by uvicorn's plain-text 500. A second SIGTERM, or SIGINT (Ctrl-C), exits at once:
queued work is answered 503 and uvicorn's shutdown runs without a drain (a running batch still ends, and the
cost model's refinements are saved).

uvicorn's shutdown closes every connection with no request in progress, including one accepted a moment
before whose request bytes the event loop has not read yet: its client sees "disconnected without a
response" for a request that was sent. So the quiet period lets clients still sending get their 503 (and
back off) before the listener closes, and after it closes, connections already accepted get their requests
read and answered (503) before uvicorn closes the idle ones. A connection still in the kernel's accept
queue when the listener closes is reset: that window is what the quiet period makes small.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from typing import Callable

import uvicorn

log = logging.getLogger(__name__)

QUIET_S = 0.2  # once idle, exit after this long without a request arriving or being answered...
QUIET_MAX_S = 1.0  # ...or this long after idle, whichever first (clients retrying at once would keep it busy)
ACCEPTED_GRACE_S = 0.05  # after the listener closes, event-loop time for requests already accepted to be read


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM drains instead of closing the door."""

    def __init__(self, config: uvicorn.Config, begin_drain: Callable[[], None], busy: Callable[[], int],
                 shutdown_timeout_s: float, poll_s: float = 0.02, last_activity: Callable[[], float] = lambda: 0.0,
                 abandon: Callable[[], int] = lambda: 0, in_flight: Callable[[], int] = lambda: 0):
        super().__init__(config)
        self.begin_drain = begin_drain
        self.busy = busy
        self.abandon = abandon  # fails the queued work with a 503; returns how many sequences
        self.in_flight = in_flight  # requests being answered
        self.last_activity = last_activity  # time.monotonic() a request last arrived or was answered (0: never)
        self.shutdown_timeout_s = shutdown_timeout_s
        self.poll_s = poll_s
        self.drain_started: float | None = None
        # Ctrl-C seen: the exit status is 130 even where uvicorn's re-raise of it is a no-op (a process started with
        # SIGINT ignored, as a non-interactive shell starts its background jobs, keeps it ignored)
        self.interrupted = False

    def handle_exit(self, sig: int, frame) -> None:
        self.interrupted |= sig == signal.SIGINT
        if sig != signal.SIGTERM or self.drain_started is not None:  # Ctrl-C, or a second SIGTERM: exit now
            super().handle_exit(sig, frame)
            # Queued work answered 503 at once, so the worker has nothing left to drain; from a thread, not this
            # signal handler, which may have interrupted the event loop inside the queue's lock.
            threading.Thread(target=self.abandon, name="turboserve-abandon", daemon=True).start()
            return
        self.drain_started = time.monotonic()
        self.begin_drain()
        log.info("SIGTERM: draining (new requests get 503); exiting once admitted requests finish, within %.0f s",
                 self.shutdown_timeout_s)
        threading.Thread(target=self._exit_when_idle, name="turboserve-drain", daemon=True).start()

    def _exit_when_idle(self) -> None:
        # Leave a second of the budget for uvicorn's own shutdown and the worker's.
        deadline = self.drain_started + max(self.shutdown_timeout_s - 1.0, 0.0)
        while (left := self.busy()) and time.monotonic() < deadline:
            time.sleep(self.poll_s)
        if left:  # what is queued will not run in time: answer it (503) rather than have it cut off
            requests, sequences = self.in_flight(), self.abandon()
            log.warning("drain deadline reached with %d requests in flight: %d queued sequences answered 503",
                        requests, sequences)
            settle = time.monotonic() + 0.3
            while self.busy() and time.monotonic() < settle:  # their answers go out, a running batch may end
                time.sleep(self.poll_s)
        else:  # idle: wait for a quiet spell, so that clients still sending get their 503 first
            quiet_until = min(time.monotonic() + QUIET_MAX_S, deadline)
            while time.monotonic() - self.last_activity() < QUIET_S and time.monotonic() < quiet_until:
                time.sleep(self.poll_s)
        self.config.timeout_graceful_shutdown = max(0.5, self.drain_started + self.shutdown_timeout_s - time.monotonic() - 0.5)
        log.info("drained in %.2f s; shutting down", time.monotonic() - self.drain_started)
        self.should_exit = True

    async def shutdown(self, sockets=None) -> None:
        if self.drain_started is not None and not self.force_exit:
            for server in self.servers:  # stop accepting (uvicorn's shutdown closes them again: a no-op)
                server.close()
            # Requests on connections accepted just before: read them and answer them (503) before uvicorn
            # closes the connections it finds idle.
            await asyncio.sleep(ACCEPTED_GRACE_S)
            until = min(time.monotonic() + QUIET_MAX_S, self.drain_started + self.shutdown_timeout_s - 0.5)
            while self.busy() and time.monotonic() < until:
                await asyncio.sleep(self.poll_s)
        await super().shutdown(sockets)
