"""Session 29: DeviceCache.insert_many time a DLRM batch (26 Criteo tables x 0.1, 5% cache, 16 ways), batches 200-400."""
import sys, time; sys.path.insert(0, '/work/main')
import numpy as np, torch
torch.set_num_threads(1)
from bench.cache_trace import criteo_cardinalities, make_trace
from embeddings.device_cache import DeviceCache
from embeddings.tier import TableSpec
cards = criteo_cardinalities(0.1)
c = DeviceCache(0.05, 16, "lru", "cpu")
names = [f"C{i+1}" for i in range(26)]
for n, r in zip(names, cards): c.create_table(TableSpec(n, 16, rows=int(r)))
trace = make_trace(cards, batches=400, batch_size=1024, alpha=1.05, seed=1)
ins = 0.0
for b in range(400):
    req = {n: torch.from_numpy(np.unique(trace.keys[i][b*1024:(b+1)*1024])) for i, n in enumerate(names)}
    got = c.lookup_many(req)
    miss = {n: req[n][~got[n][1]] for n in names}
    rows = {n: (k, k[:, None].float().repeat(1, 16)) for n, k in miss.items() if k.numel()}
    t = time.perf_counter(); c.insert_many(rows, unique=True)
    if b >= 200: ins += time.perf_counter() - t
print(f"insert_many {ins/200*1e3:.2f} ms a batch")
