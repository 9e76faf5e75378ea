"""Print bench/simulate.py's summaries again from a finished run's simulation.json (and redraw its PNGs), e.g. after a
fix to the summary: usage resummarize.py FOLDER"""
import json, sys
from pathlib import Path
sys.path.insert(0, "/work/main")
from bench.simulate import plot, plot_capacity, summarize, summarize_capacity

folder = Path(sys.argv[1])
doc = json.loads((folder / "simulation.json").read_text())
summarize(doc["rows"], doc["slo_s"])
summarize_capacity(doc["slo_capacity"])
plot(doc["rows"], folder / "simulation.png", doc["slo_s"])
plot_capacity(doc["slo_capacity"], folder / "slo_capacity.png", doc["slo_s"])
