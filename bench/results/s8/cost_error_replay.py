"""Can the server's cost model predict live batches on this 2-core host within 10% (issue 3's target)? Replayed
offline on the 18 recorded live runs of session 6 (bench/results/s6/live_*: trace, answers, the server's start
model), batch by batch as the server sees them (bench/host_load.py puts the batches back together):

- base: the server's model as it runs (per-knot EWMA, alpha 0.2), and the same with alpha 0.05 / 0.5;
- host: plus a host-load term the server could predict with: t = (m + c * after) / (1 - a * lambda), lambda the
  arrival rate of the last tau seconds before the batch, a and c (seconds an arrival / an answer of the batch
  before) fitted online (least squares with forgetting) on the runtime part's residuals, which the EWMA then
  refines without them;
- oracle: m + a * (arrivals during the batch) + c * after: the host term knowing the future (not a prediction).

    .venv/bin/python bench/results/s8/cost_error_replay.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from bench.host_load import live_batches  # noqa: E402
from scheduler.cost_model import CostModel  # noqa: E402


def recorded_runs():
    for folder in sorted((ROOT / "bench/results/s6").glob("live_*")):
        if not (folder / "live_policies.json").exists():
            continue
        report = json.loads((folder / "live_policies.json").read_text())
        for i, run in enumerate(report["runs"]):
            policy, load = run["live"]["policy"], run["load"]
            trace, answers = folder / f"trace-{load}.json", folder / f"answers-{load}-{policy}-{i}.json"
            if trace.exists() and answers.exists() and run.get("start_model"):
                records = json.loads(answers.read_text())
                batches = live_batches(records, json.loads(trace.read_text())["lengths"])
                if len(batches) >= 10:
                    yield f"{folder.name} {policy} {load}", records, batches, run["start_model"]


def replay(records, batches, start_model, tau: float, alpha: float = 0.2, forget: float = 0.98):
    """Median |error| of base, host and oracle predictions over one run's batches."""
    taken_in = np.sort(np.array([r["received"] - r["total"] for r in records if r["status"] == 200]))
    base, host = CostModel.from_json(start_model), CostModel.from_json(start_model)
    base.alpha = alpha
    gram, rhs, (a, c) = np.eye(2) * 1e-6, np.zeros(2), (0.0, 0.0)
    errors = {"base": [], "host": [], "oracle": []}
    for b in batches:
        observed = b.end - b.start
        errors["base"].append(abs(base.predict_lengths(b.lengths) - observed) / observed)
        base.observe(b.lengths, observed)
        rate = (np.searchsorted(taken_in, b.start) - np.searchsorted(taken_in, b.start - tau)) / tau
        m = host.predict_lengths(b.lengths)
        errors["host"].append(abs((m + c * b.after) / (1 - min(a * rate, 0.8)) - observed) / observed)
        errors["oracle"].append(abs(m + a * b.arrivals + c * b.after - observed) / observed)
        x = np.array([b.arrivals, b.after], dtype=float)
        gram, rhs = forget * gram + np.outer(x, x), forget * rhs + x * (observed - m)
        a, c = np.maximum(np.linalg.solve(gram + np.eye(2) * 1e-9, rhs), 0.0)
        host.observe(b.lengths, max(observed - a * b.arrivals - c * b.after, 0.2 * observed))
    return {k: float(np.median(v)) for k, v in errors.items()}


def main() -> int:
    runs = list(recorded_runs())
    print(f"{len(runs)} recorded live runs, {sum(len(b) for _, _, b, _ in runs)} batches")
    for alpha in (0.05, 0.2, 0.5):
        rows = [replay(rec, b, sm, tau=1.0, alpha=alpha) for _, rec, b, sm in runs]
        base = [r["base"] for r in rows]
        print(f"base, alpha {alpha}: median over runs {np.median(base):.1%}; runs within 10%: {sum(x <= .1 for x in base)}")
    for tau in (0.25, 0.5, 1.0, 2.0):
        rows = [replay(rec, b, sm, tau=tau) for _, rec, b, sm in runs]
        host, oracle = [r["host"] for r in rows], [r["oracle"] for r in rows]
        print(f"host term, tau {tau} s: median over runs {np.median(host):.1%}, better than base in "
              f"{sum(r['host'] < r['base'] for r in rows)}; runs within 10%: {sum(x <= .1 for x in host)}; "
              f"oracle {np.median(oracle):.1%}, within 10%: {sum(x <= .1 for x in oracle)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
