"""Session 29: hash of every key and row a DeviceCache holds after a 60-batch Criteo trace (lru, lfu, tinylfu): run before and
after a change to the insert path, the outputs must be equal."""
import sys, hashlib; sys.path.insert(0, '/work/main')
import numpy as np, torch
from bench.cache_trace import criteo_cardinalities, make_trace
from embeddings.device_cache import DeviceCache
from embeddings.tier import TableSpec
out = []
for policy in ("lru", "lfu", "tinylfu"):
    cards = criteo_cardinalities(0.01)
    c = DeviceCache(0.05, 4, policy, "cpu")
    names = [f"C{i+1}" for i in range(26)]
    for n, r in zip(names, cards): c.create_table(TableSpec(n, 4, rows=int(r)))
    trace = make_trace(cards, batches=60, batch_size=512, alpha=1.05, seed=1)
    for b in range(60):
        req = {n: torch.from_numpy(np.unique(trace.keys[i][b*512:(b+1)*512])) for i, n in enumerate(names)}
        got = c.lookup_many(req)
        miss = {n: req[n][~got[n][1]] for n in names}
        c.insert_many({n: (k, k[:, None].float().repeat(1, 4)) for n, k in miss.items() if k.numel()}, unique=True)
    h = hashlib.sha256()
    for pool in c._pools.values():
        h.update(pool.keys.numpy().tobytes()); h.update(pool.values.numpy().tobytes())
    out.append(f"{policy} {h.hexdigest()[:16]} {c.counters()}")
print("\n".join(out))
