"""What session 19's live batch-time errors are made of, replayed offline (bench/RESULTS.md section 2, "Session 19").

    .venv/bin/python bench/results/s19/cost_error_replay.py            # replays batches*.json
    .venv/bin/python bench/results/s19/cost_error_replay.py --from OUT batches-raw.json FOLDER ...   # rebuild one
        from `bench/live_policies.py --out` folders (trace, answers, live_policies.json)

batches.json: the live batches of 8 runs with httpx's client (dp and fifo, 1 and 2 torch threads, 12 and 22
requests/s, bursts of 16, SLO 1 s); batches-raw.json: the 30 runs of the three live_policies commands with
bench/rawclient.py (bench/results/s19/live_*). Both put back together by bench/host_load.live_batches, with the model
each server started with. The session 6 runs of the AMD VM (bench/results/s6/live_*) are replayed beside them.

1. The server's model with the per-knot EWMA alone (as before 82fbc88), against the same plus a model-wide scale
   that either takes `share` of every batch's log error (the knots the rest), or moves by `step` (log units) toward
   each batch's side of its prediction (a running median; the knots see the whole error), and against the model as
   the server now runs it (its own median scale, drifting back to 1: step 0.01, decay 0.005): does a bias common
   to all batch sizes explain the error?
2. Observed / profiled batch time by batch size and by requests taken in during the batch; the extra seconds per
   such arrival (least squares).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from bench.host_load import live_batches  # noqa: E402
from scheduler import cost_model  # noqa: E402
from scheduler.cost_model import CostModel  # noqa: E402

HERE = Path(__file__).resolve().parent


def from_folders(folders: list[Path], min_batches: int = 0) -> list[dict]:
    """The runs of `bench/live_policies.py --out` folders: answers-<load>-<policy>-<run index>.json (or, in a folder
    a later command reused, that policy's last), with the trace's lengths and the run's start model; runs with no
    answers or start model, or fewer than `min_batches` batches, are left out."""
    runs = []
    for folder in folders:
        report = json.loads((folder / "live_policies.json").read_text())
        for i, run in enumerate(report["runs"]):
            policy, load = run["live"]["policy"], run["load"]
            answers = folder / f"answers-{load}-{policy}-{i}.json"
            if not answers.exists():
                answers = max(folder.glob(f"answers-{load}-{policy}-*.json"), default=None)
            trace = folder / f"trace-{load}.json"
            if answers is None or not trace.exists() or not run.get("start_model"):
                continue
            batches = live_batches(json.loads(answers.read_text()), json.loads(trace.read_text())["lengths"])
            if len(batches) >= min_batches:
                runs.append({"run": f"{folder.name} {policy}", "start_model": run["start_model"],
                             "batches": [[b.lengths, b.end - b.start, b.arrivals] for b in batches]})
    return runs


def replay(run: dict, share: float = 0.0, step: float = 0.0, knots_only: bool = False) -> tuple[float, float]:
    """(median |error|, median signed error) of one run's batches, predicted before each is observed; knots_only:
    the server's model without its own scale (as before 82fbc88), which the other variants start from."""
    saved = cost_model.SCALE_STEP, cost_model.SCALE_DECAY
    if knots_only or share or step:
        cost_model.SCALE_STEP = cost_model.SCALE_DECAY = 0.0
    try:
        return _replay(run, share, step)
    finally:
        cost_model.SCALE_STEP, cost_model.SCALE_DECAY = saved


def _replay(run: dict, share: float, step: float) -> tuple[float, float]:
    model, scale = CostModel.from_json(run["start_model"]), 1.0
    errors = []
    for lengths, seconds, _ in run["batches"]:
        base = model.predict_lengths(lengths)
        ratio = seconds / (scale * base)
        errors.append(scale * base / seconds - 1)
        if step:
            scale *= np.exp(step if ratio > 1 else -step if ratio < 1 else 0.0)
            model.observe(lengths, base * ratio)  # the knots see the whole error
        else:
            scale *= ratio ** share
            model.observe(lengths, base * ratio ** (1 - share))  # the knots see what the scale did not take
    return float(np.median(np.abs(errors))), float(np.median(errors))


def breakdown(runs: list[dict]) -> None:
    rows = [(len(lengths), seconds, arrivals, CostModel.from_json(r["start_model"]).predict_lengths(lengths))
            for r in runs for lengths, seconds, arrivals in r["batches"]]
    n, seconds, arrivals, profiled = (np.array(c, dtype=float) for c in zip(*rows))
    ratio = np.log(seconds / profiled)
    for lo, hi in ((1, 1), (2, 3), (4, 7), (8, 15), (16, 64)):
        pick = (n >= lo) & (n <= hi)
        if pick.any():
            q = np.exp(np.percentile(ratio[pick], [25, 50, 75]))
            print(f"    {lo}-{hi} sequences: {pick.sum():4d} batches, observed / profiled {q[1]:.2f} (IQR {q[0]:.2f}-{q[2]:.2f})")
    for lo, hi in ((0, 0), (1, 15), (16, 10_000)):
        pick = (arrivals >= lo) & (arrivals <= hi)
        if pick.any():
            print(f"    {lo}-{hi} requests taken in during the batch: {pick.sum():4d} batches, observed / profiled "
                  f"{np.exp(np.median(ratio[pick])):.2f}")
    coef, *_ = np.linalg.lstsq(np.c_[arrivals, np.ones_like(arrivals)], seconds - profiled, rcond=None)
    print(f"    beyond the profile: {coef[0] * 1000:.1f} ms per request taken in during the batch, {coef[1] * 1000:.1f} ms a batch")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="source", nargs="+", metavar=("NAME", "FOLDER"),
                    help="write NAME (batches.json or batches-raw.json) here from these --out folders, then replay")
    args = ap.parse_args()
    if args.source:
        name, *folders = args.source
        (HERE / name).write_text(json.dumps(from_folders([Path(f) for f in folders])))
    s6 = [f for f in sorted((ROOT / "bench/results/s6").glob("live_*")) if (f / "live_policies.json").exists()]
    for name, runs in (("this VM, httpx client (session 19)", json.loads((HERE / "batches.json").read_text())),
                       ("this VM, raw client (session 19)", json.loads((HERE / "batches-raw.json").read_text())),
                       ("AMD VM, httpx client (session 6)", from_folders(s6, min_batches=10))):
        print(f"{name}: {len(runs)} runs, {sum(len(r['batches']) for r in runs)} batches")
        for label, kw in (("knots only (before)", {"knots_only": True}), ("as the server runs", {}), *((f"scale share {x}", {"share": x}) for x in (0.05, 0.1, 0.2)),
                          *((f"scale step {x}", {"step": x}) for x in (0.005, 0.01, 0.02))):
            out = [replay(r, **kw) for r in runs]
            med = [m for m, _ in out]
            print(f"  {label:18}: median |error| over runs {np.median(med):.1%} (runs within 10%: "
                  f"{sum(m <= 0.1 for m in med)}), signed {np.median([s for _, s in out]):+.1%}")
        breakdown(runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
