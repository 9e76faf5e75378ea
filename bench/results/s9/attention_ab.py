"""Session 9: per-sequence CPU attention with 3-D views (before 1f11236: SDPA's math path) against 4-D views
(after: the CPU flash kernel), at all-MiniLM-L6-v2's shapes (12 heads of 32), over the loadgen workload's lengths,
fp32 and bf16; then the whole forward of 64 such texts in each dtype. Alternating blocks, median of 7.

    .venv/bin/python bench/results/s9/attention_ab.py
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from bench.workload import make_texts
from kernels.attention import varlen_attention_reference
from models.runtime import load_model


def three_d(q, k, v, cu):
    ctx = torch.empty_like(q)
    for s, e in zip(cu[:-1], cu[1:]):
        ctx[s:e] = F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1)).transpose(0, 1)
    return ctx.reshape(q.shape[0], -1)


def timed(fn, reps=3):
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1000


def main():
    embedder, tokenizer, _ = load_model(None)
    ids = [e.ids for e in tokenizer.encode(make_texts(64, 8, 256, seed=0))]
    cu = [0]
    for x in ids:
        cu.append(cu[-1] + len(x))
    print(f"64 texts, {cu[-1]} tokens; torch {torch.__version__}, {torch.get_num_threads()} threads")
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        qkv = torch.randn(cu[-1], 3, 12, 32, dtype=dtype)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        diff = (three_d(q, k, v, cu).float() - varlen_attention_reference(q, k, v, cu).float()).abs().max().item()
        old, new = [], []
        for _ in range(7):
            old.append(timed(lambda: three_d(q, k, v, cu)))
            new.append(timed(lambda: varlen_attention_reference(q, k, v, cu)))
        print(f"attention, one layer, {str(dtype)[6:]}: 3-D {statistics.median(old):.1f} ms, 4-D {statistics.median(new):.1f} ms "
              f"({statistics.median(old) / statistics.median(new):.2f}x), max |diff| {diff:.2e}")
    bf16, _, _ = load_model(None, dtype="bfloat16")
    f32, b16 = [], []
    for _ in range(7):
        f32.append(timed(lambda: embedder.embed(ids), reps=1))
        b16.append(timed(lambda: bf16.embed(ids), reps=1))
    print(f"forward of the 64 texts: float32 {statistics.median(f32):.0f} ms, bfloat16 {statistics.median(b16):.0f} ms "
          f"({statistics.median(f32) / statistics.median(b16):.2f}x)")


if __name__ == "__main__":
    main()
