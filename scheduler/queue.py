"""Bounded admission queue shared by the event loop (producers) and one worker thread (consumer)."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from scheduler.cost_model import CostModel
from scheduler.errors import NotReady, Overloaded
from scheduler.planner import RATE_WINDOW, Limits, Plan, PolicyConfig, Request, plan

log = logging.getLogger(__name__)

# Why a queued item was dropped before compute (the `reason` label of turboserve_requests_dropped_total).
DEADLINE = "deadline"  # its hard deadline (the request timeout) passed while it waited
DISCONNECT = "disconnect"  # its client went away
FAILED = "failed"  # another part of its client request failed (its batch raised, or it was refused): the request has failed
DROP_REASONS = (DEADLINE, DISCONNECT, FAILED)


@dataclass(eq=False)
class WorkItem:
    """One input sequence waiting for its embedding. `future` resolves to the model's output row."""

    ids: list[int]
    enqueued_at: float = field(default_factory=time.perf_counter)
    deadline: float = math.inf  # soft: the planner's target (arrival + SLO); late items still run
    priority: int = 0
    group: int = -1  # the client request it belongs to when that has several inputs (the planner keeps them together)
    future: Future = field(default_factory=Future)
    # Hard: past this instant (same clock) the answer is useless (the request timed out), so the worker
    # fails the item with DeadlineExceeded instead of computing it, even if nobody cancelled it yet.
    expires_at: float = math.inf
    # The model's last hidden state for every token ([length, dim], TEI's /embed_all) instead of the pooled vector.
    per_token: bool = False
    # A text pair's: where its second text starts (token type 1 from there), for cross-encoders.
    segment: int | None = None
    # Set by whoever cancels the future, before cancelling, so the drop is counted under the right reason.
    drop_reason: str = DISCONNECT
    # Filled by the worker, read by the route for timing headers.
    queue_seconds: float = 0.0
    inference_seconds: float = 0.0

    @property
    def length(self) -> int:
        return len(self.ids)


class BatchQueue:
    """Holds pending WorkItems up to `max_size`; hands the worker one planned batch at a time."""

    def __init__(self, max_size: int, limits: Limits, policy: PolicyConfig | None = None,
                 cost: CostModel | None = None, clock: Callable[[], float] = time.perf_counter,
                 on_plan: Callable[[int, float], None] | None = None):
        self.max_size = max_size
        self.limits = limits
        self.policy = policy or PolicyConfig("token_budget")
        self.cost = cost
        self.clock = clock
        self._pending: list[WorkItem] = []
        self._admitted: deque[float] = deque()  # when each sequence of the last RATE_WINDOW seconds was admitted
        self._cond = threading.Condition()
        self._closed = False
        self._no_waiting = False  # draining: no more arrivals to wait for, so no batch is held back for a fuller one
        # Told (pending count, seconds) after every plan: the planner runs between batches, so its time is the device's
        # idle time, except a plan made ahead (PolicyConfig.plan_ahead) while a batch runs.
        self.on_plan = on_plan
        # plan_ahead: one thread plans the next batch while the worker runs the current one; `_ahead` is that plan's future.
        self._planner = ThreadPoolExecutor(1, "turboserve-plan-ahead") if self.policy.plan_ahead else None
        self._ahead: Future | None = None
        self.ahead_used = self.ahead_dropped = 0  # plans made ahead that the worker ran, and those it planned again instead

    @property
    def depth(self) -> int:
        """Sequences waiting (not yet taken by the worker)."""
        return len(self._pending)

    def submit(self, items: list[WorkItem], wake: bool = True) -> None:
        """Admit all of `items` or none: raise Overloaded when they would pass the bound.

        wake=False leaves an idle worker asleep until wake(): the event loop admits every request of one
        loop iteration (a burst) before the worker plans, instead of the first one running alone. A worker
        that comes back for its next batch takes what is pending either way."""
        with self._cond:
            if self._closed:
                raise NotReady("the server is shutting down")
            if len(self._pending) + len(items) > self.max_size:
                raise Overloaded(f"queue is full ({len(self._pending)} of {self.max_size} waiting)")
            self._pending.extend(items)
            now = self.clock()
            self._admitted.extend([now] * len(items))
            self._forget_admitted(now)
            if wake:
                self._cond.notify()

    def _forget_admitted(self, now: float) -> None:
        while self._admitted and self._admitted[0] < now - RATE_WINDOW:
            self._admitted.popleft()

    def wake(self) -> None:
        """Let the worker plan what submit(wake=False) admitted."""
        with self._cond:
            self._cond.notify()

    def check_room(self, count: int) -> None:
        """Raise Overloaded now if `count` more sequences would not fit, so a caller can refuse before doing
        any work for them (tokenizing); submit() still decides, as the queue may fill in between."""
        if len(self._pending) + count > self.max_size:  # a racy read is fine: this is only an early answer
            raise Overloaded(f"queue is full ({len(self._pending)} of {self.max_size} waiting)")

    def withdraw(self, items: list[WorkItem]) -> list[WorkItem]:
        """Take `items` out of the queue if still waiting (their requests gave up), freeing their room at once;
        returns those removed. Items the worker already took are left to it (it sees the cancelled futures)."""
        gone = {id(it) for it in items}
        return self._remove(lambda it: id(it) in gone)

    def withdraw_requests(self, groups: set[int]) -> list[WorkItem]:
        """Take every waiting item of the client requests `groups` (WorkItem.group) out of the queue; returns them."""
        return self._remove(lambda it: it.group in groups)

    def _remove(self, match: Callable[[WorkItem], bool]) -> list[WorkItem]:
        with self._cond:
            removed = [it for it in self._pending if match(it)]
            if removed:
                self._pending = [it for it in self._pending if not match(it)]
        return removed

    def next_batch(self, timeout: float | None = None, idle: Callable[[], None] | None = None) -> list[WorkItem] | None:
        """Block until the policy releases a batch; remove and return it.

        `idle`, if given, is called outside the lock before this call would block, and before it returns (so perhaps
        twice: it must be idempotent): the worker hands out the last batch's answers then (PolicyConfig.answer_after_plan).

        Plans again whenever work arrives while the policy holds a batch back for a fuller one. Items whose
        request gave up (cancelled future) or whose hard deadline passed come out first, as a batch of
        their own, for the worker to drop. Returns None when closed and empty, or [] after `timeout` seconds with nothing pending.
        """
        try:
            return self._next_batch(timeout, idle)
        finally:
            if idle is not None:
                idle()

    def _next_batch(self, timeout: float | None, idle: Callable[[], None] | None) -> list[WorkItem] | None:
        while True:
            if idle is not None and not (self._pending or self._closed):  # a racy read: at worst it answers early
                idle()
            with self._cond:
                if not self._cond.wait_for(lambda: self._pending or self._closed, timeout):
                    return []
                if not self._pending:
                    if self._planner is not None:
                        self._planner.shutdown(wait=False)
                    return None
                snapshot, closed = list(self._pending), self._closed or self._no_waiting
                now = self.clock()
                self._forget_admitted(now)
                rate = len(self._admitted) / RATE_WINDOW  # sequences a second lately (as planner.recent_rate counts)
            dead = [it for it in snapshot if it.expires_at <= now or it.future.cancelled()]
            if dead and (taken := self._take(dead)):
                return taken  # alone and unplanned: the worker drops them, and no batch is planned around them
            if (batch := self._planned_ahead(snapshot, now, closed, rate)) is not None:
                return batch
            decided = self._plan(snapshot, now, rate)  # outside the lock: producers (the event loop) never wait for it
            if decided.wait_until is not None and decided.wait_until > now and not closed:
                if idle is not None:
                    idle()
                with self._cond:
                    if len(self._pending) == len(snapshot) and not self._no_waiting:  # nothing new while planning
                        self._cond.wait(decided.wait_until - now)  # an arrival (or the drain) wakes us to plan again
                continue
            batch = self._take([snapshot[i] for i in decided.batches[0].indices])
            if batch:
                self._plan_ahead(batch, now, rate)
                return batch

    def _plan(self, snapshot: list[WorkItem], now: float, rate: float) -> Plan:
        """The policy's plan of `snapshot` from `now` (told to on_plan with its time); a planner bug falls back to TEI's
        budget rather than stop serving."""
        started = time.perf_counter()
        requests = [Request(it.length, it.enqueued_at, it.deadline, it.priority, it.group) for it in snapshot]
        try:
            decided = plan(requests, self.limits, self.cost, now, self.policy, next_only=True, arrival_rate=rate)
        except Exception:
            log.exception("policy %s failed to plan %d requests; using token_budget", self.policy.name, len(requests))
            decided = plan(requests, self.limits, None, now, PolicyConfig("token_budget"))
        if self.on_plan is not None:
            self.on_plan(len(requests), time.perf_counter() - started)
        return decided

    def _plan_ahead(self, batch: list[WorkItem], now: float, rate: float) -> None:
        """With plan_ahead: plan, in the planner thread, the batch to run after `batch` from what is pending beside it,
        as if it starts when `batch` is predicted to end."""
        if self._planner is None:
            return
        with self._cond:
            snapshot = list(self._pending)
        if not snapshot:
            return
        ends = now + (self.cost.predict_lengths([it.length for it in batch]) if self.cost is not None else 0.0)
        self._ahead = self._planner.submit(lambda: (snapshot, self._plan(snapshot, ends, rate)))

    def _planned_ahead(self, pending: list[WorkItem], now: float, closed: bool, rate: float) -> list[WorkItem] | None:
        """Take the batch planned ahead, if there is one and it still holds: the plan does not wait (or the queue
        drains), and nothing pending now that it did not see is more urgent than all it saw (a higher priority, or an
        earlier deadline); arrivals since wait for the next plan. None: plan now."""
        future, self._ahead = self._ahead, None
        if future is None:
            return None
        snapshot, decided = future.result()  # if still planning, wait: it began before this batch, no later than planning now
        seen = {id(it) for it in snapshot}
        top = max(it.priority for it in snapshot)
        soonest = min(it.deadline for it in snapshot)
        fresh = [it for it in pending if id(it) not in seen]
        holds = (decided.wait_until is None or decided.wait_until <= now or closed) and not any(
            it.priority > top or it.deadline < soonest for it in fresh)
        batch = self._take([snapshot[i] for i in decided.batches[0].indices]) if holds else []
        if not batch:
            self.ahead_dropped += 1
            return None
        self.ahead_used += 1
        self._plan_ahead(batch, now, rate)
        return batch

    def _take(self, chosen: list[WorkItem]) -> list[WorkItem]:
        """Remove `chosen` from the queue; return those still in it. withdraw() may have removed some since the
        snapshot, so each item is either withdrawn or taken by the worker, never both."""
        with self._cond:
            waiting = {id(it) for it in self._pending}
            batch = [it for it in chosen if id(it) in waiting]
            taken = {id(it) for it in batch}
            self._pending = [it for it in self._pending if id(it) not in taken]
        return batch

    def stop_waiting(self) -> None:
        """From now on release every batch at once (the server is draining: whatever the policy would wait for
        will not arrive); a batch held back now is planned again right away."""
        with self._cond:
            self._no_waiting = True
            self._cond.notify_all()

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
