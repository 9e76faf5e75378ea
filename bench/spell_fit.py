"""How the machine's speed moves in time during live runs, as the simulator's `Spells`.

    .venv/bin/python bench/spell_fit.py bench/results/s24/live_capacity [more bench/live_capacity.py folders]

Each live batch's residual is log(observed / fitted), fitted by bench/host_load.fit_runs (the run's speed, the
host's terms). The simulator's `Scatter` draws these apart, batch by batch; live they are not: two batches 0.15 s
apart have residuals correlated 0.4-0.6 on the 2-vCPU VM, and 3 s apart still up to 0.25. So their covariance is
binned by the lag between the batches' starts (pairs of one run) and fitted with two exponentials,

    cov(lag) = sigma1^2 exp(-lag / tau1) + sigma2^2 exp(-lag / tau2)

each as it is once a run's residuals are centred on the run's own speed (which takes the run's mean of a slow spell
out of them: `centred_exp`), a grid over tau1 < tau2 with non-negative least squares for the sigmas. What the spells
leave of the scatter's floor is what batches do apart; the jitter (short hiccups) stays. Printed per folder and for all
of them pooled, with the options bench/simulate.py takes (--spells, and --noise for the floor left).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench.host_load import fit_runs, host_seconds  # noqa: E402
from bench.sim_fidelity import load_folder  # noqa: E402
from scheduler.cost_model import nonnegative_fit  # noqa: E402
from scheduler.simulator import Scatter, Spells  # noqa: E402

LAG_EDGES = (0.0, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)  # seconds
CLIP_SIGMAS = 3.0  # residuals beyond this many robust sds are clipped (a stalled batch would dominate products)


@dataclass
class Covariance:
    lag: np.ndarray  # mean lag of the pairs in each bin (seconds)
    cov: np.ndarray  # mean product of the two residuals
    pairs: np.ndarray
    variance: float  # mean squared residual (lag 0)
    batches: int
    durations: np.ndarray  # each run's, first batch start to last (seconds)
    run_pairs: np.ndarray  # pairs per (run, bin)

    def __add__(self, other: Covariance) -> Covariance:
        pairs = self.pairs + other.pairs
        weigh = lambda a, b: (a * self.pairs + b * other.pairs) / np.maximum(pairs, 1)  # noqa: E731
        n = self.batches + other.batches
        return Covariance(weigh(self.lag, other.lag), weigh(self.cov, other.cov), pairs,
                          (self.variance * self.batches + other.variance * other.batches) / n, n,
                          np.concatenate([self.durations, other.durations]), np.vstack([self.run_pairs, other.run_pairs]))

    def basis(self, tau: float) -> np.ndarray:
        """exp(-lag / tau) per bin as the runs see it once centred: centred_exp over each run's duration, weighed
        by the run's pairs in the bin."""
        per_run = np.array([centred_exp(self.lag, tau, t) for t in self.durations])
        return (per_run * self.run_pairs).sum(axis=0) / np.maximum(self.pairs, 1)


def centred_exp(lag: np.ndarray, tau: float, duration: float) -> np.ndarray:
    """E[(x(s) - m)(x(s + lag) - m)] for a stationary process of covariance exp(-|lag| / tau) over [0, T] and m its
    mean over the run, averaged over s in [0, T - lag]: exp(-lag / tau) - 2 (its covariance with m, averaged) + Var(m)."""
    t = max(duration, 1e-9)
    lag = np.minimum(lag, 0.999 * t)
    rest = t - lag
    with_mean = (tau / t) * (2 - (tau / rest) * (1 - np.exp(-rest / tau) + np.exp(-lag / tau) - np.exp(-t / tau)))
    var_mean = (2 * tau / t) * (1 - (tau / t) * (1 - np.exp(-t / tau)))
    return np.exp(-lag / tau) - 2 * with_mean + var_mean


def residual_series(folder: Path) -> tuple[list[tuple[np.ndarray, np.ndarray]], Scatter]:
    """Per run of a live_capacity folder, its batches' start times and residuals about the runs fit (centred on the
    run's median, clipped at CLIP_SIGMAS robust sds); and the fit's scatter."""
    d = load_folder(folder)
    fit = fit_runs([r["batches"] for r in d["runs"]], d["profile"])
    series = []
    for run, speed in zip(d["runs"], fit.speeds):
        batches = run["batches"]
        if math.isnan(speed) or len(batches) < 20:
            continue
        start = np.array([b.start for b in batches])
        observed = np.array([b.end - b.start for b in batches])
        fitted = np.array([speed * d["profile"].predict_lengths(b.lengths) + host_seconds(b, fit.host) for b in batches])
        r = np.log(observed / fitted)
        r -= np.median(r)
        sd = 1.4826 * float(np.median(np.abs(r)))
        series.append((start, np.clip(r, -CLIP_SIGMAS * sd, CLIP_SIGMAS * sd)))
    return series, fit.scatter


def binned_covariance(series: list[tuple[np.ndarray, np.ndarray]], edges=LAG_EDGES) -> Covariance:
    """Mean product of residual pairs of one run, binned by the lag between their starts."""
    edges = np.asarray(edges)
    bins = len(edges) - 1
    prod_sum, lag_sum = np.zeros(bins), np.zeros(bins)
    run_pairs = np.zeros((len(series), bins))
    squares = count = 0.0
    for run, (t, r) in enumerate(series):
        squares += float(np.sum(r * r))
        count += len(r)
        for i in range(len(t) - 1):  # row by row: runs of thousands of batches stay small in memory
            lag = np.abs(t[i + 1:] - t[i])
            k = np.searchsorted(edges, lag, side="right") - 1
            ok = k < bins
            np.add.at(prod_sum, k[ok], r[i] * r[i + 1:][ok])
            np.add.at(lag_sum, k[ok], lag[ok])
            np.add.at(run_pairs[run], k[ok], 1)
    pairs = run_pairs.sum(axis=0)
    safe = np.maximum(pairs, 1)
    durations = np.array([float(t[-1] - t[0]) if len(t) else 0.0 for t, _ in series])
    return Covariance(lag_sum / safe, prod_sum / safe, pairs, squares / max(count, 1), int(count), durations, run_pairs)


def fit_spells(c: Covariance, taus1=None, taus2=None) -> tuple[Spells, float]:
    """Two Ornstein-Uhlenbeck processes fitted to the binned covariance of centred runs (every bin with pairs weighs
    alike): (spells, rms misfit)."""
    taus1 = np.geomspace(0.02, 2.0, 31) if taus1 is None else taus1
    taus2 = np.geomspace(0.5, 40.0, 31) if taus2 is None else taus2
    used = c.pairs > 0
    cov = c.cov[used]
    bases = {tau: c.basis(tau)[used] for tau in {*taus1, *taus2}}
    best = None
    for t1 in taus1:
        for t2 in taus2:
            if t2 <= t1:
                continue
            x = np.column_stack([bases[t1], bases[t2]])
            coef = nonnegative_fit(x, cov, relative=False)
            err = float(np.sqrt(np.mean((x @ coef - cov) ** 2)))
            if best is None or err < best[0]:
                best = (err, t1, t2, coef)
    err, t1, t2, coef = best
    return Spells((float(np.sqrt(coef[0])), float(np.sqrt(coef[1]))), (float(t1), float(t2))), err


def report(name: str, c: Covariance, scatter: Scatter | None) -> dict:
    spells, err = fit_spells(c)
    print(f"\n{name}: {c.batches} batches, residual sd {math.sqrt(c.variance):.3f}")
    print("  lag s     " + " ".join(f"{x:7.3f}" for x in c.lag))
    print("  corr      " + " ".join(f"{x / c.variance:7.3f}" for x in c.cov))
    fitted = sum(s * s * c.basis(tau) for s, tau in zip(spells.sigma, spells.tau))
    print("  fit corr  " + " ".join(f"{x / c.variance:7.3f}" for x in fitted))
    print(f"  spells: sigma {spells.sigma[0]:.3f} tau {spells.tau[0]:.2f} s + sigma {spells.sigma[1]:.3f} tau "
          f"{spells.tau[1]:.2f} s (rms misfit {err:.5f})")
    out = {"name": name, "batches": c.batches, "residual_sd": math.sqrt(c.variance), "lag": c.lag.tolist(),
           "corr": (c.cov / c.variance).tolist(), "sigma": list(spells.sigma), "tau": list(spells.tau)}
    option = f"--spells {spells.sigma[0]:.3f}:{spells.tau[0]:.2f},{spells.sigma[1]:.3f}:{spells.tau[1]:.2f}"
    if scatter is not None:
        left = scatter.with_spells(spells).floor
        print(f"  scatter floor {scatter.floor:.3f} -> {left:.3f} apart from the spells, jitter {scatter.jitter:.4f}")
        option += f" --noise {left:.3f} --jitter {scatter.jitter:.4f}"
        out |= {"floor": scatter.floor, "floor_left": left, "jitter": scatter.jitter}
    print(f"  bench/simulate.py {option}")
    return out | {"option": option}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path, help="bench/live_capacity.py output folders")
    ap.add_argument("--out", type=Path, help="write the fits as JSON here")
    args = ap.parse_args()
    rows, pooled = [], None
    for folder in args.folders:
        series, scatter = residual_series(folder)
        c = binned_covariance(series)
        rows.append(report(str(folder), c, scatter))
        pooled = c if pooled is None else pooled + c
    if len(args.folders) > 1:
        rows.append(report("all folders pooled", pooled, None))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
