"""answer_after_plan: the worker hands out a batch's answers once the next batch is chosen, never later than when it
would wait (queue and worker, plain threads, a fake runner)."""

from __future__ import annotations

import time

import pytest

from scheduler.planner import Limits, PolicyConfig
from scheduler.queue import BatchQueue, WorkItem
from scheduler.worker import BatchWorker
from tests.scheduler.test_queue_worker import Recorder, SumRunner


@pytest.mark.parametrize("after", [False, True])
def test_the_answers_wait_for_the_next_plan_only_when_asked(after):
    items = [WorkItem([i, 1]) for i in range(4)]
    seen = []  # at each plan: were the first batch's answers out?
    q = BatchQueue(100, Limits(100, 2), PolicyConfig("token_budget", answer_after_plan=after),
                   on_plan=lambda count, seconds: seen.append([it.future.done() for it in items[:2]]))
    q.submit(items)
    worker = BatchWorker(q, SumRunner(), Recorder())
    worker.start()
    assert [it.future.result(5) for it in items] == [i + 1 for i in range(4)]
    q.close()
    worker.join(5)
    assert seen[0] == [False, False]
    assert seen[1] == ([False, False] if after else [True, True])  # planning the second batch


def test_answers_are_not_held_while_the_worker_waits_for_work():
    q = BatchQueue(100, Limits(100, 8), PolicyConfig("token_budget", answer_after_plan=True))
    worker = BatchWorker(q, SumRunner(), Recorder())
    worker.start()
    lone = WorkItem([2, 3])
    q.submit([lone])
    assert lone.future.result(5) == 5  # nothing else pending: answered before the worker sleeps
    q.close()
    worker.join(5)


def test_answers_are_not_held_while_the_policy_waits_for_a_fuller_batch():
    q = BatchQueue(100, Limits(100, 4), PolicyConfig("fifo", fixed_batch_size=4, max_queue_delay=3.0, answer_after_plan=True))
    runner = SumRunner()
    runner.gate.clear()  # the first batch runs until the gate opens
    worker = BatchWorker(q, runner, Recorder())
    first = [WorkItem([i]) for i in range(4)]
    q.submit(first)
    worker.start()
    while q.depth:  # the worker took the first batch
        time.sleep(0.001)
    extra = WorkItem([7])
    q.submit([extra])  # pending when the first batch ends: fifo holds it up to 3 s for three more
    started = time.perf_counter()
    runner.gate.set()
    assert [it.future.result(5) for it in first] == [0, 1, 2, 3]
    assert time.perf_counter() - started < 1.5  # answered before the wait, not after it
    assert not extra.future.done()
    q.stop_waiting()
    assert extra.future.result(5) == 7
    q.close()
    worker.join(5)
