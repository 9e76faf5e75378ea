"""Batch latency model for packed execution, measured on the device and refined online.

A packed batch's time is driven by its number of sequences n, its total tokens T (every GEMM) and its
sum of squared lengths S2 (attention). The model is a non-negative linear fit
    t = c0 + c1·n + c2·T + c3·S2
times a correction factor interpolated (in log T) between measured token-count knots: the factor
absorbs what a line misses (GEMM efficiency at small T, cache effects at large T), times a model-wide
`scale`. Observed batch times refine the factor at the nearest knots with an EWMA, and move `scale` one
small step toward each batch's side of its prediction (a running median of observed / predicted, for
what every batch size shares, such as the host's request handling on a small CPU host), while it
drifts back toward 1. Pure numpy: no torch, no clock.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

FEATURES = ("batch", "sequence", "token", "squared_token")

# Online refinement that moved a knot further than this factor from the measurement reflects a passing
# condition (another process on the host, a throttled device), not the runtime: it is neither saved nor
# trusted when loaded.
MAX_DRIFT = 2.0

# `overrun` tracks this quantile of log(observed / predicted) batch seconds, moving by STEP (in log units)
# per observed batch: up 0.045 when a batch overruns it, down 0.005 otherwise.
OVERRUN_QUANTILE = 0.9
# Each observed batch pulls the knots it does not touch this share of the way (in log space) back to their
# factors when the model was made or loaded: a knot inflated by a passing slowdown and then never observed (the
# planner avoids the batch sizes it thinks slow) returns within ~500 batches. Replayed on session 6's 18 live
# runs (bench/results/s8/cost_error_replay.py's data): median error 12.5% against 12.9% without it.
UNSEEN_DECAY = 0.005
OVERRUN_STEP = 0.05
# `scale` moves by SCALE_STEP (log units) per observed batch, up when the batch ran longer than predicted and down
# when shorter, and SCALE_DECAY of the way back to 1: the knots near the batches take up a lasting shift within a
# few batches, so without the pull the scale would keep what a passing spell gave it, at every batch size. A sign
# step, not an EWMA of the error: where bursts of requests make a few batches 1.5-5x slower, an EWMA chased them and
# was wrong on the batches after. Replayed (bench/results/s19/cost_error_replay.py): median error over session 19's
# 30 live runs 10.9% -> 9.8% (runs within 10%: 12 -> 17), 17.5% -> 16.9% and 12.5% -> 12.0% on the runs with
# httpx's client (this VM, the AMD VM's session 6).
SCALE_STEP = 0.01
SCALE_DECAY = 0.005


@dataclass(frozen=True)
class Cell:
    """One profiled grid cell: `n` sequences of `length` tokens each ran in `seconds` (median)."""

    n: int
    length: int
    seconds: float

    @property
    def tokens(self) -> int:
        return self.n * self.length

    @property
    def sq_tokens(self) -> int:
        return self.n * self.length * self.length


def nonnegative_fit(x: np.ndarray, y: np.ndarray, relative: bool = True) -> np.ndarray:
    """Least squares with coefficients >= 0 (drop the most negative term and refit), on relative error
    (short and long batches count alike) or, with relative=False, on absolute error."""
    w = 1.0 / np.maximum(y, 1e-9) if relative else np.ones_like(y)
    active = list(range(x.shape[1]))
    while True:
        coef_active, *_ = np.linalg.lstsq(x[:, active] * w[:, None], y * w, rcond=None)
        if (coef_active >= 0).all() or len(active) == 1:
            coef = np.zeros(x.shape[1])
            coef[active] = np.maximum(coef_active, 0)
            return coef
        active.pop(int(np.argmin(coef_active)))


# EWMA weight of one observed batch in a knot's factor (scheduler.cost_model_alpha). At 0.2 a knot's factor wanders
# ~5% with live batches' scatter (log-normal sigma 0.1-0.2 on a 2-vCPU host); 0.05 was tried in session 21 and the
# evidence was mixed (simulated dp capacity -8% to +11% over 17 traces; live A/Bs: better on Poisson, worse on
# bursts; bench/RESULTS.md, section 2, session 21), so 0.2 stays.
DEFAULT_ALPHA = 0.2


@dataclass
class CostModel:
    """Predicts batch seconds; `observe` refines it from real batches."""

    coef: list[float]  # seconds per batch, per sequence, per token, per squared token
    knots: list[float]  # token counts (ascending) where correction factors are kept
    factors: list[float]  # multiplicative correction at each knot
    key: dict = field(default_factory=dict)
    cells: list[Cell] = field(default_factory=list)
    alpha: float = DEFAULT_ALPHA  # EWMA weight of one observation
    observations: int = 0
    overrun: float = 0.0  # running OVERRUN_QUANTILE of log(observed / predicted); not saved (it describes
    #                       the conditions of this run, like a passing drift, not the runtime)
    scale: float = 1.0  # model-wide factor, a running median of observed / predicted; not saved, for the same reason
    anchor: list[float] = field(init=False, repr=False, compare=False)  # the factors as made or loaded
    _profiled: CostModel | None = field(default=None, init=False, repr=False, compare=False)  # profiled()'s, made once

    def __post_init__(self) -> None:
        self.anchor = list(self.factors)

    @classmethod
    def fit(cls, cells: Sequence[Cell], key: dict | None = None, alpha: float = DEFAULT_ALPHA) -> CostModel:
        """Fit the line to profiled cells, then per-knot factors to its residuals."""
        if not cells:
            raise ValueError("cannot fit a cost model to no cells")
        x = np.array([[1.0, c.n, c.tokens, c.sq_tokens] for c in cells])
        y = np.array([c.seconds for c in cells])
        coef = nonnegative_fit(x, y)
        base = x @ coef
        knots = sorted({float(c.tokens) for c in cells})
        factors = []
        for k in knots:  # geometric mean of observed/predicted of the cells at this token count
            ratios = [c.seconds / max(b, 1e-12) for c, b in zip(cells, base) if c.tokens == k]
            factors.append(float(np.exp(np.mean(np.log(ratios)))))
        return cls(list(map(float, coef)), knots, factors, dict(key or {}), list(cells), alpha)

    @classmethod
    def linear(cls, per_batch: float, per_token: float, per_sq_token: float = 0.0, per_sequence: float = 0.0) -> CostModel:
        """A hand-set model (tests, simulations without a device)."""
        return cls([per_batch, per_sequence, per_token, per_sq_token], [1.0], [1.0])

    def _factor(self, tokens):
        if len(self.knots) == 1:
            return self.factors[0]
        logt = np.log(np.maximum(np.asarray(tokens, dtype=np.float64), 1.0))
        return np.interp(logt, np.log(self.knots), self.factors)

    def predict(self, n, tokens, sq_tokens):
        """Seconds for batches of n sequences, `tokens` total tokens, `sq_tokens` sum of squared lengths
        (numpy arrays of one shape, or scalars)."""
        c0, c1, c2, c3 = self.coef
        return (c0 + c1 * np.asarray(n, dtype=np.float64) + c2 * np.asarray(tokens, dtype=np.float64)
                + c3 * np.asarray(sq_tokens, dtype=np.float64)) * (self._factor(tokens) * self.scale)

    def predict_one(self, n: float, tokens: float, sq_tokens: float) -> float:
        """Scalar `predict` in plain Python (no numpy call overhead: planners call it often)."""
        c0, c1, c2, c3 = self.coef
        base = (c0 + c1 * n + c2 * tokens + c3 * sq_tokens) * self.scale
        knots, factors = self.knots, self.factors
        if len(knots) == 1 or tokens <= knots[0]:
            return base * factors[0]
        if tokens >= knots[-1]:
            return base * factors[-1]
        hi = bisect.bisect_right(knots, tokens)
        lo = hi - 1
        w = (math.log(tokens) - math.log(knots[lo])) / (math.log(knots[hi]) - math.log(knots[lo]))
        return base * (factors[lo] + w * (factors[hi] - factors[lo]))

    def predict_lengths(self, lengths: Sequence[int]) -> float:
        """Seconds for one packed batch of sequences with these lengths."""
        return self.predict_one(len(lengths), sum(lengths), sum(x * x for x in lengths))

    def observe(self, lengths: Sequence[int], seconds: float) -> float:
        """Fold one measured batch into the knots around its token count and into `scale`; return the signed
        relative error of the prediction made before the update ((predicted - observed) / observed)."""
        predicted = self.predict_lengths(lengths)
        error = (predicted - seconds) / max(seconds, 1e-12)
        tokens = float(sum(lengths))
        ratio = seconds / max(predicted, 1e-12)
        if len(self.knots) == 1:
            weights = [1.0]
        else:
            pos = float(np.interp(math.log(max(tokens, 1.0)), np.log(self.knots), np.arange(len(self.knots))))
            lo = int(math.floor(pos))
            hi = min(lo + 1, len(self.knots) - 1)
            weights = [0.0] * len(self.knots)
            weights[lo] += 1.0 - (pos - lo)
            weights[hi] += pos - lo
        for i, wgt in enumerate(weights):
            if wgt > 0:
                a = self.alpha * wgt
                self.factors[i] *= math.exp(a * math.log(ratio))  # EWMA in log space
            else:
                self.factors[i] *= (self.anchor[i] / self.factors[i]) ** UNSEEN_DECAY
        side = SCALE_STEP if ratio > 1.0 else -SCALE_STEP if ratio < 1.0 else 0.0
        self.scale *= math.exp(side - SCALE_DECAY * math.log(self.scale))
        self.observations += 1
        # Stochastic-approximation quantile: moves up by STEP * q when a batch overran it, down by
        # STEP * (1 - q) otherwise, so it settles where a fraction q of batches stay below it.
        self.overrun += OVERRUN_STEP * (OVERRUN_QUANTILE - (math.log(ratio) < self.overrun))
        return error

    def pessimism(self) -> float:
        """How much longer than predicted a batch runs 1 time in 10, lately (>= 1): 1.0 for a model that
        has not overrun, e.g. one just profiled; on a CPU host that also handles the requests, 1.5-5."""
        return math.exp(max(0.0, self.overrun))

    def scaled(self, factor: float) -> CostModel:
        """The same model predicting `factor` times its batch seconds (a machine that runs slower or faster)."""
        return replace(self, coef=[c * factor for c in self.coef], knots=list(self.knots), factors=list(self.factors),
                       key=dict(self.key), cells=list(self.cells))

    def profiled(self) -> CostModel:
        """The model as profiled (made once, then kept): the fit of the saved cells, or the knots as made or loaded
        where no cells are kept; scale 1. What one batch shape costs against another, without the online
        refinement's wander: each knot's EWMA moves ~5% with batch times that scatter by 15%, and the differences
        between partitions that dp weighs are often smaller than that."""
        if self._profiled is None:
            base = self.measured() if self.cells else CostModel(list(self.coef), list(self.knots), list(self.anchor))
            self._profiled = CostModel(list(base.coef), list(base.knots), list(base.factors))
        return self._profiled

    def measured(self) -> CostModel:
        """The model as profiled, before any online refinement (self when no cells are kept)."""
        if not self.cells:
            return self
        return CostModel.fit(self.cells, self.key, self.alpha)

    def drift(self) -> float:
        """How far online refinement has moved the model from what was measured: the largest factor
        between a knot's refined and measured correction (1.0 = unchanged; 2.0 = twice or half)."""
        measured = self.measured().factors if self.cells else [1.0] * len(self.factors)
        return float(max(math.exp(abs(math.log(f / m))) for f, m in zip(self.factors, measured)))

    def to_json(self) -> dict:
        return {"coef": self.coef, "knots": self.knots, "factors": self.factors, "key": self.key,
                "cells": [asdict(c) for c in self.cells], "alpha": self.alpha, "observations": self.observations}

    @classmethod
    def from_json(cls, doc: dict) -> CostModel:
        return cls(list(doc["coef"]), list(doc["knots"]), list(doc["factors"]), dict(doc.get("key", {})),
                   [Cell(**c) for c in doc.get("cells", [])], float(doc.get("alpha", DEFAULT_ALPHA)), int(doc.get("observations", 0)))

    def save(self, path: str | Path) -> None:
        """Write the model to `path` atomically: a temporary file of its own in the same folder, then a rename, so a
        reader never sees half a file and two processes saving the same key never write into one temporary file.
        Raises OSError (a folder that cannot be made or written)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, 0o644)  # readable by all, as before (mkstemp's 0600 hid it from a server run as another user)
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.to_json(), indent=1))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        return cls.from_json(json.loads(Path(path).read_text()))

    def summary(self) -> dict:
        """What /info shows."""
        return {"coefficients_seconds": dict(zip(FEATURES, self.coef)), "knots_tokens": self.knots,
                "factors": [round(f, 4) for f in self.factors], "observations": self.observations,
                "overrun_p90_ratio": round(self.pessimism(), 4), "scale": round(self.scale, 4), "key": self.key}
