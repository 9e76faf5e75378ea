"""Admission and the worker loop, with plain threads and a fake runner (no HTTP, no torch)."""

from __future__ import annotations

import threading

import pytest

from scheduler.cost_model import CostModel
from scheduler.errors import BackendError, DeadlineExceeded, NotReady, Overloaded
from scheduler.planner import Limits, PolicyConfig
from scheduler.queue import DEADLINE, DISCONNECT, BatchQueue, WorkItem
from scheduler.worker import BatchWorker


class Recorder:
    def __init__(self):
        self.batches, self.dropped_by, self.failed, self.splits = [], {}, 0, []

    def batch_done(self, items, seconds, cost_error):
        self.batches.append([it.ids for it in items])

    @property
    def dropped_count(self):
        return sum(self.dropped_by.values())

    def dropped(self, count, reason):
        self.dropped_by[reason] = self.dropped_by.get(reason, 0) + count

    def batch_failed(self, count):
        self.failed += count

    def batch_split(self, count):
        self.splits.append(count)


class SumRunner:
    def __init__(self, fail_on=None):
        self.fail_on = fail_on
        self.gate = threading.Event()
        self.gate.set()

    def embed(self, sequences):
        self.gate.wait(10)
        if self.fail_on is not None and self.fail_on in [s[0] for s in sequences]:
            raise RuntimeError("bad batch")
        return [sum(s) for s in sequences]


def test_admission_is_all_or_nothing():
    q = BatchQueue(3, Limits(100, 10))
    q.submit([WorkItem([1]), WorkItem([2])])
    with pytest.raises(Overloaded):
        q.submit([WorkItem([3]), WorkItem([4])])
    assert q.depth == 2
    q.submit([WorkItem([3])])
    assert q.depth == 3


def test_next_batch_follows_the_plan_and_keeps_the_rest():
    q = BatchQueue(10, Limits(5, 10))
    items = [WorkItem([0] * n) for n in (2, 2, 2, 1)]
    q.submit(items)
    assert q.next_batch() == items[:2]
    assert q.next_batch() == items[2:]
    assert q.next_batch(timeout=0.01) == []


def test_dp_queue_runs_the_urgent_request_first_and_refines_its_model():
    clock = [10.0]
    cost = CostModel.linear(0.01, 0.001)
    q = BatchQueue(100, Limits(400, 8), PolicyConfig("dp"), cost, clock=lambda: clock[0])
    relaxed = [WorkItem([0] * 200, enqueued_at=10.0, deadline=20.0) for _ in range(2)]
    urgent = WorkItem([0] * 10, enqueued_at=10.0, deadline=10.05)
    q.submit([*relaxed, urgent])
    assert q.next_batch()[0] is urgent
    rec = Recorder()
    worker = BatchWorker(q, SumRunner(), rec)
    worker.start()
    assert [it.future.result(5) for it in relaxed] == [0, 0]
    q.close()
    worker.join(5)
    assert cost.observations == 1  # the worker refined the model from the batch it ran


def test_worker_resolves_every_item_and_drains_on_close():
    q, rec = BatchQueue(100, Limits(6, 3)), Recorder()
    worker = BatchWorker(q, SumRunner(), rec)
    items = [WorkItem([i, 1]) for i in range(10)]
    q.submit(items)
    worker.start()
    assert [it.future.result(5) for it in items] == [i + 1 for i in range(10)]
    q.close()
    worker.join(5)
    assert not worker.alive
    assert all(len(b) <= 3 for b in rec.batches)
    with pytest.raises(NotReady):
        q.submit([WorkItem([1])])


def test_a_failing_batch_fails_only_its_items():
    q, rec = BatchQueue(100, Limits(2, 1)), Recorder()
    worker = BatchWorker(q, SumRunner(fail_on=7), rec)
    good, bad, after = WorkItem([1]), WorkItem([7]), WorkItem([2])
    q.submit([good, bad, after])
    worker.start()
    assert good.future.result(5) == 1
    with pytest.raises(BackendError):
        bad.future.result(5)
    assert after.future.result(5) == 2
    assert worker.alive and rec.failed == 1
    q.close()
    worker.join(5)


def test_cancelled_items_are_dropped_before_compute():
    q, rec = BatchQueue(100, Limits(100, 10)), Recorder()
    runner = SumRunner()
    worker = BatchWorker(q, runner, rec)
    keep, drop = WorkItem([4]), WorkItem([5])
    q.submit([keep, drop])
    assert drop.future.cancel()
    worker.start()
    assert keep.future.result(5) == 4
    q.close()
    worker.join(5)
    assert rec.dropped_by == {DISCONNECT: 1} and rec.batches == [[[4]]]


def test_expired_items_fail_with_deadline_exceeded_and_are_never_computed():
    clock = [100.0]
    q, rec = BatchQueue(100, Limits(100, 10), clock=lambda: clock[0]), Recorder()
    runner = SumRunner()
    worker = BatchWorker(q, runner, rec, clock=lambda: clock[0])
    fresh = WorkItem([3], enqueued_at=99.0, expires_at=101.0)
    stale = [WorkItem([7], enqueued_at=99.0, expires_at=100.0), WorkItem([8], enqueued_at=99.0, expires_at=99.5)]
    given_up = WorkItem([9], enqueued_at=99.0, expires_at=101.0)
    given_up.drop_reason = DEADLINE  # as the engine marks it before cancelling on its own timeout
    q.submit([fresh, *stale, given_up])
    assert given_up.future.cancel()  # nobody cancelled the stale ones: the worker must notice the clock alone
    worker.start()
    assert fresh.future.result(5) == 3
    for it in stale:
        with pytest.raises(DeadlineExceeded):
            it.future.result(5)
    q.close()
    worker.join(5)
    assert rec.dropped_by == {DEADLINE: 3} and rec.batches == [[[3]]]


def test_an_item_that_expires_between_planning_and_admission_is_not_computed():
    clock = [0.0]
    q, rec = BatchQueue(100, Limits(100, 10), clock=lambda: clock[0]), Recorder()
    worker = BatchWorker(q, SumRunner(), rec, clock=lambda: clock[0] + 1.0)  # admission sees a later instant
    item = WorkItem([5], enqueued_at=0.0, expires_at=0.5)
    q.submit([item])
    worker.start()
    with pytest.raises(DeadlineExceeded):
        item.future.result(5)
    q.close()
    worker.join(5)
    assert rec.dropped_by == {DEADLINE: 1} and rec.batches == []


def test_withdraw_frees_room_at_once_and_never_hands_an_item_out_twice():
    q = BatchQueue(2, Limits(100, 10))
    a, b = WorkItem([1]), WorkItem([2])
    q.submit([a, b])
    with pytest.raises(Overloaded):
        q.check_room(1)
    assert q.withdraw([a, WorkItem([3])]) == [a]  # one not queued is ignored
    q.check_room(1)
    q.submit([WorkItem([4])])
    assert [it.ids for it in q.next_batch()] == [[2], [4]]
    assert q.withdraw([b]) == []  # already taken by the worker: not withdrawn (the worker counts it)
    assert q.depth == 0


def test_check_room_counts_the_whole_request():
    q = BatchQueue(3, Limits(100, 10))
    q.submit([WorkItem([1])])
    q.check_room(2)
    with pytest.raises(Overloaded):
        q.check_room(3)


class OutOfMemoryError(RuntimeError):
    """Named like torch.cuda.OutOfMemoryError, which the worker recognises by name."""


class TightRunner(SumRunner):
    """Runs out of memory on any batch above `fits` tokens; a `poison` sequence fails on its own."""

    def __init__(self, fits, poison=None):
        super().__init__()
        self.fits, self.poison, self.calls = fits, poison, []

    def embed(self, sequences):
        self.calls.append(len(sequences))
        if sum(len(s) for s in sequences) > self.fits:
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if self.poison is not None and [self.poison] in sequences:
            raise ValueError("bad input")
        return [sum(s) for s in sequences]


def test_out_of_memory_splits_the_batch_and_every_request_succeeds():
    q, rec = BatchQueue(100, Limits(1000, 8)), Recorder()
    runner = TightRunner(fits=2)
    worker = BatchWorker(q, runner, rec)
    items = [WorkItem([i]) for i in range(8)]
    q.submit(items)
    worker.start()
    assert [it.future.result(5) for it in items] == list(range(8))
    assert runner.calls == [8, 4, 2, 2, 4, 2, 2] and rec.splits == [8, 4, 4] and rec.failed == 0
    assert sorted(x for b in rec.batches for x in b) == [[i] for i in range(8)]
    q.close()
    worker.join(5)


def test_split_halves_fail_alone_and_a_lone_sequence_that_never_fits_fails_cleanly():
    q, rec = BatchQueue(100, Limits(1000, 8)), Recorder()
    worker = BatchWorker(q, TightRunner(fits=1, poison=5), rec)  # split down to single sequences
    items = [WorkItem([i]) for i in range(4)] + [WorkItem([5]), WorkItem([6])] + [WorkItem([9] * 4)]
    q.submit(items)
    worker.start()
    assert [it.future.result(5) for it in items[:4] + [items[5]]] == [0, 1, 2, 3, 6]
    for it in (items[4], items[6]):  # the poisoned sequence, and the one too long to ever fit
        with pytest.raises(BackendError):
            it.future.result(5)
    assert worker.alive and rec.failed == 2
    q.submit([WorkItem([1, 1])])  # the worker keeps serving
    q.close()
    worker.join(5)


def test_submit_without_wake_leaves_an_idle_worker_asleep_until_wake():
    """The event loop admits a burst with wake=False and wakes the worker once: it plans all of it."""
    q = BatchQueue(100, Limits(1000, 64), PolicyConfig("token_budget"))
    got = []
    waiting = threading.Thread(target=lambda: got.append(q.next_batch(timeout=5)))
    waiting.start()
    q.submit([WorkItem([1])], wake=False)
    waiting.join(0.3)
    assert waiting.is_alive() and not got  # admitted, but the worker was not told
    q.submit([WorkItem([2]), WorkItem([3])], wake=False)
    q.wake()
    waiting.join(5)
    assert [it.ids for it in got[0]] == [[1], [2], [3]]  # one batch for the whole burst
    # A worker coming back for its next batch takes what is pending without being woken.
    q.submit([WorkItem([4])], wake=False)
    assert [it.ids for it in q.next_batch(timeout=0.01)] == [[4]]


class TokenRunner:
    """Pooled: the sum of the ids; per token: the ids themselves. Records the flags it was given."""

    def __init__(self):
        self.calls = []

    def embed(self, sequences, per_token=None):
        self.calls.append(per_token)
        return [list(s) if per_token and per_token[i] else sum(s) for i, s in enumerate(sequences)]


def test_per_token_and_pooled_items_share_a_batch_and_each_gets_its_own_answer():
    q, rec, runner = BatchQueue(100, Limits(100, 8)), Recorder(), TokenRunner()
    pooled, tokens = WorkItem([1, 2, 3]), WorkItem([4, 5], per_token=True)
    q.submit([pooled, tokens, WorkItem([6])])
    worker = BatchWorker(q, runner, rec)
    worker.start()
    assert pooled.future.result(5) == 6 and tokens.future.result(5) == [4, 5]
    assert runner.calls == [[False, True, False]]
    q.submit([WorkItem([7])])  # no item asks for tokens: the runner is called as before, without flags
    q.close()
    worker.join(5)
    assert runner.calls[1:] == [None]


def test_stop_waiting_releases_a_batch_held_for_a_fuller_one():
    # fifo holds a short batch up to max_queue_delay for more arrivals; once the server drains, none will come.
    q = BatchQueue(100, Limits(1000, 64), PolicyConfig("fifo", fixed_batch_size=64, max_queue_delay=30.0))
    q.submit([WorkItem([1, 2]), WorkItem([3])])
    taken: list = []
    waiter = threading.Thread(target=lambda: taken.append(q.next_batch()))
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive() and not taken  # held back for a fuller batch
    q.stop_waiting()
    waiter.join(5)
    assert [len(b) for b in taken] == [2]
    q.submit([WorkItem([4])])
    assert len(q.next_batch(timeout=5)) == 1  # and every later batch goes at once too


def test_the_queue_hands_each_items_client_request_to_the_planner():
    # tests/scheduler/test_shed.py's instance: client request 1 (7 + 12 tokens, due at 9 s) is late however it
    # runs; planned as whole requests, request 0 (due at 13 s) runs first and makes it.
    clock = [0.0]
    q = BatchQueue(10, Limits(16, 2), PolicyConfig("dp"), CostModel.linear(0.0, 1.0), clock=lambda: clock[0])
    first = WorkItem([0] * 9, enqueued_at=0.0, deadline=13.0, group=0)
    q.submit([first, WorkItem([0] * 7, enqueued_at=0.0, deadline=9.0, group=1),
              WorkItem([0] * 12, enqueued_at=0.0, deadline=9.0, group=1)])
    assert q.next_batch() == [first]


def test_a_split_batch_does_not_compute_the_rest_of_a_request_that_failed_in_its_first_half():
    """Out of memory splits a batch; when one half fails a client request, that request's sequences in the other halves
    are failed with it (counted as dropped: failed), never computed, as its sequences still queued are."""
    q, rec = BatchQueue(100, Limits(1000, 8)), Recorder()
    runner = TightRunner(fits=1, poison=5)  # split down to single sequences; [5] fails on its own
    worker = BatchWorker(q, runner, rec)
    request = [WorkItem([5], group=3)] + [WorkItem([i], group=3) for i in (1, 2, 3)]
    other = [WorkItem([4], group=4), WorkItem([6])]
    q.submit([request[0], request[1], other[0], request[2], request[3], other[1]])
    worker.start()
    assert [it.future.result(5) for it in other] == [4, 6]
    for it in request:
        with pytest.raises(BackendError):
            it.future.result(5)
    assert sorted(x for b in rec.batches for x in b) == [[4], [6]]  # nothing of the failed request was computed
    assert rec.failed == 1 and rec.dropped_by == {"failed": 3}
    q.close()
    worker.join(5)


def test_the_queue_tells_the_planner_how_fast_sequences_arrived_and_how_long_it_planned(monkeypatch):
    import scheduler.queue as queue_module  # noqa: PLC0415

    seen, planned = [], []
    real_plan = queue_module.plan

    def spy(*args, **kwargs):
        seen.append(kwargs["arrival_rate"])
        return real_plan(*args, **kwargs)

    monkeypatch.setattr(queue_module, "plan", spy)
    clock = [100.0]
    q = BatchQueue(50, Limits(100, 4), clock=lambda: clock[0], on_plan=lambda n, s: planned.append((n, s)))
    q.submit([WorkItem([1]) for _ in range(3)])  # at 100.0
    clock[0] = 101.0
    q.submit([WorkItem([1]) for _ in range(5)])  # at 101.0
    q.next_batch()
    clock[0] = 102.5  # the first three are more than 2 s old now
    q.next_batch()
    assert seen == [8 / 2.0, 5 / 2.0]
    assert [n for n, _ in planned] == [8, 4] and all(s >= 0 for _, s in planned)
