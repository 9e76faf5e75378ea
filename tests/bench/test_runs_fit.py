"""bench/host_load.fit_runs: one host fit over several live runs, each at its own speed, and bench/sim_fidelity's
reading of a run folder's command."""

import math
import random

import pytest

from bench.host_load import LiveBatch, fit_runs
from bench.sim_fidelity import command_option
from scheduler.cost_model import CostModel
from scheduler.simulator import Scatter

COST = CostModel.linear(0.003, 0.0005, 0.0, 0.0002)
SPEEDS = (1.0, 1.25, 0.9, 1.1)


def make_runs(per_forward: float, per_arrival: float, per_completion: float, scatter: Scatter, n: int = 500):
    rng = random.Random(3)
    runs = []
    for speed in SPEEDS:
        batches = []
        for _ in range(n):
            lengths = [rng.randint(8, 256) for _ in range(rng.choice([1, 2, 4, 8, 16, 32]))]
            arrivals, after = rng.choice([0, 0, rng.randint(1, 12)]), rng.choice([0, rng.randint(1, 32)])
            exact = speed * COST.predict_lengths(lengths) + per_forward + per_arrival * arrivals + per_completion * after
            batches.append(LiveBatch(0.0, exact * rng.lognormvariate(0.0, scatter.sigma(exact)), lengths, arrivals, after))
        runs.append(batches)
    return runs


def test_each_run_gets_its_speed_and_the_host_terms_are_shared():
    fit = fit_runs(make_runs(0.002, 0.0015, 0.0003, Scatter(0.02)), COST)
    assert fit.speeds == pytest.approx(SPEEDS, rel=0.03)
    assert fit.host.per_forward == pytest.approx(0.002, rel=0.25)
    assert fit.host.per_arrival == pytest.approx(0.0015, rel=0.15)
    assert fit.host.per_completion == pytest.approx(0.0003, rel=0.3)
    assert fit.batches == 4 * 500 and fit.median_error < 0.03


def test_the_scatter_falls_with_the_batch_length_as_the_batches_did():
    truth = Scatter(0.05, 0.012)
    fit = fit_runs(make_runs(0.001, 0.001, 0.0, truth, n=1500), COST)
    for seconds in (0.01, 0.02, 0.1, 0.4):  # binned robust spreads: within 20% (the shortest run 5.5 ms)
        assert fit.scatter.sigma(seconds) == pytest.approx(truth.sigma(seconds), rel=0.2)
    assert fit.scatter.sigma(0.01) > 1.5 * fit.scatter.sigma(0.4)


def test_a_constant_scatter_fits_with_no_jitter_to_speak_of():
    fit = fit_runs(make_runs(0.0, 0.001, 0.0, Scatter(0.1), n=1000), COST)
    assert fit.scatter.floor == pytest.approx(0.1, rel=0.15)
    assert fit.scatter.sigma(0.005) < 0.13
    assert fit.host.per_forward < 0.0005


def test_too_few_batches_are_refused():
    with pytest.raises(ValueError, match="too few"):
        fit_runs([[LiveBatch(0.0, 0.1, [10], 0, 0)] * 3, []], COST)


def test_a_folders_command_gives_its_trace():
    command = "bench/live_capacity.py --arrivals poisson --slo-ms 500 --requests 1200 --policies dp,fifo"
    assert command_option(command, "--arrivals", "bursts") == "poisson"
    assert command_option(command, "--requests", "1280") == "1200"
    assert command_option("bench/live_capacity.py --steps 3", "--requests", "1280") == "1280"


def test_a_run_with_no_batch_keeps_its_place():
    runs = make_runs(0.0, 0.001, 0.0, Scatter(0.02), n=50)
    fit = fit_runs([runs[0], [], runs[1]], COST)
    assert math.isnan(fit.speeds[1]) and fit.speeds[0] == pytest.approx(SPEEDS[0], rel=0.05)
    assert fit.speeds[2] == pytest.approx(SPEEDS[1], rel=0.05)
