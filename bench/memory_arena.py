"""Memory arena benchmark: planned footprint vs the lifetime lower bound vs plan-less allocation.

Over a trace of variable-length batches (corpus-length sequences, 1-64 a batch, at most 16,384
tokens), for all-MiniLM-L6-v2 and a BERT-base-sized encoder (random weights from a config):

- the lower bound (peak of live bytes, at the batch's real token count) vs the plan's peak (the
  bytes it touches, planned for the token bucket) vs the arena's reserved chunks;
- the bytes a plan-less forward asks torch for (sum of allocations) and, on a GPU with --run,
  torch's caching allocator (`torch.cuda.max_memory_reserved`) for the same trace;
- chunk allocations on a cold pass and on a second, warm pass; planning time on hits and misses.

    python bench/memory_arena.py                      # plans only (fast), both models, CPU
    python bench/memory_arena.py --run 60             # also run 60 batches both ways (checks equality)
    PYTHONPATH=. python3 bench/memory_arena.py --device cuda --dtype float16 --run 200   # on a GPU
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kernels.arena import Arena, FreshWorkspace, record_lifetimes, token_bucket  # noqa: E402
from models.config import EncoderConfig  # noqa: E402
from models.encoder import PackedBatch, PackedEncoder  # noqa: E402

MAX_TOKENS = 16384
BERT_BASE = dict(model_type="bert", vocab_size=30522, hidden_size=768, num_heads=12, num_layers=12, intermediate_size=3072,
                 max_positions=512, type_vocab_size=2, layer_norm_eps=1e-12, activation="gelu")
MINILM = dict(BERT_BASE, hidden_size=384, num_layers=6, intermediate_size=1536)


def build(name: str, device: str, dtype: torch.dtype) -> PackedEncoder:
    """The named encoder with seeded random weights (sizes are all the arena depends on)."""
    torch.manual_seed(0)
    model = PackedEncoder(EncoderConfig(**(MINILM if name == "minilm" else BERT_BASE)))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model.eval().to(device=device, dtype=dtype)


def lengths_source(seed: int):
    """Sequence lengths from the English corpus workload when its tokenizer is here, else log-normal."""
    try:
        from bench.workload import target_lengths  # noqa: PLC0415

        pool = target_lengths(4000, 8, 256, seed)
        kind = "corpus (bench/workload.py)"
    except Exception:  # noqa: BLE001 - no MiniLM tokenizer on this machine
        rng = np.random.default_rng(seed)
        pool = np.clip(rng.lognormal(np.log(60), 0.7, 4000), 8, 256).astype(int).tolist()
        kind = "log-normal (median 60, 8-256)"
    return pool, kind


def make_trace(batches: int, seed: int) -> tuple[list[list[int]], str]:
    """Batches of 1-64 sequences; a batch stops short of MAX_TOKENS."""
    pool, kind = lengths_source(seed)
    rng = random.Random(seed)
    trace = []
    for _ in range(batches):
        lengths: list[int] = []
        for _ in range(rng.randint(1, 64)):
            n = rng.choice(pool)
            if sum(lengths) + n > MAX_TOKENS:
                break
            lengths.append(n)
        trace.append(lengths)
    return trace, kind


def plan_pass(arena: Arena, trace: list[list[int]]) -> dict:
    """Plan every batch of the trace once; footprints and timings."""
    life = arena.lifetimes
    before = arena.stats.chunk_allocations
    hits, misses, ratios, rows = [], [], [], []
    peak_reserved = 0
    for lengths in trace:
        tokens = sum(lengths)
        missed = arena.stats.plan_misses
        started = time.perf_counter()
        with arena.batch(tokens) as ws:
            elapsed = time.perf_counter() - started
            plan = arena.plan(tokens)  # the cached plan this batch got
            del ws
        (misses if arena.stats.plan_misses > missed else hits).append(elapsed)
        lb = life.lower_bound(tokens)
        peak_reserved = max(peak_reserved, arena.reserved_bytes)
        ratios.append(plan.peak_bytes / lb)
        rows.append((tokens, lb, plan.peak_bytes, sum(life.sizes(tokens))))
    tokens, lbs, peaks, sums = (np.array(c) for c in zip(*rows))
    ms = lambda xs, q: 1e3 * float(np.percentile(xs, q)) if xs else float("nan")  # noqa: E731
    return {"batches": len(trace), "chunk_allocations": arena.stats.chunk_allocations - before,
            "max_lower_bound": int(lbs.max()), "max_planned_peak": int(peaks.max()), "max_reserved": int(peak_reserved),
            "max_sum_of_allocations": int(sums.max()), "mean_planned_over_lb": float(np.mean(ratios)),
            "max_planned_over_lb": float(np.max(ratios)), "mean_tokens": float(tokens.mean()),
            "hit_ms_p50": ms(hits, 50), "hit_ms_p99": ms(hits, 99), "hits": len(hits),
            "miss_ms_p50": ms(misses, 50), "miss_ms_p99": ms(misses, 99), "miss_ms_max": ms(misses, 100), "misses": len(misses)}


@torch.inference_mode()
def run_pass(model: PackedEncoder, arena: Arena, trace: list[list[int]], device: str) -> dict:
    """Run the batches both ways: plan-less (torch's allocator) and in the arena; outputs must agree."""
    rng = random.Random(5)
    batches = [PackedBatch.from_ids([[rng.randrange(1000, 20000) for _ in range(n)] for n in lengths], 0, device)
               for lengths in trace]
    cuda = device.startswith("cuda")
    times = {"fresh": [], "arena": []}
    base = 0
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_reserved()  # weights, inputs, and the arena if it holds chunks now
    allocated = 0
    for batch in batches:  # plan-less
        started = time.perf_counter()
        ws = FreshWorkspace()
        model(batch, ws)
        if cuda:
            torch.cuda.synchronize()
        times["fresh"].append(time.perf_counter() - started)
        allocated = max(allocated, ws.allocated_bytes)
    torch_reserved = torch.cuda.max_memory_reserved() - base if cuda else None
    stats = torch.cuda.memory_stats() if cuda else {}
    fresh_mallocs = stats.get("num_device_alloc")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    worst = 0.0
    for batch in batches:  # the arena, and the same outputs
        started = time.perf_counter()
        with arena.batch(batch.input_ids.shape[0]) as ws:
            got = model(batch, ws)
            if cuda:
                torch.cuda.synchronize()
            times["arena"].append(time.perf_counter() - started)
            want = model(batch, FreshWorkspace())
            worst = max(worst, float((got.float() - want.float()).abs().max()))
    median = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    return {"run_batches": len(batches), "max_abs_diff_vs_planless": worst, "fresh_ms_median": median["fresh"],
            "arena_ms_median": median["arena"], "max_allocated_planless": allocated,
            "torch_max_reserved": torch_reserved, "torch_device_allocs_planless": fresh_mallocs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="minilm,bert-base")
    parser.add_argument("--batches", type=int, default=1000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--run", type=int, default=0, help="also run this many batches of the trace both ways")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    trace, kind = make_trace(args.batches, args.seed)
    results = {"device": args.device, "dtype": args.dtype, "lengths": kind, "batches": args.batches, "models": {}}
    for name in args.models.split(","):
        model = build(name, args.device, getattr(torch, args.dtype))
        with torch.inference_mode():
            started = time.perf_counter()
            life = record_lifetimes(model.record_forward)
            record_ms = 1e3 * (time.perf_counter() - started)
        gc.freeze()  # as the server does after loading: no gen-2 pass over start-up objects inside a timed plan
        arena = Arena(life, args.device)
        cold = plan_pass(arena, trace)
        warm = plan_pass(arena, trace)
        entry = {"intermediates": len(life), "record_ms": record_ms, "cold": cold, "warm": warm,
                 "distinct_buckets": len({token_bucket(sum(b)) for b in trace}), "final_reserved": arena.reserved_bytes}
        if args.run:
            entry["run"] = run_pass(model, arena, trace[:args.run], args.device)
            entry["run"]["arena_reserved"] = arena.reserved_bytes
        results["models"][name] = entry
    mib = lambda b: f"{b / 2**20:8.1f}"  # noqa: E731
    print(f"trace: {args.batches} batches, lengths {kind}, mean {np.mean([sum(b) for b in trace]):.0f} tokens a batch; "
          f"device {args.device} {args.dtype}")
    print(f"{'model':10} {'LB MiB':>8} {'plan MiB':>8} {'arena MiB':>9} {'plan/LB':>7} {'arena/LB':>8} {'Σalloc MiB':>10} "
          f"{'chunks cold/warm':>16} {'hit ms p50/p99':>15} {'miss ms p50/p99/max':>20}")
    for name, e in results["models"].items():
        c, w = e["cold"], e["warm"]
        print(f"{name:10} {mib(c['max_lower_bound'])} {mib(c['max_planned_peak'])} {mib(c['max_reserved']):>9} "
              f"{c['max_planned_peak'] / c['max_lower_bound']:7.3f} {c['max_reserved'] / c['max_lower_bound']:8.3f} "
              f"{mib(c['max_sum_of_allocations']):>10} {c['chunk_allocations']:>8}/{w['chunk_allocations']:<7} "
              f"{w['hit_ms_p50']:6.3f}/{w['hit_ms_p99']:<7.3f} {c['miss_ms_p50']:6.2f}/{c['miss_ms_p99']:.2f}/{c['miss_ms_max']:<8.2f}")
        print(f"{'':10} per batch plan/LB mean {c['mean_planned_over_lb']:.3f} max {c['max_planned_over_lb']:.3f}; "
              f"{e['distinct_buckets']} buckets, {c['misses']} cold misses, warm misses {w['misses']}")
        if "run" in e:
            r = e["run"]
            torch_line = "" if r["torch_max_reserved"] is None else \
                f"; torch caching allocator peak reserved {mib(r['torch_max_reserved'])} MiB (arena {mib(r['arena_reserved'])} MiB)"
            print(f"{'':10} ran {r['run_batches']} batches: median {r['fresh_ms_median']:.1f} ms plan-less vs "
                  f"{r['arena_ms_median']:.1f} ms arena, max |diff| {r['max_abs_diff_vs_planless']:.2e}{torch_line}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"memory_arena_{args.device.split(':')[0]}.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
