"""Planning time of every policy for 1,000 pending requests (no model, no server).

    .venv/bin/python bench/planner_speed.py [--pending 1000] [--repeats 50]

Four cases for dp: no deadlines, deadlines all can meet, overload (most deadlines already lost), and the same
overload as requests of 8 inputs; each as the whole plan and as the worker plans (`next only`: up to the batch
it runs next).
Wall-clock median and p90 per call, and the median CPU time of the planning thread: on a shared machine
the wall time also counts the time other processes held the core, the CPU time does not.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scheduler.cost_model import CostModel  # noqa: E402
from scheduler.planner import Limits, PolicyConfig, Request, plan  # noqa: E402

COST = CostModel.linear(0.0127, 0.000247, 4e-7, 0.000243)  # shape measured on the 2-core CPU


def cases(n: int, rng: random.Random) -> dict[str, list[Request]]:
    lengths = [rng.randint(8, 256) for _ in range(n)]
    return {
        "no deadlines": [Request(x) for x in lengths],
        "loose deadlines": [Request(x, 0.0, rng.uniform(60, 120)) for x in lengths],
        "overload": [Request(x, 0.0, rng.uniform(0.5, 5)) for x in lengths],
        # the same lengths as client requests of 8 inputs each (one deadline a request)
        "overload, 8 inputs": [Request(x, 0.0, due, group=i // 8) for i, (x, due) in
                               enumerate(zip(lengths, [rng.uniform(0.5, 5) for _ in range(0, n, 8)
                                                       for _ in range(8)]))],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pending", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    limits = Limits(16384, 64)
    rng = random.Random(0)
    print(f"{'policy':14} {'case':20} {'median ms':>10} {'p90 ms':>8} {'cpu ms':>8}")
    for case, requests in cases(args.pending, rng).items():
        for name in ("dp", "dp next only", "token_budget", "fifo", "triton", "sort_slice"):
            if not name.startswith("dp") and case != "no deadlines":
                continue
            times, cpu = [], []
            for _ in range(args.repeats):
                started, cpu_started = time.perf_counter(), time.thread_time()
                plan(requests, limits, COST, 0.0, PolicyConfig(name.split()[0]), next_only=name.endswith("next only"))
                times.append((time.perf_counter() - started) * 1000)
                cpu.append((time.thread_time() - cpu_started) * 1000)
            times.sort()
            print(f"{name:14} {case:20} {statistics.median(times):10.2f} {times[int(0.9 * len(times))]:8.2f}"
                  f" {statistics.median(cpu):8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
