"""Graceful drain on SIGTERM: stop admitting, finish what was admitted, then exit, all within a deadline.

uvicorn on its own closes its listening socket at the first SIGTERM, so a client that connects during
the drain gets "connection refused" and a load balancer sees the pod vanish. Here the first SIGTERM only
flips the server to draining: readiness probes and every new request get 503 (with Retry-After), while
requests already admitted run to completion. When none is left (or `shutdown_timeout_s` is nearly
spent) uvicorn's own shutdown runs: sockets close, the batching worker drains, the process exits. A
second SIGTERM, or SIGINT (Ctrl-C), exits at once as uvicorn does.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Callable

import uvicorn

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM drains instead of closing the door."""

    def __init__(self, config: uvicorn.Config, begin_drain: Callable[[], None], busy: Callable[[], int],
                 shutdown_timeout_s: float, poll_s: float = 0.02):
        super().__init__(config)
        self.begin_drain = begin_drain
        self.busy = busy
        self.shutdown_timeout_s = shutdown_timeout_s
        self.poll_s = poll_s
        self.drain_started: float | None = None

    def handle_exit(self, sig: int, frame) -> None:
        if sig != signal.SIGTERM or self.drain_started is not None:
            super().handle_exit(sig, frame)
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
        if left:
            log.warning("drain deadline reached with %d requests still running", left)
        self.config.timeout_graceful_shutdown = max(0.5, self.drain_started + self.shutdown_timeout_s - time.monotonic() - 0.5)
        log.info("drained in %.2f s; shutting down", time.monotonic() - self.drain_started)
        self.should_exit = True
