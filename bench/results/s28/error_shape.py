"""Session 28: the live cost model's log(observed / predicted) by batch size, by requests taken in during the batch,
and by tokens, each batch predicted before it is observed, as the server refines its model. usage: error_shape.py FOLDER"""
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from bench.sim_fidelity import load_folder
from scheduler.cost_model import CostModel
d = load_folder(Path(sys.argv[1]))
rows = []
for run in d["runs"]:
    model = CostModel.from_json(d["planner"].to_json())
    for b in run["batches"]:
        s = b.end - b.start
        p = model.predict_lengths(b.lengths)
        rows.append((len(b.lengths), sum(b.lengths), b.arrivals, math.log(s / p), s))
        model.observe(b.lengths, s)
def show(key, edges, name):
    print(name)
    for lo, hi in zip(edges, edges[1:]):
        sel = [r for r in rows if lo <= key(r) < hi]
        if sel:
            lr = [r[3] for r in sel]
            print(f"  [{lo},{hi}) n={len(sel):4d} median log(obs/pred) {statistics.median(lr):+.3f}  median |err| {statistics.median(abs(math.exp(-x) - 1) for x in lr):.3f}  mean s {statistics.mean(r[4] for r in sel)*1e3:.0f} ms")
show(lambda r: r[0], [1, 2, 4, 8, 16, 32, 48, 65], "by sequences")
show(lambda r: r[2], [0, 1, 3, 10, 30, 100, 10000], "by arrivals during")
show(lambda r: r[1], [0, 100, 300, 1000, 2000, 4000, 20000], "by tokens")
