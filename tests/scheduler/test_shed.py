"""dp under overload: Moore-Hodgson's rule puts the requests that would make the most others late behind."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.cost_model import CostModel
from scheduler.planner import Limits, PolicyConfig, Request, plan
from scheduler.shed import client_requests, shed_for_deadlines, shed_overload


def on_time(kept: list[int], shares: np.ndarray, deadlines: np.ndarray, start: float) -> bool:
    """Do these requests, run one after another in deadline order from `start`, all meet their deadlines?"""
    t = start
    for i in sorted(kept, key=lambda i: deadlines[i]):
        t += shares[i]
        if t > deadlines[i] + 1e-9:
            return False
    return True


def test_the_longest_so_far_goes():
    # Shares 2, 2, 3 due at 3, 4, 5: the third ends at 7; dropping it (the longest) lets the others make it.
    shares, deadlines = np.array([2.0, 2.0, 3.0]), np.array([3.0, 4.0, 5.0])
    assert shed_for_deadlines(np.arange(3), shares, deadlines, 0.0).tolist() == [2]
    # Nothing late: nothing dropped.
    assert shed_for_deadlines(np.arange(3), shares, np.array([3.0, 5.0, 8.0]), 0.0).size == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 20), st.integers(1, 60)), min_size=1, max_size=8), st.integers(0, 5))
def test_the_fewest_are_dropped_and_the_rest_make_it(jobs, start):
    shares = np.array([float(p) for p, _ in jobs])
    deadlines = np.array([float(d) for _, d in jobs])
    members = np.arange(len(jobs))
    dropped = shed_for_deadlines(members, shares, deadlines, float(start)).tolist()
    kept = [i for i in members.tolist() if i not in dropped]
    assert len(set(dropped)) == len(dropped)
    assert on_time(kept, shares, deadlines, float(start))
    # Brute force: no larger set of requests can all be on time.
    best = max(k for k in range(len(jobs) + 1)
               if any(on_time(list(c), shares, deadlines, float(start)) for c in itertools.combinations(members.tolist(), k)))
    assert len(kept) == best


def test_only_the_horizon_is_considered():
    shares, deadlines = np.array([5.0, 1.0, 1.0, 1.0]), np.array([1.0, 2.0, 3.0, 4.0])
    assert shed_for_deadlines(np.arange(4), shares, deadlines, 0.0, horizon=1).tolist() == [0]
    assert shed_for_deadlines(np.arange(4), shares, deadlines, 0.0, horizon=4).tolist() == [0]


def test_under_overload_dp_plans_more_requests_in_time_with_shedding():
    # Everything due in 0.5 s; 6 long inputs would take most of it, 30 short ones fit easily. Deadline order
    # would run long inputs first (they are due a little earlier); shedding puts them behind.
    cost = CostModel.linear(0.01, 0.0005, 0.0, 0.0002)
    requests = [Request(256, 0.0, 0.45 + 0.001 * i) for i in range(6)] + [Request(16, 0.0, 0.5) for _ in range(30)]
    limits = Limits(4096, 8)
    shed = plan(requests, limits, cost, 0.0, PolicyConfig("dp"))
    kept_all = plan(requests, limits, cost, 0.0, PolicyConfig("dp", shed_longest=False))
    assert len(shed.late) < len(kept_all.late)
    assert all(requests[i].length == 256 for i in shed.late)  # what goes late is long
    assert sorted(i for b in shed.batches for i in b.indices) == list(range(36))  # still planned, not dropped


def test_the_setting_reaches_the_planner(monkeypatch):
    from configs.settings import SchedulerSettings  # noqa: PLC0415
    from server.engine import policy_config  # noqa: PLC0415

    assert policy_config(SchedulerSettings()).shed_longest is True
    monkeypatch.setenv("TURBOSERVE_SCHEDULER__SHED_LONGEST", "false")
    from configs.settings import Settings  # noqa: PLC0415

    assert policy_config(Settings().scheduler).shed_longest is False


def test_the_model_overrun_tracks_how_late_batches_run():
    cost = CostModel.linear(0.01, 0.0005, 0.0, 0.0)
    assert cost.pessimism() == 1.0  # as profiled
    exact = CostModel.linear(0.01, 0.0005, 0.0, 0.0)
    for _ in range(200):
        exact.observe([32] * 4, exact.predict_lengths([32] * 4))  # on time: stays near 1
        predicted = cost.predict_lengths([32] * 4)
        cost.observe([32] * 4, 3.0 * predicted)  # every batch 3x the prediction, before the model learns it
    assert exact.pessimism() < 1.05
    assert cost.pessimism() > 1.5  # the knots learn the 3x; the quantile saw the early overruns
    assert cost.summary()["overrun_p90_ratio"] == round(cost.pessimism(), 4)
    assert "overrun" not in cost.to_json()  # this run's conditions, not the runtime's: not saved


def test_a_model_whose_batches_overrun_sheds_sooner():
    # 35 short and 5 long requests, the long ones due a little earlier: 0.18 s of work in full batches for
    # 0.3 s of time, so an exact model keeps all and runs the long ones first (deadline order). With shed_margin 1,
    # a model whose batches have run 2x late, all of them at once (margin_averaging 0: 0.35 s, not all can make it),
    # sheds long ones behind every short one. Averaged over the ~5 full batches (0.056 s) the slack holds, 2x a batch
    # is 1.43x for them all (0.26 s): all can make it, none is shed; 4x a batch (2.3x: 0.41 s) sheds again. With
    # shed_margin 0 (the default) shedding judges the predictions: none is shed at 2x.
    requests = [Request(200, 0.0, 0.29) if i % 8 == 0 else Request(64, 0.0, 0.3) for i in range(40)]
    limits = Limits(4096, 16)

    def batches(overrun: float, config: PolicyConfig):
        cost = CostModel.linear(0.005, 0.00005, 0.0, 0.0)
        cost.overrun = float(np.log(overrun))
        p = plan(requests, limits, cost, 0.0, config)
        assert sorted(i for b in p.batches for i in b.indices) == list(range(40))  # all planned, none dropped
        return [[requests[i].length for i in b.indices] for b in p.batches]

    whole, averaged = PolicyConfig("dp", shed_margin=1.0), PolicyConfig("dp", shed_margin=1.0, margin_averaging=0.5)
    exact = batches(1.0, PolicyConfig("dp"))
    assert exact[0].count(200) == 5  # first, in time
    for overrun, config in ((2.0, whole), (4.0, averaged)):
        shed = batches(overrun, config)
        assert set(shed[-1]) == {200} and shed[0].count(200) < 5, overrun  # some long ones run after every short one
    assert batches(2.0, averaged)[0].count(200) == 5
    assert batches(2.0, PolicyConfig("dp"))[0].count(200) == 5


def test_an_overdue_request_runs_first_even_while_shedding():
    # Overload: 40 fresh requests, all due in 0.3 s, far more than fit. One old request is late_grace SLOs
    # past its deadline: it must not starve behind the stream of fresh ones (neither shed nor left out).
    cost = CostModel.linear(0.01, 0.0005, 0.0, 0.0002)
    fresh = [Request(64, 0.0, 0.3) for _ in range(40)]
    old = Request(200, -10.0, -9.0)  # SLO 1 s, 9 s past its deadline
    limits = Limits(4096, 16)
    overdue = plan([*fresh, old], limits, cost, 0.0, PolicyConfig("dp", late_grace=4.0))
    assert 40 in overdue.batches[0].indices
    assert len(overdue.late) > 1  # the overload is real: others are planned late too
    within_grace = plan([*fresh, old], limits, cost, 0.0, PolicyConfig("dp", late_grace=20.0))
    assert 40 not in within_grace.batches[0].indices  # still in its grace: behind the ones that can make it


# A client request of several inputs is answered once all of them are: its sequences are shed together.

def late_requests(decided, requests) -> set[int]:
    return {requests[i].group for i in decided.late}


def test_a_client_request_that_cannot_make_it_whole_goes_behind():
    # A batch costs 1 s a token. Client request 1 is a 7- and a 12-token input due at 9 s: 19 s of work, late
    # however it runs. Request 0 (9 tokens, due at 13 s) makes it if it runs first. Planned one sequence at a
    # time, request 1's 7-token input runs first (in time) and pushes both requests late.
    cost, limits = CostModel.linear(0.0, 1.0), Limits(16, 2)
    requests = [Request(9, 0.0, 13.0, group=0), Request(7, 0.0, 9.0, group=1), Request(12, 0.0, 9.0, group=1)]
    assert late_requests(plan(requests, limits, cost, 0.0, PolicyConfig("dp")), requests) == {1}
    singles = [Request(r.length, r.arrival, r.deadline) for r in requests]
    assert late_requests(plan(singles, limits, cost, 0.0, PolicyConfig("dp")), requests) == {0, 1}


def test_keeping_requests_whole_leaves_fewer_late_on_random_instances():
    rng = np.random.default_rng(1)
    grouped_late = singles_late = 0
    for _ in range(300):
        cost, limits = CostModel.linear(float(rng.choice([0.0, 1.0, 2.0])), 1.0), Limits(int(rng.choice([16, 64])), int(rng.choice([2, 4, 8])))
        requests = [Request(int(rng.integers(1, 13)), 0.0, float(due), group=g)
                    for g, due in enumerate(rng.integers(5, 41, rng.integers(2, 5))) for _ in range(rng.integers(1, 4))]
        singles = [Request(r.length, r.arrival, r.deadline) for r in requests]
        grouped_late += len(late_requests(plan(requests, limits, cost, 0.0, PolicyConfig("dp")), requests))
        singles_late += len(late_requests(plan(singles, limits, cost, 0.0, PolicyConfig("dp")), requests))
    assert grouped_late < 0.9 * singles_late  # 344 against 410 with this seed


def test_groups_of_one_shed_exactly_as_without_groups():
    rng = np.random.default_rng(3)
    shares, deadlines = rng.uniform(1, 5, 40), rng.uniform(5, 60, 40)
    excluded, priorities = np.zeros(40, dtype=bool), rng.integers(0, 2, 40)
    plain = shed_overload(deadlines, 0.0, excluded, priorities, shares, 256)
    grouped = shed_overload(deadlines, 0.0, excluded, priorities, shares, 256, np.arange(40))
    assert plain.any() and (plain == grouped).all()


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(1, 20), st.integers(1, 80)), min_size=1, max_size=14),
       st.integers(0, 5))
def test_grouped_shedding_drops_whole_requests_and_the_rest_make_it(seqs, start):
    # seqs: (client request, share, deadline); a client request's deadline is that of its first sequence.
    due = {}
    for g, _, d in seqs:
        due.setdefault(g, float(d))
    groups = np.array([g for g, _, _ in seqs])
    shares = np.array([float(p) for _, p, _ in seqs])
    deadlines = np.array([due[g] for g in groups])
    dropped = shed_overload(deadlines, float(start), np.zeros(len(seqs), dtype=bool), np.zeros(len(seqs), dtype=int),
                            shares, 256, groups)
    for g in set(groups.tolist()):
        assert len(set(dropped[groups == g].tolist())) == 1  # a request is kept or shed whole
    # What is kept, as whole requests run one after another in deadline order, is all on time.
    kept = sorted({g for g in groups[~dropped].tolist()}, key=due.get)
    t = float(start)
    for g in kept:
        t += shares[groups == g].sum()
        assert t <= due[g] + 1e-9


def test_client_requests_numbers_groups_and_keeps_singletons_apart():
    assert client_requests(np.array([-1, -1, -1])) is None
    assert client_requests(np.array([-1, 7, -1])) is None  # every sequence still a request of its own
    jobs = client_requests(np.array([7, -1, 7, 3, -1]))
    assert jobs[0] == jobs[2] and len({int(jobs[i]) for i in (0, 1, 3, 4)}) == 4


def test_a_client_request_late_as_a_whole_is_not_cut_to_run_a_few_of_its_sequences_in_time():
    """16 inputs of one request on a slow model: together they take 8.4 s against a 2 s SLO, 3 alone would make it.
    Running those 3 first only delays the answer (sent with the last sequence); one batch is the cheapest plan. Sixteen
    separate requests still get 3 of them in time."""
    cost = CostModel.linear(0.2, 0.004)
    limits = Limits(16384, 64)
    one_request = [Request(128, 0.0, 2.0, group=7) for _ in range(16)]
    got = plan(one_request, limits, cost, 0.0, PolicyConfig())
    assert [len(b.indices) for b in got.batches] == [16]
    assert got.cost == pytest.approx(plan([Request(128) for _ in range(16)], limits, cost, 0.0, PolicyConfig()).cost)
    separate = plan([Request(128, 0.0, 2.0) for _ in range(16)], limits, cost, 0.0, PolicyConfig())
    assert len(separate.batches[0].indices) == 3 and len(separate.late) == 13
