"""Bounded admission queue shared by the event loop (producers) and one worker thread (consumer)."""

from __future__ import annotations

import logging
import math
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from scheduler.cost_model import CostModel
from scheduler.errors import NotReady, Overloaded
from scheduler.planner import Limits, PolicyConfig, Request, plan

log = logging.getLogger(__name__)


@dataclass(eq=False)
class WorkItem:
    """One input sequence waiting for its embedding. `future` resolves to the model's output row."""

    ids: list[int]
    enqueued_at: float = field(default_factory=time.perf_counter)
    deadline: float = math.inf  # on the same clock as enqueued_at
    priority: int = 0
    future: Future = field(default_factory=Future)
    # Filled by the worker, read by the route for timing headers.
    queue_seconds: float = 0.0
    inference_seconds: float = 0.0

    @property
    def length(self) -> int:
        return len(self.ids)


class BatchQueue:
    """Holds pending WorkItems up to `max_size`; hands the worker one planned batch at a time."""

    def __init__(self, max_size: int, limits: Limits, policy: PolicyConfig | None = None,
                 cost: CostModel | None = None, clock: Callable[[], float] = time.perf_counter):
        self.max_size = max_size
        self.limits = limits
        self.policy = policy or PolicyConfig("token_budget")
        self.cost = cost
        self.clock = clock
        self._pending: list[WorkItem] = []
        self._cond = threading.Condition()
        self._closed = False

    @property
    def depth(self) -> int:
        """Sequences waiting (not yet taken by the worker)."""
        return len(self._pending)

    def submit(self, items: list[WorkItem]) -> None:
        """Admit all of `items` or none: raise Overloaded when they would pass the bound."""
        with self._cond:
            if self._closed:
                raise NotReady("the server is shutting down")
            if len(self._pending) + len(items) > self.max_size:
                raise Overloaded(f"queue is full ({len(self._pending)} of {self.max_size} waiting)")
            self._pending.extend(items)
            self._cond.notify()

    def next_batch(self, timeout: float | None = None) -> list[WorkItem] | None:
        """Block until the policy releases a batch; remove and return it.

        Plans again whenever work arrives while the policy holds a batch back for a fuller one.
        Returns None when closed and empty, or [] after `timeout` seconds with nothing pending.
        """
        while True:
            with self._cond:
                if not self._cond.wait_for(lambda: self._pending or self._closed, timeout):
                    return []
                if not self._pending:
                    return None
                snapshot, closed = list(self._pending), self._closed
            # Plan outside the lock: producers (the event loop) never wait for the planner.
            now = self.clock()
            requests = [Request(it.length, it.enqueued_at, it.deadline, it.priority) for it in snapshot]
            try:
                decided = plan(requests, self.limits, self.cost, now, self.policy)
            except Exception:  # a planner bug must not stop serving: fall back to TEI's budget
                log.exception("policy %s failed to plan %d requests; using token_budget", self.policy.name, len(requests))
                decided = plan(requests, self.limits, None, now, PolicyConfig("token_budget"))
            if decided.wait_until is not None and decided.wait_until > now and not closed:
                with self._cond:
                    if len(self._pending) == len(snapshot):  # nothing arrived while planning
                        self._cond.wait(decided.wait_until - now)  # an arrival wakes us to plan again
                continue
            batch = [snapshot[i] for i in decided.batches[0].indices]
            taken = {id(it) for it in batch}
            with self._cond:  # only this thread removes items, so every chosen one is still pending
                self._pending = [it for it in self._pending if id(it) not in taken]
            return batch

    def close(self) -> None:
        """Refuse new work; the worker drains what is pending, then next_batch returns None."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def fail_pending(self, exc: Exception) -> int:
        """Fail every waiting item with `exc` (used when the worker cannot run); returns how many."""
        with self._cond:
            pending, self._pending = self._pending, []
        for it in pending:
            if it.future.set_running_or_notify_cancel():
                it.future.set_exception(exc)
        return len(pending)


def resolve(items: list[WorkItem], outputs: Any) -> None:
    """Hand row i of `outputs` to item i."""
    for item, row in zip(items, outputs):
        item.future.set_result(row)
