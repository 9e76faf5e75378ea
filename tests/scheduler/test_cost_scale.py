"""The cost model's model-wide `scale` (scheduler/cost_model.py): a running median of observed / predicted batch
time that carries what every batch size shares, and drifts back when it stops being shared."""

from __future__ import annotations

import statistics

import pytest

from scheduler import cost_model
from scheduler.cost_model import Cell, CostModel

TRUTH = CostModel.linear(0.003, 2e-4, 1e-7, 1e-4)
SIZES = [[8], [32] * 2, [64] * 4, [128] * 8, [128] * 32, [256] * 16]  # one batch near each of several knots


def _fitted() -> CostModel:
    return CostModel.fit([Cell(n, length, TRUTH.predict_lengths([length] * n)) for n in (1, 2, 4, 8, 16, 32)
                          for length in (8, 32, 128, 256)])


def _errors(model: CostModel) -> list[float]:
    """Host phases: 40 batches at 1.3x the device's time (the host busy with requests), 40 at 1x, five times over,
    cycling through the batch sizes; |error| of each prediction made before its batch."""
    out = []
    for i in range(400):
        lengths = SIZES[i % len(SIZES)]
        slow = 1.3 if (i // 40) % 2 == 0 else 1.0
        out.append(abs(model.observe(lengths, slow * TRUTH.predict_lengths(lengths))))
    return out


def test_a_slowdown_every_batch_size_shares_is_learned_faster_with_the_scale(monkeypatch):
    with_scale = statistics.median(_errors(_fitted()))
    monkeypatch.setattr(cost_model, "SCALE_STEP", 0.0)
    monkeypatch.setattr(cost_model, "SCALE_DECAY", 0.0)
    knots_only = statistics.median(_errors(_fitted()))
    assert with_scale < 0.9 * knots_only, (with_scale, knots_only)


def test_the_scale_drifts_back_once_the_knots_hold_the_shift_and_is_not_saved(tmp_path):
    model = _fitted()
    large, small = [256] * 16, [8]
    for _ in range(30):  # a slow spell at one size pushes the scale up...
        model.observe(large, 30 * TRUTH.predict_lengths(large))
    assert model.scale > 1.15 and model.summary()["scale"] == pytest.approx(model.scale, abs=1e-4)
    for _ in range(1000):  # ...and normal batches afterwards bring it back
        model.observe(small, TRUTH.predict_lengths(small))
    assert model.scale == pytest.approx(1.0, abs=0.05)
    assert model.predict_lengths(large) == pytest.approx(TRUTH.predict_lengths(large), rel=0.1)
    model.save(tmp_path / "c.json")
    assert CostModel.load(tmp_path / "c.json").scale == 1.0  # it describes this run's host, like the overrun


def test_batches_exactly_as_predicted_leave_the_scale_alone():
    model = _fitted()
    for i in range(200):
        lengths = SIZES[i % len(SIZES)]
        model.observe(lengths, model.predict_lengths(lengths))
    assert model.scale == 1.0
