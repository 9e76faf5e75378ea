"""dp's deadline margin (PolicyConfig.deadline_margin) and the simulator's noisy device (simulate(noise=...))."""

from __future__ import annotations

import math

import pytest

from scheduler.cost_model import CostModel
from scheduler.planner import Limits, PolicyConfig, Request, plan
from scheduler.simulator import Trace, lengths_uniform, make_trace, simulate

LIMITS = Limits(4096, 16)


def _cost(p90_overrun: float) -> CostModel:
    cost = CostModel([0.1, 0.0, 0.001, 0.0], [1.0], [1.0])  # 0.1 s a batch + 1 ms a token
    cost.overrun = math.log(p90_overrun)  # as if batches had overrun the model by this, 1 time in 10
    return cost


def test_with_a_margin_an_urgent_request_is_not_batched_up_to_the_edge_of_its_deadline():
    # Together: 0.1 + 0.5 = 0.6 s, within B's 0.9 s, and cheaper than apart (0.2 + 0.5 = 0.7 s).
    requests = [Request(400, 0.0, 10.0), Request(100, 0.0, 0.9)]
    for margin, expected in ((0.0, [(0, 1)]), (1.0, [(1,), (0,)])):
        got = plan(requests, LIMITS, _cost(2.0), 0.0, PolicyConfig("dp", deadline_margin=margin))
        assert [tuple(sorted(b.indices)) for b in got.batches] == expected, margin
        assert not got.late  # lateness is still judged on the deadlines themselves


def test_a_slack_of_many_batches_is_shrunk_less_than_by_the_whole_overrun_factor():
    """Four short requests due in 2.6 s, with slack for ten full batches of their length (0.26 s each), and a long one
    due later: together they take 1.64 s. Shrunk by the whole p90 factor (2) the slack is 1.3 s and dp runs the short
    ones apart first (1.74 s in all); averaged over ten batches the margin is 1 + 1 / sqrt(10): 1.98 s, and they go
    together. A request whose slack holds one batch keeps the whole factor (the test above)."""
    requests = [Request(1500, 0.0, 10.0)] + [Request(10, 0.0, 2.6) for _ in range(4)]
    for averaging, expected in ((0.0, [(1, 2, 3, 4), (0,)]), (0.5, [(0, 1, 2, 3, 4)])):
        got = plan(requests, LIMITS, _cost(2.0), 0.0, PolicyConfig("dp", deadline_margin=1.0, margin_averaging=averaging))
        assert [tuple(sorted(b.indices)) for b in got.batches] == expected, averaging
        assert not got.late


def test_no_margin_while_the_model_has_not_overrun_and_none_for_late_or_unbounded_requests():
    requests = [Request(400, 0.0, 10.0), Request(100, 0.0, 0.9)]
    got = plan(requests, LIMITS, _cost(1.0), 0.0, PolicyConfig("dp", deadline_margin=1.0))
    assert [tuple(sorted(b.indices)) for b in got.batches] == [(0, 1)]
    # Past its deadline already, or none: the margin does not move a deadline later, or make one up.
    late = [Request(100, 0.0, 0.5), Request(300, 0.0, math.inf), Request(50, 0.0, 2.0)]
    for margin in (0.0, 1.0):
        got = plan(late, LIMITS, _cost(3.0), 1.0, PolicyConfig("dp", deadline_margin=margin))
        assert sorted(i for b in got.batches for i in b.indices) == [0, 1, 2]
        assert got.late == (0,)


def test_noise_scatters_batch_times_about_the_model_reproducibly():
    trace = make_trace(5.0, 300, lengths_uniform(8, 256), seed=3)
    cost = CostModel([0.004, 0.0002, 0.00008, 0.0], [1.0], [1.0])
    config = PolicyConfig("fifo", fixed_batch_size=8, max_queue_delay=0.0)
    exact = simulate(trace, config, LIMITS, cost, 1.0)
    assert simulate(trace, config, LIMITS, cost, 1.0, noise=0.0, seed=5) == exact
    noisy = [simulate(trace, config, LIMITS, cost, 1.0, noise=0.2, seed=s) for s in (1, 1, 2)]
    assert noisy[0] == noisy[1] and noisy[0] != noisy[2] and noisy[0] != exact
    # One request at a time, far apart: each latency is one batch, so the latencies are the device's factors.
    alone = Trace([10.0 * i for i in range(200)], [100] * 200)
    base = cost.predict_lengths([100])
    lat = simulate(alone, config, LIMITS, cost, 100.0, noise=0.2, seed=7)
    assert 0.9 * base < lat.p50 < 1.1 * base
    assert lat.p99 > base * math.exp(0.2 * 1.5)  # a log-normal tail (2.33 sigma at p99)


@pytest.mark.parametrize("name, value", [("margin_averaging", 0.5), ("shed_margin", 1.0)])
def test_the_margin_settings_reach_the_planner(monkeypatch, name, value):
    from pydantic import ValidationError  # noqa: PLC0415

    from configs.settings import SchedulerSettings, Settings  # noqa: PLC0415
    from server.engine import policy_config  # noqa: PLC0415

    assert getattr(policy_config(SchedulerSettings()), name) == getattr(PolicyConfig(), name) == 0.0
    monkeypatch.setenv(f"TURBOSERVE_SCHEDULER__{name.upper()}", str(value))
    assert getattr(policy_config(Settings().scheduler), name) == value
    with pytest.raises(ValidationError):
        SchedulerSettings(**{name: -1})
