"""Variable-length attention on the CPU in a few padded SDPA calls instead of one call a sequence.

On the CPU each SDPA call (torch's flash kernel) opens an OpenMP parallel region and sets up per-thread buffers:
about 60 us at MiniLM's 12 heads of 32 for a 20-token sequence, most of it not the attention itself. One call a
sequence (varlen_attention_reference) pays that for every sequence of every layer, and on a host shared with the
event loop each parallel region is one more wait for a descheduled thread.

Here the sequences are sorted by length and cut into groups by a small DP over the sorted lengths: a group of n
sequences padded to its longest, Lmax, costs CALL_OVERHEAD + n * Lmax**2 (score elements a head; the attention
of a sequence of L tokens is L**2 of them), and only sequences of at most LONGEST_SHARED tokens share a call. A
group's padded keys are masked (causal attention needs no mask: a real query row never reaches past its own
sequence); rows of padding are computed and dropped.

Measured (bench/cpu_attention.py, bench/RESULTS.md §1, 2-vCPU Xeon): the embedded model's forward over 64 queries of
8-32 tokens 1.18x faster in bfloat16 (1.31x beside a busy process), 1.05x in float32; batches of longer texts
unchanged (within 1-6%), which is why long sequences keep their own call.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# One SDPA call's fixed cost in score elements a head (L**2 units), about the attention of a 64-token sequence;
# bench/cpu_attention.py sweeps it (1,024-16,384 made little difference once long sequences stopped sharing).
CALL_OVERHEAD = 4096
# Longer sequences keep their own call: measured, sharing gained nothing past this (the kernel's own cost dominates,
# and a padded call gathers and scatters its rows).
LONGEST_SHARED = 64


@dataclass(frozen=True)
class Group:
    """Sequences attended in one SDPA call. seqs: their indices in the batch; longest: the padded length."""

    seqs: tuple[int, ...]
    longest: int


def plan_groups(lengths: tuple[int, ...], overhead: float = CALL_OVERHEAD, longest_shared: int = LONGEST_SHARED) -> list[Group]:
    """The cheapest cut of the length-sorted sequences into consecutive groups, each costing
    overhead + count * longest**2, no group of several longer than `longest_shared`. Sequences of length 0 (a CUDA
    graph's empty slots) are left out. O(n**2)."""
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: lengths[i])
    sorted_lengths = [lengths[i] for i in order]
    best = np.zeros(len(order) + 1)  # best[j]: the cheapest cut of the first j sorted sequences
    cut = [0] * (len(order) + 1)  # cut[j]: where the last group of that cut starts
    for j in range(1, len(order) + 1):  # the group i..j-1 is padded to its last (longest) member
        totals = best[:j] + overhead + np.arange(j, 0, -1) * float(sorted_lengths[j - 1]) ** 2
        if sorted_lengths[j - 1] > longest_shared:
            totals[:j - 1] = np.inf  # alone
        cut[j] = int(totals.argmin())
        best[j] = totals[cut[j]]
    groups, j = [], len(order)
    while j > 0:
        groups.append(Group(tuple(order[cut[j]:j]), sorted_lengths[j - 1]))
        j = cut[j]
    return groups[::-1]


@functools.lru_cache(maxsize=8)
def _layout(cu_seqlens: tuple[int, ...]) -> list[tuple]:
    """Per group, once per batch rather than once per layer: (group, the token position of each padded slot,
    [n * Lmax] (a padding slot repeats its sequence's last token), the real slots as a bool [n, Lmax], the token
    positions of the real slots [the group's tokens] and the real slots' flat indices [the group's tokens]); the
    four are None for a group of one sequence, which needs no padding."""
    lengths = tuple(end - start for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]))
    layout = []
    with torch._C.DisableTorchFunction():  # built once per batch: out of sight of modes that record a forward's ops
        for group in plan_groups(lengths, CALL_OVERHEAD, LONGEST_SHARED):  # read here: bench/cpu_attention.py sets them
            if len(group.seqs) == 1:
                layout.append((group, None, None, None, None))
                continue
            starts = torch.tensor([cu_seqlens[s] for s in group.seqs])[:, None]  # [n, 1]
            counts = torch.tensor([lengths[s] for s in group.seqs])[:, None]  # [n, 1]
            pos = torch.arange(group.longest)[None, :]  # [1, Lmax]
            real = pos < counts  # [n, Lmax]
            gather = starts + torch.minimum(pos, counts - 1)  # [n, Lmax]
            layout.append((group, gather.flatten(), real, gather[real], real.flatten().nonzero().flatten()))
    return layout


def varlen_attention_grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int],
                             out: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
    """The contract of kernels.attention.varlen_attention_reference (no bias, no window), in plan_groups' calls.
    q, k, v: [total_tokens, heads, head_dim] on the CPU; returns ctx [total_tokens, heads * head_dim] (into `out`)."""
    total, heads, head_dim = q.shape
    ctx = torch.empty(total, heads, head_dim, dtype=q.dtype, device=q.device) if out is None else out.view(total, heads, head_dim)
    for group, gather, real, positions, slots in _layout(tuple(cu_seqlens)):
        if gather is None:  # one sequence: its own rows, no padding; 4-D views take SDPA's flash kernel
            start = cu_seqlens[group.seqs[0]]
            end = start + group.longest
            part = F.scaled_dot_product_attention(q[start:end].transpose(0, 1)[None], k[start:end].transpose(0, 1)[None],
                                                  v[start:end].transpose(0, 1)[None], is_causal=causal)
            ctx[start:end] = part[0].transpose(0, 1)
            continue
        n = len(group.seqs)
        # [n * Lmax, heads, d] rows gathered (index_select: whole rows, threaded), as [n, heads, Lmax, d] views
        padded = [t.index_select(0, gather).view(n, group.longest, heads, head_dim).transpose(1, 2) for t in (q, k, v)]
        mask = None if causal else real.view(n, 1, 1, group.longest)  # keys past a sequence's end (causal: never reached)
        part = F.scaled_dot_product_attention(*padded, attn_mask=mask, is_causal=causal)  # [n, heads, Lmax, d]
        rows = part.transpose(1, 2).reshape(n * group.longest, heads, head_dim)  # one copy, [n * Lmax, heads, d]
        ctx.index_copy_(0, positions, rows.index_select(0, slots))  # the real rows back to their packed places
    return ctx.view(total, heads * head_dim)
