"""Before/after table of bench/results/s7/sims.sh: per setting, the cells (trace × load) where dp's goodput is
below 0.99× the best baseline's, dp's summed goodput, and dp's SLO capacity against fifo's.

    .venv/bin/python bench/results/s7/compare.py
"""

import json
from collections import defaultdict
from pathlib import Path

SIM = Path(__file__).parent / "sim"


def summary(path: Path):
    doc = json.loads((path / "simulation.json").read_text())
    cells = defaultdict(dict)
    for r in doc["rows"]:
        cells[r["distribution"], r["arrivals"], r["load"]][r["policy"]] = r["goodput"]
    lost = [k for k, v in cells.items() if v["dp"] < 0.99 * max(g for p, g in v.items() if p != "dp")]
    cap = defaultdict(dict)
    for r in doc["slo_capacity"]:
        cap[r["distribution"], r["arrivals"]][r["policy"]] = r["rps"]
    ratios = [v["dp"] / v["fifo"] for v in cap.values() if v.get("fifo")]
    return cells, lost, sum(v["dp"] for v in cells.values()), ratios


for setting in ("dev_slo2000", "dev_slo500", "host_slo2000", "host_slo500"):
    before, after = summary(SIM / f"before_{setting}"), summary(SIM / f"after_{setting}")
    moved = sum(abs(after[0][k]["dp"] - before[0][k]["dp"]) > 1e-9 for k in before[0])
    print(f"{setting:13} cells lost {len(before[1]):2} -> {len(after[1]):2}   dp goodput summed "
          f"{before[2]:9.2f} -> {after[2]:9.2f} ({after[2] / before[2] - 1:+.2%})   cells where dp moved {moved:3}"
          f"   capacity dp/fifo {min(before[3]):.2f}-{max(before[3]):.2f} -> {min(after[3]):.2f}-{max(after[3]):.2f}")
