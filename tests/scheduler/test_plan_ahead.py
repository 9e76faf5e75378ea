"""plan_ahead: the next batch is planned while the current one runs (queue, worker and simulator)."""

from __future__ import annotations

import random
import threading

import pytest

from scheduler.cost_model import CostModel
from scheduler.planner import Limits, PolicyConfig
from scheduler.queue import BatchQueue, WorkItem
from scheduler.simulator import HostLoad, Trace, simulate
from scheduler.worker import BatchWorker
from tests.scheduler.test_queue_worker import Recorder, SumRunner


def queue(plan_ahead: bool, policy: str = "token_budget") -> BatchQueue:
    return BatchQueue(100, Limits(100, 3), PolicyConfig(policy, plan_ahead=plan_ahead), CostModel.linear(0.01, 0.001))


def items(count: int, first_deadline: float = 10.0) -> list[WorkItem]:
    return [WorkItem([1, 1], deadline=first_deadline + i) for i in range(count)]


@pytest.mark.parametrize("plan_ahead", [False, True])
def test_what_arrives_while_a_batch_runs_waits_for_the_plan_after(plan_ahead):
    q, first = queue(plan_ahead), items(4)
    q.submit(first)
    assert q.next_batch() == first[:3]
    late = WorkItem([1, 1], deadline=100.0)
    q.submit([late])
    if plan_ahead:  # planned from what was pending while first[:3] ran: the newcomer waits one batch
        assert q.next_batch() == [first[3]]
        assert q.next_batch() == [late]
        assert (q.ahead_used, q.ahead_dropped) == (2, 0)
    else:
        assert q.next_batch() == [first[3], late]
        assert (q.ahead_used, q.ahead_dropped) == (0, 0)


@pytest.mark.parametrize("urgent", [WorkItem([1, 1], deadline=5.0), WorkItem([1, 1], deadline=100.0, priority=1)],
                         ids=["earlier deadline", "higher priority"])
def test_a_more_urgent_arrival_has_the_batch_planned_again(urgent):
    q, first = queue(True), items(4)
    q.submit(first)
    assert q.next_batch() == first[:3]
    q.submit([urgent])
    assert urgent in q.next_batch()
    assert (q.ahead_used, q.ahead_dropped) == (0, 1)


def test_a_planned_batch_whose_requests_gave_up_is_planned_again():
    q, first = queue(True), items(4)
    q.submit(first)
    assert q.next_batch() == first[:3]
    late = WorkItem([1, 1], deadline=100.0)
    q.submit([late])
    assert q.withdraw([first[3]]) == [first[3]]
    assert q.next_batch() == [late]
    assert q.ahead_dropped == 1


@pytest.mark.parametrize("policy", ["dp", "token_budget", "fifo"])
def test_the_worker_answers_every_request_once_while_planning_ahead(policy):
    q, rec = queue(True, policy), Recorder()
    worker = BatchWorker(q, SumRunner(), rec)
    worker.start()
    rng = random.Random(3)
    submitted = []
    for _ in range(60):  # arrivals while batches run
        batch = [WorkItem([rng.randrange(9)] * rng.randint(1, 30), deadline=rng.uniform(0, 1e9)) for _ in range(rng.randint(1, 4))]
        q.submit(batch)
        submitted += batch
        threading.Event().wait(rng.uniform(0, 0.002))
    assert [it.future.result(10) for it in submitted] == [sum(it.ids) for it in submitted]
    q.close()
    worker.join(5)
    assert not worker.alive
    assert sum(len(b) for b in rec.batches) == len(submitted)  # each computed once
    assert all(len(b) <= 3 for b in rec.batches)
    assert q.ahead_used > 0


def test_the_simulator_hides_the_planning_time_of_a_plan_made_ahead():
    rng = random.Random(1)
    arrivals = sorted(rng.uniform(0, 2.0) for _ in range(400))  # far past capacity: batches back to back
    trace = Trace(arrivals, [rng.randint(8, 120) for _ in arrivals])
    cost, limits, host = CostModel.linear(0.002, 0.0001), Limits(2048, 16), HostLoad(per_batch=0.01)
    now = simulate(trace, PolicyConfig("dp"), limits, cost, 5.0, host=host)
    ahead = simulate(trace, PolicyConfig("dp", plan_ahead=True), limits, cost, 5.0, host=host)
    assert now.completed == ahead.completed == len(arrivals)
    # Each batch planned ahead starts as the one before ends, 10 ms sooner than one planned then.
    assert ahead.duration < now.duration - 0.005 * now.batches
    free = simulate(trace, PolicyConfig("dp", plan_ahead=True), limits, cost, 5.0)
    assert abs(free.duration - ahead.duration) < 0.01 * now.batches  # with no planning time, about the same work


def test_the_setting_reaches_the_planner(monkeypatch):
    from configs.settings import SchedulerSettings, Settings  # noqa: PLC0415
    from server.engine import policy_config  # noqa: PLC0415

    assert policy_config(SchedulerSettings()).plan_ahead is PolicyConfig().plan_ahead is False
    monkeypatch.setenv("TURBOSERVE_SCHEDULER__PLAN_AHEAD", "true")
    assert policy_config(Settings().scheduler).plan_ahead is True
