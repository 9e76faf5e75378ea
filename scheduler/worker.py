"""The batching worker: one thread per device, plan → run → complete."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from scheduler.errors import BackendError, DeadlineExceeded
from scheduler.queue import DEADLINE, FAILED, BatchQueue, WorkItem, resolve

log = logging.getLogger(__name__)


class Runner(Protocol):
    """Anything that turns a batch of token-id lists into one output row each."""

    def embed(self, sequences: list[list[int]], per_token: list[bool] | None = None,
              segments: list[int | None] | None = None) -> Sequence:
        """One output per sequence: pooled, or every token's for those flagged in per_token; segments: where
        each text pair's second text starts. Each keyword is passed only when some item needs it."""


class Observer(Protocol):
    """Counter hooks the server implements with Prometheus; the worker knows nothing of HTTP."""

    def batch_done(self, items: list[WorkItem], seconds: float, cost_error: float | None) -> None: ...

    def dropped(self, count: int, reason: str) -> None: ...

    def batch_failed(self, count: int) -> None: ...

    def batch_split(self, count: int) -> None: ...


class BatchWorker:
    """Runs batches from `queue` on `runner` in its own thread until the queue closes and drains."""

    def __init__(self, queue: BatchQueue, runner: Runner, observer: Observer, clock: Callable[[], float] = time.perf_counter):
        self.queue = queue
        self.runner = runner
        self.observer = observer
        self.clock = clock
        self.executions = 0  # batches this worker ran (Triton's execution_count of its model); its thread only
        # answer_after_plan: the last batch's items and outputs, resolved once the next batch is chosen; its thread only
        self._held: tuple[list[WorkItem], list] | None = None
        self._thread = threading.Thread(target=self._loop, name="turboserve-worker", daemon=True)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _loop(self) -> None:
        batch: list[WorkItem] = []
        idle = self._answer if self.queue.policy.answer_after_plan else None
        try:
            while (batch := self.queue.next_batch(idle=idle)) is not None:
                live = self._admit(batch)
                if live:
                    self._run(live)
            self._answer()
        except Exception:  # the loop itself broke: refuse new work and fail what waits, never hang it
            log.exception("batching worker crashed")
            try:
                self._answer()  # computed before the crash: still theirs
            except Exception:
                log.exception("could not hand out the last batch's answers")
            self.queue.close()
            stopped = BackendError("the batching worker stopped")
            for it in batch or []:
                if not it.future.done():
                    it.future.set_exception(stopped)
            self.queue.fail_pending(stopped)
        log.info("worker stopped: queue closed and drained")

    def _admit(self, batch: list[WorkItem]) -> list[WorkItem]:
        """Drop, before any compute, items whose request gave up (cancelled future: counted under the reason
        it was given) and items past their hard deadline (failed with DeadlineExceeded), even if the event
        loop has not got round to cancelling them; return the rest, now marked running."""
        now = self.clock()
        live: list[WorkItem] = []
        dropped: dict[str, int] = {}
        for it in batch:
            if not it.future.set_running_or_notify_cancel():
                dropped[it.drop_reason] = dropped.get(it.drop_reason, 0) + 1
            elif it.expires_at <= now:
                it.future.set_exception(DeadlineExceeded("the request timed out while queued; it was not computed"))
                dropped[DEADLINE] = dropped.get(DEADLINE, 0) + 1
            else:
                live.append(it)
        for reason, count in dropped.items():
            self.observer.dropped(count, reason)
        return live

    def _run(self, batch: list[WorkItem]) -> None:
        started = self.clock()
        for it in batch:
            it.queue_seconds = started - it.enqueued_at
        done: list[tuple[WorkItem, object]] = []
        whole = self._compute(batch, done)
        if not done:
            return
        seconds = self.clock() - started
        items = [it for it, _ in done]
        for it in items:
            it.inference_seconds = seconds
        cost = self.queue.cost
        # Refine the cost model online (only from a batch that ran whole); the error is that of the
        # prediction made before this batch.
        error = cost.observe([it.length for it in batch], seconds) if cost is not None and whole else None
        self.executions += 1
        self.observer.batch_done(items, seconds, error)
        self._held = (items, [row for _, row in done])
        if not self.queue.policy.answer_after_plan:
            self._answer()

    def _answer(self) -> None:
        """Resolve the last batch's held answers, if any (the event loop then writes them)."""
        if self._held is not None:
            held, self._held = self._held, None
            resolve(*held)

    def _compute(self, batch: list[WorkItem], done: list[tuple[WorkItem, object]]) -> bool:
        """Run `batch`, appending (item, row) to `done`; True if it ran whole, in one call.

        Out of memory splits the batch in halves and runs them one after the other, down to single
        sequences; any other error (or a lone sequence that still does not fit) fails the requests of
        the part that raised it, and only those, whole: their sequences in the halves not yet run and in
        the queue are never computed. The loop goes on either way.
        """
        try:
            extra: dict = {}
            if any(it.per_token for it in batch):
                extra["per_token"] = [it.per_token for it in batch]
            if any(it.segment is not None for it in batch):
                extra["segments"] = [it.segment for it in batch]
            done.extend(zip(batch, self.runner.embed([it.ids for it in batch], **extra)))
            return True
        except Exception as exc:
            if is_out_of_memory(exc) and len(batch) > 1:
                half = len(batch) // 2
                log.warning("out of memory on a batch of %d sequences (%d tokens): retrying it in halves",
                            len(batch), sum(it.length for it in batch))
                self.observer.batch_split(len(batch))
                self._compute(batch[:half], done)
                if rest := self._drop_failed_in(batch[:half], batch[half:]):
                    self._compute(rest, done)
                return False
            log.exception("batch of %d sequences failed", len(batch))
            self.observer.batch_failed(len(batch))
            error = BackendError(f"model failed on this batch: {type(exc).__name__}")
            self._drop_rest_of(batch, error)
            for it in batch:
                it.future.set_exception(error)
            return False

    def _drop_rest_of(self, failed: list[WorkItem], error: BackendError) -> None:
        """The sequences still queued of the client requests that `failed` holds some of: those requests have failed,
        so the rest of them is never computed (failed with `error` too, counted as dropped: `failed`)."""
        groups = {it.group for it in failed if it.group >= 0}
        rest = self.queue.withdraw_requests(groups) if groups else []
        for it in rest:
            if it.future.set_running_or_notify_cancel():
                it.future.set_exception(error)
        if rest:
            self.observer.dropped(len(rest), FAILED)

    def _drop_failed_in(self, ran: list[WorkItem], rest: list[WorkItem]) -> list[WorkItem]:
        """After half `ran` of a split batch: fail the items of `rest` whose client request failed in it (a failed
        item's future is done; one that succeeded is resolved only after the whole batch), counted as dropped:
        `failed`, as its sequences still queued are; returns the others, to compute."""
        failed = {it.group: it.future.exception() for it in ran if it.group >= 0 and it.future.done()}
        keep = [it for it in rest if it.group not in failed]
        for it in rest:
            if it.group in failed:
                it.future.set_exception(failed[it.group])
        if len(keep) < len(rest):
            self.observer.dropped(len(rest) - len(keep), FAILED)
        return keep


def is_out_of_memory(exc: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError, a host MemoryError, or a backend error that says so (no torch import here)."""
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()
