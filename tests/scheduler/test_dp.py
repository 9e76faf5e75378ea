"""The DP planner against brute force, and its guarantees: every request once, limits, deadlines."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from scheduler import recurrences
from scheduler.brute_force import deadlines_feasible, min_cost_any, min_cost_consecutive
from scheduler.cost_model import MAX_DRIFT, Cell, CostModel
from scheduler.planner import Limits, PolicyConfig, Request, evaluate, plan
from scheduler.profiler import cache_path, load_or_profile
from scheduler.recurrences import cost_dp

COSTS = st.builds(
    CostModel.linear,
    per_batch=st.floats(0.0, 0.05),
    per_token=st.floats(1e-6, 1e-3),
    per_sq_token=st.floats(0.0, 1e-5),
    per_sequence=st.floats(0.0, 1e-2),
)


@st.composite
def curved_costs(draw):
    """Fitted models whose correction factors bend the line (GEMM efficiency and the like)."""
    base = draw(COSTS)
    return CostModel(list(base.coef), [8.0, 64.0, 512.0, 4096.0], [draw(st.floats(0.5, 2.0)) for _ in range(4)])


LIMITS = st.builds(Limits, max_batch_tokens=st.integers(16, 600), max_batch_requests=st.integers(1, 8))


@settings(max_examples=150, deadline=None)
@given(lengths=st.lists(st.integers(1, 200), max_size=9), limits=LIMITS, cost=st.one_of(COSTS, curved_costs()))
def test_cost_dp_equals_brute_force_over_consecutive_splits(lengths, limits, cost):
    lengths = sorted(lengths)
    segments, total = cost_dp(lengths, limits, cost)
    assert [i for s, e in segments for i in range(s, e)] == list(range(len(lengths)))
    assert math.isclose(total, min_cost_consecutive(lengths, limits, cost), rel_tol=1e-9, abs_tol=1e-12)


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 200), max_size=7), cap=st.integers(1, 8), cost=COSTS)
def test_without_a_binding_token_budget_sorted_cuts_are_optimal(lengths, cap, cost):
    # With packed costs linear in (n, T, S2) and only a request cap, the sorted DP is the true optimum.
    limits = Limits(10**6, cap)
    _, total = cost_dp(sorted(lengths), limits, cost)
    assert math.isclose(total, min_cost_any(lengths, limits, cost), rel_tol=1e-9, abs_tol=1e-12)


def test_a_token_budget_breaks_sorted_cuts_and_packing_repairs_it():
    # Found by Hypothesis: sorted cuts need 3 batches, pairing 1+15 and 1+2 needs 2.
    lengths, limits, cost = [1, 1, 2, 15], Limits(16, 2), CostModel.linear(0.03, 0.001)
    _, sorted_cost = cost_dp(lengths, limits, cost)
    optimum = min_cost_any(lengths, limits, cost)
    assert sorted_cost > optimum
    assert plan([Request(n) for n in lengths], limits, cost, 0.0, PolicyConfig("dp")).cost == pytest.approx(optimum)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=st.lists(st.integers(1, 300), max_size=60), limits=LIMITS, cost=st.one_of(COSTS, curved_costs()))
def test_never_costs_more_than_a_baseline(lengths, limits, cost):
    requests = [Request(n) for n in lengths]
    ours = plan(requests, limits, cost, 0.0, PolicyConfig("dp")).cost
    for name in ("token_budget", "sort_slice"):
        assert ours <= plan(requests, limits, cost, 0.0, PolicyConfig(name)).cost * (1 + 1e-9) + 1e-12
    if len(cost.knots) == 1:  # flat efficiency: fewer, fuller batches never cost more
        for name in ("fifo", "triton"):
            config = PolicyConfig(name, fixed_batch_size=limits.max_batch_requests,
                                  preferred_batch_sizes=(limits.max_batch_requests,))
            assert ours <= plan(requests, limits, cost, 0.0, config).cost * (1 + 1e-9) + 1e-12


REQUESTS = st.lists(
    st.builds(Request, length=st.integers(1, 300), arrival=st.just(0.0),
              deadline=st.one_of(st.just(math.inf), st.floats(0.0, 3.0)), priority=st.integers(0, 1)),
    max_size=40)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests=REQUESTS, limits=LIMITS, cost=st.one_of(COSTS, curved_costs()))
def test_every_request_once_within_limits_and_priorities_first(requests, limits, cost):
    p = plan(requests, limits, cost, 0.0, PolicyConfig("dp"))
    flat = sorted(i for b in p.batches for i in b.indices)
    assert flat == list(range(len(requests)))
    for b in p.batches:
        assert len(b.indices) <= limits.max_batch_requests
        assert b.tokens == sum(requests[i].length for i in b.indices)
        assert b.tokens <= limits.max_batch_tokens or len(b.indices) == 1
    priorities = [max(requests[i].priority for i in b.indices) for b in p.batches]
    lowest_so_far = [min(requests[i].priority for i in b.indices) for b in p.batches]
    for earlier, later in zip(lowest_so_far, priorities[1:]):
        assert later <= earlier  # strict classes: a higher class never waits behind a lower one
    assert set(p.infeasible) <= set(p.late)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests=st.lists(st.builds(Request, length=st.integers(1, 100), arrival=st.just(0.0),
                                   deadline=st.floats(0.0, 0.5)), min_size=1, max_size=6),
       limits=st.builds(Limits, max_batch_tokens=st.integers(50, 300), max_batch_requests=st.integers(1, 4)),
       cost=COSTS, overrun=st.sampled_from([0.0, 0.1, 0.4, 1.0]))
def test_deadlines_met_whenever_a_feasible_plan_exists(requests, limits, cost, overrun):
    # overrun > 0: a model whose batches have run long lately, so dp plans its slack with a margin
    # (deadline_margin); where no plan keeps the margin, one that meets the deadlines themselves must still be found.
    # (Overload shedding is off there: it judges with the overrun on purpose, putting a request that a batch as slow
    # as the recent p90 would make late behind the others; tests/scheduler/test_shed.py covers it.)
    cost = CostModel.from_json(cost.to_json())
    cost.overrun = overrun
    p = plan(requests, limits, cost, 0.0, PolicyConfig("dp", shed_longest=overrun == 0.0))
    if deadlines_feasible(requests, limits, cost, 0.0):
        assert p.late == ()
    else:
        assert p.late  # and it says so


def test_edge_cases():
    cost = CostModel.linear(0.01, 0.001)
    limits = Limits(512, 8)
    assert plan([], limits, cost).batches == []
    one = plan([Request(10)], limits, cost)
    assert [b.indices for b in one.batches] == [(0,)]
    equal = plan([Request(16) for _ in range(20)], limits, cost)
    assert len(equal.batches) == 3  # 20 requests, 8 a batch: the fewest batches
    longest = plan([Request(512), Request(3)], limits, cost)
    assert sorted(len(b.indices) for b in longest.batches) == [1, 1]
    too_long = plan([Request(900)], limits, cost)  # over the budget alone: still planned, alone
    assert [b.indices for b in too_long.batches] == [(0,)]
    past = plan([Request(10, 0.0, -1.0), Request(20, 0.0, -2.0)], limits, cost, now=0.0)
    assert set(past.late) == set(past.infeasible) == {0, 1}
    assert sorted(i for b in past.batches for i in b.indices) == [0, 1]


def test_urgent_short_request_runs_before_a_cheaper_big_batch():
    cost = CostModel.linear(0.01, 0.001)
    limits = Limits(1000, 8)
    requests = [Request(200, 0.0, 10.0) for _ in range(4)] + [Request(10, 0.0, 0.05)]
    p = plan(requests, limits, cost, 0.0, PolicyConfig("dp"))
    assert p.late == ()
    assert 4 in p.batches[0].indices and p.batches[0].tokens < 400


def test_bounded_wait_only_when_it_pays_and_is_safe():
    # A large per-batch overhead makes a fuller batch much cheaper per token.
    cost = CostModel.linear(0.05, 0.0001)
    limits = Limits(4096, 32)
    config = PolicyConfig("dp", max_wait=0.02)
    busy = [Request(16, arrival=1.0, deadline=9.0), Request(16, arrival=1.001, deadline=9.0)]  # ~1000/s arriving
    assert plan(busy, limits, cost, 1.001, config).wait_until == pytest.approx(1.02)
    alone = plan([Request(16, arrival=1.0, deadline=9.0)], limits, cost, 1.001, config)
    assert alone.wait_until is None  # nothing suggests another arrival: run at once
    slow = [Request(16, arrival=1.0, deadline=9.0), Request(16, arrival=1.5, deadline=9.0)]  # 2/s: none expected
    assert plan(slow, limits, cost, 1.5, config).wait_until is None
    tight = [Request(16, arrival=1.0, deadline=1.06), Request(16, arrival=1.001, deadline=9.0)]
    p = plan(tight, limits, cost, 1.001, config)
    assert p.wait_until is None or p.wait_until <= 1.06 - p.cost
    full = plan([Request(16, arrival=1.0, deadline=9.0) for _ in range(32)], limits, cost, 1.001, config)
    assert full.wait_until is None
    flat = CostModel.linear(0.0, 0.001)  # no per-batch overhead: waiting buys nothing
    assert plan(busy, limits, flat, 1.001, config).wait_until is None


def test_cost_model_fit_predict_and_refine(tmp_path):
    truth = CostModel.linear(0.003, 2e-4, 1e-7, 1e-4)
    cells = [Cell(n, length, truth.predict_lengths([length] * n)) for n in (1, 2, 4, 8) for length in (8, 32, 128)]
    fitted = CostModel.fit(cells, {"model": "x"})
    for n, length in [(3, 50), (8, 128), (1, 8)]:
        assert fitted.predict_lengths([length] * n) == pytest.approx(truth.predict_lengths([length] * n), rel=1e-3)
    fitted.save(tmp_path / "c.json")
    again = CostModel.load(tmp_path / "c.json")
    assert again.key == {"model": "x"} and again.predict_lengths([10, 20]) == pytest.approx(fitted.predict_lengths([10, 20]))
    # The device got 30% slower: online refinement converges to it.
    lengths = [100] * 4
    for _ in range(40):
        error = again.observe(lengths, 1.3 * truth.predict_lengths(lengths))
    assert abs(error) < 0.02


def test_a_drifted_refinement_is_not_trusted_from_disk(tmp_path):
    # A busy host makes live batches slow; refinement follows it in memory, but a model that drifted
    # past MAX_DRIFT from its measurement must not become the next start's model.
    truth = CostModel.linear(0.003, 2e-4, 1e-7, 1e-4)
    cells = [Cell(n, length, truth.predict_lengths([length] * n)) for n in (1, 2, 4) for length in (8, 32)]
    key = {"model": "x"}
    model = CostModel.fit(cells, key)
    assert model.drift() == pytest.approx(1.0)
    for _ in range(60):
        model.observe([32] * 2, 5 * truth.predict_lengths([32] * 2))
    assert model.drift() > MAX_DRIFT
    model.save(cache_path(tmp_path, key))

    def never(lengths):
        raise AssertionError("a saved model exists: nothing should be measured")

    loaded, from_cache = load_or_profile(never, key, tmp_path, [(1, 8)])
    assert from_cache and loaded.drift() == pytest.approx(1.0)
    assert loaded.predict_lengths([32, 32]) == pytest.approx(truth.predict_lengths([32, 32]), rel=0.05)


def test_a_knot_inflated_by_a_slow_spell_returns_when_other_sizes_are_observed():
    # A slow spell made large batches look 30x slower; afterwards only small batches run (the planner avoids the
    # sizes it thinks slow), so the large knot is never observed again: it must not stay inflated for good.
    truth = CostModel.linear(0.003, 2e-4, 1e-7, 1e-4)
    cells = [Cell(n, length, truth.predict_lengths([length] * n)) for n in (1, 4, 16) for length in (8, 128)]
    model = CostModel.fit(cells)
    large, small = [128] * 16, [8]
    before = model.predict_lengths(large)
    for _ in range(30):
        model.observe(large, 30 * truth.predict_lengths(large))
    assert model.predict_lengths(large) > 10 * before
    for _ in range(1000):
        model.observe(small, truth.predict_lengths(small))
    assert model.predict_lengths(large) == pytest.approx(before, rel=0.1)
    assert model.predict_lengths(small) == pytest.approx(truth.predict_lengths(small), rel=0.02)
    # the observed knots themselves are not pulled away from what is measured
    steady = CostModel.fit(cells)
    for _ in range(200):
        steady.observe(large, 2 * truth.predict_lengths(large))
    assert steady.predict_lengths(large) == pytest.approx(2 * truth.predict_lengths(large), rel=0.02)


@settings(max_examples=150, deadline=None)
@given(lengths=st.lists(st.integers(1, 400), max_size=120), limits=LIMITS, cost=st.one_of(COSTS, curved_costs()))
def test_cost_dp_relaxation_equals_the_row_by_row_recurrence(lengths, limits, cost):
    # Relaxing every row at once must settle on the recurrence's own values and argmins, bit for bit.
    lengths = sorted(lengths)
    relaxed = cost_dp(lengths, limits, cost)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(recurrences, "RELAX_MAX_BATCHES", 0)  # never relax: row by row
        assert cost_dp(lengths, limits, cost) == relaxed


def deadline_dp_reference(lengths, deadlines, limits, cost, start_time, late_cost=math.inf):
    """The EDF DP written plainly: every state, every last batch or leaving the last request out, late ones
    counted one by one. Returns (batches, positions left out)."""
    n = len(lengths)
    weight = min(late_cost, 1e7)
    late, finish, choice, dropped = [0] * (n + 1), [0.0] * (n + 1), [0] * (n + 1), [0] * (n + 1)

    def seconds(batch):
        return float(cost.predict(len(batch), float(sum(batch)), float(sum(x * x for x in batch))))

    for i in range(1, n + 1):
        best = None
        for k in range(min(limits.max_batch_requests, i)):  # last batch: j .. i-1
            j = i - 1 - k
            batch = lengths[j:i]
            if k and sum(batch) > limits.max_batch_tokens:
                continue
            t = finish[j] + seconds(batch)
            score = late[j] + sum(deadlines[x] - start_time < t for x in range(j, i))
            key = score * weight + t
            if best is None or key < best[0]:
                best = (key, score, t, k, 0, j)
        key, score, t, k, _, j = best
        first_late = score - late[j]  # in deadline order, the late members come first: leave them out
        if first_late:
            trimmed = finish[j] + (seconds(lengths[j + first_late:i]) if first_late <= k else 0.0)
            if trimmed <= t:
                best = (score * weight + trimmed, score, trimmed, k - first_late, first_late, j)
        if (late[i - 1] + 1) * weight + finish[i - 1] < best[0]:  # leave request i-1 out: late, no time
            best = (None, late[i - 1] + 1, finish[i - 1], -1, 1, i - 1)
        _, late[i], finish[i], choice[i], dropped[i], _ = best
    return recurrences._walk_back(choice, n, dropped)


@settings(max_examples=150, deadline=None)
@given(jobs=st.lists(st.tuples(st.integers(1, 300), st.floats(0.0, 2.0)), max_size=40), limits=LIMITS,
       cost=st.one_of(COSTS, curved_costs()), start=st.sampled_from([0.0, 0.25, 1000.0]),
       late_cost=st.sampled_from([math.inf, 0.5, 0.01]))
def test_deadline_dp_equals_the_plain_recurrence(jobs, limits, cost, start, late_cost):
    jobs.sort(key=lambda j: j[1])
    lengths, deadlines = [n for n, _ in jobs], [start + d for _, d in jobs]
    got = recurrences.deadline_dp(lengths, deadlines, limits, cost, start, late_cost)
    assert got == deadline_dp_reference(lengths, deadlines, limits, cost, start, late_cost)


@settings(max_examples=150, deadline=None)
@given(jobs=st.lists(st.tuples(st.integers(1, 300), st.floats(0.0, 1.0)), max_size=40), limits=LIMITS, cost=COSTS,
       late_cost=st.sampled_from([math.inf, 0.05]))
# Found by Hypothesis: the best plan of the first request ran it alone, in time, so a batch of all three
# (the first one late) beat running the other two after it; the late member is now left out of the batch.
@example(jobs=[(1, 0.046875), (1, 0.0625), (1, 1.0)], limits=Limits(16, 3),
         cost=CostModel([0.03125, 0.0078125, 0.001, 0.0], [1.0], [1.0]), late_cost=math.inf)
def test_deadline_dp_runs_no_request_late(jobs, limits, cost, late_cost):
    # With a cost that grows with every member, a batch whose first members would be late is beaten by leaving
    # them out: what the DP runs is in time, what it cannot serve in time it leaves out; each request once.
    jobs.sort(key=lambda j: j[1])
    lengths, deadlines = [n for n, _ in jobs], [d for _, d in jobs]
    segments, left_out = recurrences.deadline_dp(lengths, deadlines, limits, cost, 0.0, late_cost)
    assert sorted([i for s, e in segments for i in range(s, e)] + left_out) == list(range(len(jobs)))
    t = 0.0
    for s, e in segments:
        batch = lengths[s:e]
        t += float(cost.predict(len(batch), float(sum(batch)), float(sum(x * x for x in batch))))
        assert all(deadlines[i] >= t - 1e-9 for i in range(s, e))


def test_deadline_dp_leaves_out_what_it_cannot_serve_in_time():
    # The first request is due before any batch could end: without leaving it out the DP had to run it
    # (late) in the first batch, delaying the two behind it past their deadlines too.
    cost = CostModel([0.1, 0.0, 0.0, 0.0], [1.0], [1.0])  # 0.1 s a batch, whatever is in it
    limits = Limits(max_batch_tokens=1000, max_batch_requests=1)
    segments, left_out = recurrences.deadline_dp([10, 10, 10], [0.05, 0.1, 0.2], limits, cost, 0.0)
    assert left_out == [0] and segments == [(1, 2), (2, 3)]


def test_a_finite_late_cost_trades_a_late_request_for_a_fuller_batch():
    # 0.09 s a batch + 0.01 s a request. Lexicographic: the urgent one alone, then the other two: none late,
    # 0.21 s. At 0.06 s a late request, leaving the urgent one out and running one batch of two (0.06 +
    # 0.11 s) beats it, and beats leaving all three out (0.18 s).
    cost = CostModel([0.09, 0.01, 0.0, 0.0], [1.0], [1.0])
    limits = Limits(max_batch_tokens=1000, max_batch_requests=3)
    due = [0.1, 0.3, 0.3]
    assert recurrences.deadline_dp([10, 10, 10], due, limits, cost, 0.0) == ([(0, 1), (1, 3)], [])
    assert recurrences.deadline_dp([10, 10, 10], due, limits, cost, 0.0, late_cost=0.06) == ([(1, 3)], [0])


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests=REQUESTS, limits=LIMITS, cost=COSTS, now=st.sampled_from([0.0, 1.5]))
def test_plan_reports_what_evaluate_predicts(requests, limits, cost, now):
    # dp prices and checks its plan vectorised; it must report what the shared evaluate() would.
    p = plan(requests, limits, cost, now, PolicyConfig("dp"))
    again = evaluate(p.batches, requests, cost, now)
    assert (p.cost, p.late, p.infeasible) == (again.cost, again.late, again.infeasible)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(requests=st.lists(st.builds(Request, length=st.integers(1, 300), arrival=st.just(0.0),
                                   deadline=st.one_of(st.just(math.inf), st.floats(0.0, 20.0)),
                                   priority=st.integers(0, 1)), min_size=257, max_size=700),
       cap=st.sampled_from([4, 16, 64]))
def test_past_the_horizon_every_request_once_within_limits(requests, cap):
    limits, cost = Limits(4096, cap), CostModel.linear(0.01, 2e-4, 1e-7, 1e-4)
    p = plan(requests, limits, cost, 0.0, PolicyConfig("dp"))
    assert sorted(i for b in p.batches for i in b.indices) == list(range(len(requests)))
    for b in p.batches:
        assert len(b.indices) <= cap and (b.tokens <= 4096 or len(b.indices) == 1)
    priorities = [requests[b.indices[0]].priority for b in p.batches]
    assert priorities == sorted(priorities, reverse=True)
