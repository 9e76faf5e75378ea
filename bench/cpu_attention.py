"""CPU attention over packed sequences: one SDPA call a sequence (kernels.attention.varlen_attention_reference)
against the length groups of kernels/attention_groups.py, for one layer's attention and for the whole forward of
the embedded model, in float32 and bfloat16, on an idle machine and beside a process that keeps one core busy part
of the time (a server's event loop and clients share the cores with torch's threads).

    .venv/bin/python bench/cpu_attention.py                 # ~2 min
    .venv/bin/python bench/cpu_attention.py --overheads 0,1024,4096,16384   # the grouping's call cost, swept
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import kernels.attention as attention  # noqa: E402
import kernels.attention_groups as groups  # noqa: E402

MIXES = {  # name: (sequences, shortest, longest) of a batch
    "64 queries of 8-32 tokens": (64, 8, 32),
    "32 texts of 8-64 tokens": (32, 8, 64),
    "16 texts of 8-256 tokens": (16, 8, 256),
    "64 texts of 8-256 tokens": (64, 8, 256),
}
CALL_OVERHEAD = groups.CALL_OVERHEAD  # the shipped call cost, restored after each sweep
BURNER = "import time\nwhile True:\n    t = time.perf_counter()\n    while time.perf_counter() - t < {busy}: pass\n    time.sleep({idle})\n"


def per_call_ms(fn, repeats: int) -> float:
    """Median ms of `repeats` calls after two warm-up calls."""
    fn(), fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1e3


def per_sequence(q, k, v, cu, out=None, causal=False):
    """The one-call-a-sequence path with the grouped path's signature."""
    return attention.varlen_attention_reference(q, k, v, cu, out, causal=causal)


def interleaved(paths: dict, call, repeats: int) -> dict[str, float]:
    """Median ms of `call` with each attention path as the dispatcher's CPU path, the paths taking turns call by
    call (this VM's speed drifts by tens of percent over a minute: back-to-back blocks would compare two speeds)."""
    times = {label: [] for label in paths}
    try:
        for i in range(repeats + 2):
            for label, fn in paths.items():
                attention.varlen_attention_grouped = fn
                t = time.perf_counter()
                call()
                if i >= 2:  # two warm-up rounds
                    times[label].append(time.perf_counter() - t)
    finally:
        attention.varlen_attention_grouped = groups.varlen_attention_grouped
    return {label: sorted(ts)[len(ts) // 2] * 1e3 for label, ts in times.items()}


def grouped_with(overhead: float):
    """varlen_attention_grouped with plan_groups' call cost set to `overhead`; the layout cache is cleared once
    (a batch's layout is built once, not once a layer)."""
    groups.CALL_OVERHEAD = overhead
    groups._layout.cache_clear()

    def run(q, k, v, cu, out=None, causal=False):
        return groups.varlen_attention_grouped(q, k, v, cu, out, causal)
    return run


def layer(args) -> None:
    """One layer's attention (12 heads of 32, all-MiniLM-L6-v2's) per mix, dtype and grouping."""
    rng = random.Random(0)
    print(f"one layer's attention, 12 heads of 32, ms a call (median of {args.repeats}); torch threads {torch.get_num_threads()}")
    for name, (count, lo, hi) in MIXES.items():
        lengths = [rng.randint(lo, hi) for _ in range(count)]
        cu = [0]
        for n in lengths:
            cu.append(cu[-1] + n)
        for dtype in (torch.float32, torch.bfloat16):
            q, k, v = (torch.randn(cu[-1], 12, 32, dtype=dtype) for _ in range(3))
            ref = per_call_ms(lambda: attention.varlen_attention_reference(q, k, v, cu), args.repeats)
            cells = []
            for overhead in args.overheads:
                fn = grouped_with(overhead)
                calls = len(groups.plan_groups(tuple(lengths), overhead))
                cells.append(f"{overhead:>6}: {per_call_ms(lambda: fn(q, k, v, cu), args.repeats):6.2f} ({calls:2} calls)")
            grouped_with(CALL_OVERHEAD)  # the shipped cost again, for forward()
            print(f"  {name:26} {str(dtype)[6:]:9} per sequence {ref:6.2f} | " + " | ".join(cells), flush=True)


def forward(args) -> None:
    """The embedded model's forward over batches of each mix, per dtype, with and without grouping, idle and beside
    a process busy 25% of one core."""
    from models.config import default_model_path  # noqa: PLC0415
    from models.runtime import load_model  # noqa: PLC0415

    rng = random.Random(1)
    batches = {name: [[101] + [rng.randint(1000, 20000) for _ in range(rng.randint(lo, hi) - 2)] + [102] for _ in range(count)]
               for name, (count, lo, hi) in MIXES.items()}  # token ids, [CLS] ... [SEP]
    print(f"\nall-MiniLM-L6-v2 forward, ms a batch (median of {args.repeats}, the two paths taking turns)")
    for dtype in ("float32", "bfloat16"):
        emb, _, _ = load_model(str(default_model_path()), dtype=dtype)
        for name, batch in batches.items():
            row = []
            for busy in (0.0, 0.25):
                burner = None
                if busy:
                    burner = subprocess.Popen([sys.executable, "-c", BURNER.format(busy=0.002 * busy / 0.1, idle=0.002 * (1 - busy) / 0.1)])
                    time.sleep(0.3)
                try:
                    cells = interleaved({"per sequence": per_sequence, "grouped": groups.varlen_attention_grouped},
                                        lambda: emb.embed(batch), args.repeats)
                finally:
                    if burner:
                        burner.kill()
                        burner.wait()
                row.append(f"{'busy 25%' if busy else 'idle':8} per sequence {cells['per sequence']:7.1f} grouped "
                           f"{cells['grouped']:7.1f} ({cells['per sequence'] / cells['grouped']:.2f}x)")
            print(f"  {name:26} {dtype:9} " + " | ".join(row), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--overheads", default="0,1024,4096,16384", help="plan_groups call costs to sweep (L**2 units)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--skip-forward", action="store_true")
    ap.add_argument("--skip-layer", action="store_true")
    args = ap.parse_args()
    args.overheads = [float(x) for x in args.overheads.split(",")]
    if not args.skip_layer:
        layer(args)
    if not args.skip_forward:
        forward(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
