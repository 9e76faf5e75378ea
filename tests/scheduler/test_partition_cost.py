"""dp prices candidate partitions with the profiled cost model and checks deadlines with the refined one
(PolicyConfig.partition_cost; scheduler.partition_cost)."""

import pytest
from pydantic import ValidationError

from scheduler.cost_model import Cell, CostModel
from scheduler.planner import Limits, PolicyConfig, Request, plan

LIMITS = Limits(max_batch_tokens=10_000, max_batch_requests=64)


def _knotted() -> CostModel:
    """10 ms a batch plus 0.1 ms a token, as profiled (knots at 16 and 1,024 tokens, factors 1); then the knots as
    online refinement can leave them after batches that scattered: small batches look cheap, large ones dear."""
    model = CostModel([0.010, 0.0, 1e-4, 0.0], [16.0, 1024.0], [1.0, 1.0])
    model.factors[:] = [0.3, 3.0]
    return model


def test_profiled_is_the_measured_fit_however_far_the_knots_were_refined():
    truth = CostModel.linear(0.005, 2e-5)
    cells = [Cell(n, length, truth.predict_lengths([length] * n)) for n in (1, 4, 16) for length in (16, 64, 256)]
    model = CostModel.fit(cells)
    for _ in range(40):  # large batches ran 40% slower than profiled, many times
        model.observe([256] * 16, 1.4 * truth.predict_lengths([256] * 16))
    assert model.factors != model.measured().factors
    profiled = model.profiled()
    assert profiled.factors == pytest.approx(model.measured().factors)
    assert profiled.scale == 1.0
    assert model.profiled() is profiled  # made once
    big = [256] * 16
    assert profiled.predict_lengths(big) == pytest.approx(truth.predict_lengths(big), rel=0.02)
    assert model.predict_lengths(big) > 1.2 * profiled.predict_lengths(big)


def test_a_model_without_cells_is_profiled_as_it_was_made():
    model = _knotted()
    assert model.profiled().factors == [1.0, 1.0]
    assert model.profiled().predict_lengths([100] * 8) == pytest.approx(0.010 + 800e-4)


def test_the_partition_is_priced_by_the_profiled_model():
    model = _knotted()
    requests = [Request(100, 0.0, 10.0) for _ in range(8)]
    # Profiled: one batch of 800 tokens (90 ms) beats any split (two of 400: 2 x 50 ms). The refined knots say the
    # reverse (four of 200 tokens: 4 x 58 ms against 255 ms): that is their noise, and the default does not act on it.
    profiled = plan(requests, LIMITS, model, 0.0, PolicyConfig("dp"))
    assert [len(b.indices) for b in profiled.batches] == [8]
    refined = plan(requests, LIMITS, model, 0.0, PolicyConfig("dp", partition_cost="refined"))
    assert sorted(len(b.indices) for b in refined.batches) == [2, 2, 2, 2]
    # Either way the plan's times are the refined model's: it predicts the device.
    assert profiled.cost == pytest.approx(model.predict_lengths([100] * 8))
    assert refined.cost == pytest.approx(4 * model.predict_lengths([100] * 2))


def test_deadlines_are_checked_with_the_refined_model():
    model = _knotted()
    # Four requests due in 150 ms: the profiled partition, one batch of all eight, ends at 255 ms by the refined
    # model (90 ms by the profiled one), so the deadline repair runs those four first, and nobody is late.
    requests = [Request(100, 0.0, 0.15) for _ in range(4)] + [Request(100, 0.0, 10.0) for _ in range(4)]
    got = plan(requests, LIMITS, model, 0.0, PolicyConfig("dp", deadline_margin=0.0))
    assert got.late == ()
    end, finish = 0.0, {}
    for batch in got.batches:
        end += model.predict_lengths([requests[i].length for i in batch.indices])
        finish.update(dict.fromkeys(batch.indices, end))
    assert max(finish[i] for i in range(4)) <= 0.15
    assert sorted(finish) == list(range(8))


def test_the_setting_reaches_the_planner(monkeypatch):
    from configs.settings import SchedulerSettings, Settings  # noqa: PLC0415
    from server.engine import policy_config  # noqa: PLC0415

    assert policy_config(SchedulerSettings()).partition_cost == "profiled"
    monkeypatch.setenv("TURBOSERVE_SCHEDULER__PARTITION_COST", "refined")
    assert policy_config(Settings().scheduler).partition_cost == "refined"
    with pytest.raises(ValidationError):
        SchedulerSettings(partition_cost="median")
