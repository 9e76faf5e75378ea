"""Session 29's DLRM A/B table: median (range) over the three rounds of bench/results/s29/dlrm_ab.sh."""
import json
import sys
from pathlib import Path

import numpy as np

root = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results/s29/ab")
print("| version | cache | e2e ratio | lookups alone | lookup ms a batch, server / persistent | batch ms, server / persistent |")
print("|---|---|---|---|---|---|")
KINDS = (("old", "415753e (session start)"), ("new", "new, fills on misses"), ("preload", "new, preloaded (1.0)"),
         ("bf16", "new, preloaded, bfloat16"))
for kind, label in [k for k in KINDS if (root / f"{k[0]}_1").exists()]:
    runs = [json.loads((root / f"{kind}_{r}" / "embedding_cache.json").read_text())["dlrm"] for r in (1, 2, 3)]
    for i, frac in enumerate(x["cache_fraction"] for x in runs[0]):
        got = [run[i] for run in runs]

        def med(key, fmt="{:.2f}"):
            v = np.array([g[key] for g in got])
            return fmt.format(np.median(v)) + " (" + fmt.format(v.min()) + "-" + fmt.format(v.max()) + ")"
        ms = lambda key: f"{np.median([g[key] for g in got]):.1f}"  # noqa: E731
        print(f"| {label} | {frac:.0%} | **{med('ratio')}x** | {med('lookup_ratio')}x | "
              f"{ms('server_lookup_ms_per_batch')} / {ms('persistent_lookup_ms_per_batch')} | "
              f"{ms('server_ms_per_batch')} / {ms('persistent_ms_per_batch')} |")
others = [json.loads((root / f"{k}_{r}" / "embedding_cache.json").read_text())["dlrm"][i]["phase"]["other_share"]
          for k, _ in KINDS if (root / f"{k}_1").exists() for r in (1, 2, 3) for i in (0, 1)]
print(f"\nother processes' share of the CPU in the timed phases: max {max(others)}")
