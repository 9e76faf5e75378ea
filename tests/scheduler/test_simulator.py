"""The simulator: every request completes once, latencies are physical, and it is deterministic."""

from __future__ import annotations

import random

import pytest

from scheduler.cost_model import Cell, CostModel
from scheduler.planner import Limits, PolicyConfig
from scheduler.simulator import HostLoad, Trace, bursty_arrivals, lengths_uniform, make_trace, simulate

COST = CostModel.linear(0.0127, 0.00025, 4e-7, 0.00024)  # the shape measured on a 2-core CPU
LIMITS = Limits(16384, 64)


def test_every_request_completes_and_latency_covers_service_time():
    trace = make_trace(10.0, 300, lengths_uniform(8, 256), seed=3)
    for name in ("dp", "token_budget", "fifo", "triton", "sort_slice"):
        r = simulate(trace, PolicyConfig(name), LIMITS, COST, slo=2.0)
        assert r.completed == 300
        assert r.p50 >= COST.predict_lengths([8]) * 0.99
        assert r.p99 >= r.p50
        assert 0 <= r.slo_attainment <= 1 and 0 <= r.padding_ratio < 1
        assert r.goodput <= r.throughput


def test_deterministic():
    trace = make_trace(20.0, 200, lengths_uniform(8, 256), seed=5)
    a = simulate(trace, PolicyConfig("dp"), LIMITS, COST, slo=1.0)
    b = simulate(trace, PolicyConfig("dp"), LIMITS, COST, slo=1.0)
    assert a == b


def test_under_overload_dp_keeps_serving_requests_in_time():
    # 1.2x capacity: the baselines let every request go late; dp serves the ones it still can in time first.
    capacity = 64 / COST.predict_lengths([132] * 64)
    trace = make_trace(1.2 * capacity, 600, lengths_uniform(8, 256), seed=1)
    dp = simulate(trace, PolicyConfig("dp"), LIMITS, COST, slo=2.0)
    fifo = simulate(trace, PolicyConfig("fifo"), LIMITS, COST, slo=2.0)
    assert dp.goodput > 1.3 * fifo.goodput
    assert dp.completed == fifo.completed == 600


def test_bursts_arrive_together():
    arrivals = bursty_arrivals(100.0, 64, random.Random(0), burst=16)
    assert len(arrivals) == 64 and len(set(arrivals)) == 4


def test_host_load_lengthens_the_batches_it_overlaps():
    # One request a batch, 0.1 s each. Three requests arrive while the first runs: 0.05 s each on top
    # (0.25 s); each later batch runs right after one answered request: 0.02 s on top (0.12 s).
    trace = Trace([0.0, 0.01, 0.02, 0.03], [10] * 4)
    one_at_a_time = PolicyConfig("fifo", fixed_batch_size=1, max_queue_delay=0.0)
    cost = CostModel.linear(0.1, 0.0)
    plain = simulate(trace, one_at_a_time, Limits(16384, 1), cost, slo=10.0)
    loaded = simulate(trace, one_at_a_time, Limits(16384, 1), cost, slo=10.0, host=HostLoad(0.05, 0.02))
    assert abs(plain.duration - 0.4) < 1e-9
    assert abs(loaded.duration - (0.25 + 3 * 0.12)) < 1e-9
    assert abs(loaded.p50 - (0.25 + 2 * 0.12 - 0.02)) < 1e-9  # the third request: arrived at 0.02


def test_an_arrival_during_the_host_work_lengthens_the_batch_too():
    # The batch's own time ends at 0.1, the first arrival's work takes it to 0.15, past the second arrival.
    trace = Trace([0.0, 0.09, 0.12], [10] * 3)
    r = simulate(trace, PolicyConfig("fifo", fixed_batch_size=1, max_queue_delay=0.0), Limits(16384, 1),
                 CostModel.linear(0.1, 0.0), slo=10.0, host=HostLoad(0.05, 0.0))
    # Batches end at 0.2 (0.1 + two arrivals' 0.05), 0.3 and 0.4; had the second arrival not counted: 0.35.
    assert abs(r.duration - 0.4) < 1e-9
    assert abs(r.p50 - (0.3 - 0.09)) < 1e-9


def test_planning_idles_the_device_before_each_batch():
    # One request a batch, 0.1 s each, all four there at 0: each batch starts 0.03 s after the one before ends
    # (the worker plans meanwhile); the requests that arrive during that time wait for the batch after.
    trace = Trace([0.0] * 4, [10] * 4)
    one_at_a_time = PolicyConfig("fifo", fixed_batch_size=1, max_queue_delay=0.0)
    r = simulate(trace, one_at_a_time, Limits(16384, 1), CostModel.linear(0.1, 0.0), slo=10.0, host=HostLoad(per_batch=0.03))
    assert r.duration == pytest.approx(4 * 0.13)
    assert r.p50 == pytest.approx(3 * 0.13)  # the third request, sorted latencies [0.13, 0.26, 0.39, 0.52]
    late = Trace([0.0, 0.11], [10, 10])  # arrives while the first batch runs: taken after it, planned, then run
    r = simulate(late, one_at_a_time, Limits(16384, 1), CostModel.linear(0.1, 0.0), slo=10.0, host=HostLoad(per_batch=0.03))
    assert r.duration == pytest.approx(0.13 + 0.13)


def test_no_host_load_is_the_device_alone():
    trace = make_trace(30.0, 300, lengths_uniform(8, 256), seed=4, bursty=True)
    for name in ("dp", "fifo"):
        assert simulate(trace, PolicyConfig(name), LIMITS, COST, 1.0) == simulate(trace, PolicyConfig(name), LIMITS, COST, 1.0,
                                                                                  host=HostLoad())
        heavier = simulate(trace, PolicyConfig(name), LIMITS, COST, 1.0, host=HostLoad(0.004, 0.002))
        # Host work only adds time: the trace takes longer to finish (p99 is no such measure past capacity,
        # where dp bounds how long a late request waits).
        assert heavier.duration > simulate(trace, PolicyConfig(name), LIMITS, COST, 1.0).duration


def test_refine_lets_the_planner_learn_what_the_device_really_takes():
    # The device is 40% slower than the planner's model. Planning with the stale model, dp keeps choosing
    # plans it thinks meet the deadlines; refining from the simulated batch times, its model learns the truth
    # and it does at least as well. The caller's model is not touched.
    trace = make_trace(0.95 * 64 / COST.predict_lengths([132] * 64) / 1.4, 600, lengths_uniform(8, 256), seed=2)
    slow = COST.scaled(1.4)
    stale = simulate(trace, PolicyConfig("dp"), LIMITS, slow, 1.0, planner_cost=COST)
    planner = CostModel.from_json(COST.to_json())
    learned = simulate(trace, PolicyConfig("dp"), LIMITS, slow, 1.0, planner_cost=planner, refine=True)
    assert planner.to_json() == COST.to_json()
    assert learned.goodput >= stale.goodput
    exact = simulate(trace, PolicyConfig("dp"), LIMITS, slow, 1.0)
    assert learned.slo_attainment >= exact.slo_attainment - 0.02


def test_a_scaled_model_is_its_own():
    # The live bench simulates the profile scaled to a run's speed; refining one must not move the other.
    model = CostModel.fit([Cell(n, length, 0.01 + 0.001 * n * length) for n in (1, 2, 4) for length in (8, 32)])
    before = model.predict_lengths([32, 32])
    faster = model.scaled(0.5)
    assert faster.predict_lengths([32, 32]) == pytest.approx(0.5 * before)
    for _ in range(20):
        faster.observe([32, 32], 3 * before)
    assert model.predict_lengths([32, 32]) == before


def test_a_request_of_several_inputs_is_done_with_its_last_sequence():
    trace = make_trace(5.0, 40, lengths_uniform(8, 256), seed=2, inputs=4)
    assert len(trace.lengths) == 160 and trace.request_count == 40
    assert trace.requests[:8] == [0, 0, 0, 0, 1, 1, 1, 1] and trace.arrivals[0] == trace.arrivals[3]
    per_request = simulate(trace, PolicyConfig("fifo"), LIMITS, COST, slo=2.0)
    as_sequences = simulate(Trace(trace.arrivals, trace.lengths), PolicyConfig("fifo"), LIMITS, COST, slo=2.0)
    assert per_request.completed == 40 and as_sequences.completed == 160
    assert per_request.p50 >= as_sequences.p50  # a request waits for its slowest sequence
    assert per_request.batches == as_sequences.batches  # fifo ignores the grouping: the same batches
    with pytest.raises(ValueError):
        Trace([0.0, 1.0], [8, 8], [0])


def test_with_many_input_requests_past_capacity_dp_keeps_requests_whole(monkeypatch):
    # Requests of 8 inputs at 1.1x capacity. Shedding one sequence at a time (the longest of each request)
    # left most requests late while the device still ran the rest of them; dp sheds whole requests.
    capacity = 64 / COST.predict_lengths([132] * 64) / 8
    trace = make_trace(1.1 * capacity, 150, lengths_uniform(8, 256), seed=1, inputs=8)
    good = {name: simulate(trace, PolicyConfig(name), LIMITS, COST, slo=2.0).goodput
            for name in ("dp", "token_budget", "fifo", "sort_slice")}
    assert good["dp"] > 1.5 * max(good[p] for p in good if p != "dp")
    monkeypatch.setattr("scheduler.dp.client_requests", lambda groups: None)  # every sequence on its own
    one_by_one = simulate(trace, PolicyConfig("dp"), LIMITS, COST, slo=2.0).goodput
    assert good["dp"] > 1.2 * one_by_one  # 1.71 against 1.26 requests/s in time
