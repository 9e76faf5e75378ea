"""Session 28: the live cost model's error on English bursts, replayed over a live_capacity folder's runs.
Each run's batches (bench/host_load.live_batches: lengths, time, requests taken in while it ran) through the model
the servers started with, predicted before each is observed (the server's metric), as the server refines it, and
variants that take each arrival's host work out of what the model learns (`--per-arrival-ms`), then predict it for
none of the arrivals to come (`quiet`) or for the recent rate's (`expected`).
usage: error_replay.py FOLDER... [--per-arrival-ms MS]"""
import argparse
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from bench.sim_fidelity import load_folder  # noqa: E402
from scheduler.cost_model import CostModel  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("folders", nargs="+", type=Path)
ap.add_argument("--per-arrival-ms", type=float, default=0.8)
args = ap.parse_args()
a = args.per_arrival_ms / 1000


def replay(start: CostModel, batches, mode: str) -> float:
    model = CostModel.from_json(start.to_json())
    errors, recent, logs = [], [], []
    for b in batches:
        seconds = b.end - b.start
        base = model.predict_lengths(b.lengths)
        if mode == "server":
            predicted = base
        elif mode.startswith("last"):  # times the median observed / predicted of the last k batches
            k = int(mode[4:])
            predicted = base * (math.exp(statistics.median(logs[-k:])) if logs else 1.0)
        elif mode == "quiet":
            predicted = base
        elif mode == "prev":  # the arrival rate of the batch just before (a burst being taken in goes on)
            rate = recent[-1][1] / recent[-1][2] if recent else 0.0
            predicted = base / max(0.2, 1 - a * rate)
        else:  # expected: arrivals a second over the last 2 s of batches, times the batch
            rate = sum(n for t, n, _ in recent if t > b.start - 2.0) / 2.0
            predicted = base / max(1e-6, 1 - a * rate)  # each arrival during it adds a, and it lasts longer for them
        errors.append(abs(predicted - seconds) / seconds)
        logs.append(math.log(seconds / predicted) + (math.log(predicted / base)))
        learned = seconds if mode == "server" or mode.startswith("last") else max(seconds - a * b.arrivals, 0.2 * seconds)
        model.observe(b.lengths, learned)
        recent.append((b.end, b.arrivals, seconds))
    return statistics.median(errors)


for folder in args.folders:
    d = load_folder(folder)
    rows = {m: [] for m in ("server", "quiet", "expected", "prev")}
    for run in d["runs"]:
        if not run["batches"]:
            continue
        for m in rows:
            rows[m].append(replay(d["planner"], run["batches"], m))
    live = [r["live"]["cost_model_error"].get("median_abs", float("nan")) for r in d["runs"]]
    print(f"{folder.name}: {len(live)} runs; live metric median of medians {statistics.median(live):.1%}; replayed: "
          + ", ".join(f"{m} {statistics.median(v):.1%} ({sum(x <= 0.10 for x in v)} <= 10%)" for m, v in rows.items()))
