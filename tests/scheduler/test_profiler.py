"""scheduler/profiler.measure against slow spells of the host: a fake clock, the grid of a real deployment."""

from __future__ import annotations

import pytest

from scheduler import profiler
from scheduler.cost_model import CostModel


def test_a_slow_spell_during_one_cell_does_not_enter_the_profile(monkeypatch):
    # A fake clock: every run takes the true time, but all runs of cell (32, 64) in the first pass take 3x
    # (another process held the core). The profile keeps each cell's lowest median over the passes.
    truth = CostModel.linear(0.005, 1.5e-4, 1e-7, 3e-4)
    clock = [0.0]
    seen = []

    def run(lengths):
        seen.append((len(lengths), lengths[0]))
        first_pass = len(seen) <= len(cells) * 4  # 1 warm-up + 3 timed runs a cell
        slow = 3.0 if first_pass and (len(lengths), lengths[0]) == (32, 64) else 1.0
        clock[0] += slow * truth.predict_lengths(lengths)

    monkeypatch.setattr(profiler.time, "perf_counter", lambda: clock[0])
    cells = profiler.grid(64, 256, 2048)
    measured = {(c.n, c.length): c.seconds for c in profiler.measure(run, cells, runs=3, progress=False)}
    # two passes; in the first, the slow cell's warm-up passed SLOW_RUN_S, so it was timed once (2 runs fewer)
    assert profiler.SLOW_RUN_S <= 3 * truth.predict_lengths([64] * 32) and len(seen) == len(cells) * 4 * 2 - 2
    for n, length in cells:
        assert measured[n, length] == pytest.approx(truth.predict_lengths([length] * n))
    one_pass = {(c.n, c.length): c.seconds for c in profiler.measure(run, cells[:1], runs=3, progress=False, passes=1)}
    assert len(one_pass) == 1


def test_a_slow_spell_at_the_turn_between_passes_does_not_enter_the_profile(monkeypatch):
    # A fake clock: runs that start within a spell around the end of the first pass take 3x (the host slowed for a
    # few seconds). Run backwards, the second pass met the first pass's last cells again inside the spell.
    truth = CostModel.linear(0.005, 1.5e-4, 1e-7, 3e-4)
    cells = profiler.grid(64, 256, 2048)
    one_pass = sum(4 * truth.predict_lengths([length] * n) for n, length in cells)  # 1 warm-up + 3 timed runs a cell
    spell = (0.75 * one_pass, 1.25 * one_pass)
    clock = [0.0]

    def run(lengths):
        slow = 3.0 if spell[0] <= clock[0] < spell[1] else 1.0
        clock[0] += slow * truth.predict_lengths(lengths)

    monkeypatch.setattr(profiler.time, "perf_counter", lambda: clock[0])
    measured = {(c.n, c.length): c.seconds for c in profiler.measure(run, cells, runs=3, progress=False, budget_s=1e9)}
    for n, length in cells:
        assert measured[n, length] == pytest.approx(truth.predict_lengths([length] * n)), (n, length)
