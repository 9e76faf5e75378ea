"""bench/spell_fit.py: the simulator's Spells fitted back from batch residuals that were drawn with known spells."""

import numpy as np
import pytest

from bench.spell_fit import binned_covariance, fit_spells
from scheduler.simulator import Scatter, Spells

TRUE = Spells((0.08, 0.07), (0.3, 8.0))


def synthetic_runs(runs: int = 32, seconds: float = 40.0, apart: float = 0.05, seed: int = 0):
    """Batches at Poisson times; each residual the spells' log factor then plus an independent draw, centred on
    the run's median as the live runs' are."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(runs):
        t = np.cumsum(rng.exponential(apart, int(seconds / apart)))
        path = TRUE.path(seed * 1000 + k)
        r = np.log([path(x) for x in t]) + rng.normal(0.0, 0.05, len(t))
        out.append((t, r - np.median(r)))
    return out


def test_the_fit_recovers_the_spells_it_was_drawn_with():
    series = synthetic_runs()
    c = binned_covariance(series)
    assert c.batches == sum(len(r) for _, r in series)
    assert c.variance == pytest.approx(TRUE.variance() + 0.05 ** 2, rel=0.25)
    assert np.all(np.diff(c.lag) > 0) and c.cov[0] > c.cov[4] > c.cov[7]  # falls with the lag
    spells, err = fit_spells(c)
    assert spells.tau[0] == pytest.approx(0.3, rel=0.3) and spells.tau[1] == pytest.approx(8.0, rel=0.5)
    assert spells.sigma[0] == pytest.approx(0.08, rel=0.15) and spells.sigma[1] == pytest.approx(0.07, rel=0.2)
    assert err < 0.1 * TRUE.variance()


def test_independent_residuals_fit_no_spells():
    rng = np.random.default_rng(3)
    series = [(np.cumsum(rng.exponential(0.05, 800)), rng.normal(0.0, 0.1, 800)) for _ in range(8)]
    spells, _ = fit_spells(binned_covariance(series))
    assert spells.variance() < 0.05 * 0.1 ** 2


def test_pooled_covariance_is_the_pairs_weighted_mean():
    a, b = synthetic_runs(runs=3, seed=1), synthetic_runs(runs=2, seed=2)
    pooled, whole = binned_covariance(a) + binned_covariance(b), binned_covariance(a + b)
    assert pooled.batches == whole.batches
    assert np.allclose(pooled.cov, whole.cov) and np.allclose(pooled.lag, whole.lag)
    assert np.array_equal(pooled.pairs, whole.pairs) and pooled.variance == pytest.approx(whole.variance)


def test_the_floor_left_is_what_the_spells_do_not_explain():
    spells = Spells((0.06,), (1.0,))
    moved = Scatter(0.1, 0.01).with_spells(spells)
    assert moved.floor == pytest.approx(0.08) and moved.jitter == 0.01 and moved.spells == spells
    assert Scatter(0.05).with_spells(spells).floor == 0.0
