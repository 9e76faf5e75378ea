"""Where each intermediate tensor of a batch lives, planned from lifetimes (TurboTransformers, idea 2).

A batch's intermediates are known before it runs: their byte sizes follow from the batch shape and
their lifetimes (first and last op that touches them) from the model's op sequence. Two tensors whose
lifetimes overlap must not share bytes; two that never coexist may. `plan_memory` places them in
chunks with the paper's greedy-by-size rule:

- tensors largest first (ties: earliest first);
- in the first chunk (largest chunks first) that has room, the smallest gap no lifetime-overlapping
  tensor of that chunk occupies;
- when no chunk has room, a new chunk of max(min_chunk, growth × size).

`lower_bound` is the peak of live bytes over the op sequence: no placement can do better. Pure
Python and numpy: no torch, no device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ALIGN = 256  # bytes; every offset and size is rounded up to this (fits any dtype and GPU vector loads)


@dataclass(frozen=True)
class MemoryPlan:
    """The placement of n tensors: tensor i lives at chunks[chunk[i]], bytes [offset[i], offset[i] + size[i])."""

    chunk: list[int]  # [n] chunk index of each tensor
    offset: list[int]  # [n] byte offset inside its chunk
    sizes: list[int]  # [n] aligned byte sizes the plan was made for
    chunk_sizes: list[int]  # every chunk the plan may use, existing ones first, then new_chunks
    new_chunks: list[int]  # indices into chunk_sizes of the chunks this plan asked for
    used_chunks: frozenset[int]  # indices of the chunks holding at least one tensor

    @property
    def peak_bytes(self) -> int:
        """Bytes of the chunks this plan touches, counted up to the highest byte it uses in each."""
        ends: dict[int, int] = {}
        for c, off, size in zip(self.chunk, self.offset, self.sizes):
            ends[c] = max(ends.get(c, 0), off + size)
        return sum(ends.values())

    @property
    def reserved_bytes(self) -> int:
        """Whole sizes of the chunks this plan touches."""
        return sum(self.chunk_sizes[c] for c in self.used_chunks)


def align(nbytes: int, to: int = ALIGN) -> int:
    """nbytes rounded up to a multiple of `to`."""
    return -(-int(nbytes) // to) * to


def lower_bound(sizes, first, last) -> int:
    """Peak over ops of the bytes of tensors alive at that op: the smallest footprint any plan can have.

    sizes, first, last: [n] (tensor i is alive from op first[i] to op last[i], both included).
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    if sizes.size == 0:
        return 0
    first = np.asarray(first, dtype=np.int64)
    last = np.asarray(last, dtype=np.int64)
    delta = np.zeros(int(last.max()) + 2, dtype=np.int64)
    np.add.at(delta, first, sizes)
    np.add.at(delta, last + 1, -sizes)
    return int(np.cumsum(delta).max())


def check_plan(plan: MemoryPlan, first, last) -> None:
    """Raise ValueError if two lifetime-overlapping tensors share a byte or a tensor leaves its chunk."""
    n = len(plan.sizes)
    for i in range(n):
        if plan.offset[i] < 0 or plan.offset[i] + plan.sizes[i] > plan.chunk_sizes[plan.chunk[i]]:
            raise ValueError(f"tensor {i} [{plan.offset[i]}, +{plan.sizes[i]}) leaves chunk {plan.chunk[i]}")
        for j in range(i + 1, n):
            if plan.chunk[i] != plan.chunk[j] or first[i] > last[j] or first[j] > last[i]:
                continue
            if plan.offset[i] < plan.offset[j] + plan.sizes[j] and plan.offset[j] < plan.offset[i] + plan.sizes[i]:
                raise ValueError(f"tensors {i} and {j} are alive together and overlap in chunk {plan.chunk[i]}")


def _best_gap(placed: list[tuple[int, int, int, int]], chunk_size: int, size: int, first: int, last: int) -> tuple[int, int] | None:
    """(offset, gap) of the smallest gap >= size among the tensors of one chunk alive with [first, last]."""
    busy = sorted((off, end) for off, end, f, la in placed if f <= last and la >= first)
    best: tuple[int, int] | None = None
    cursor = 0
    for off, end in busy:
        gap = off - cursor
        if gap >= size and (best is None or gap < best[1]):
            best = (cursor, gap)
        cursor = max(cursor, end)
    gap = chunk_size - cursor
    if gap >= size and (best is None or gap < best[1]):
        best = (cursor, gap)
    return best


def plan_memory(sizes, first, last, chunks: list[int] | tuple[int, ...] = (), min_chunk: int = 2 << 20,
                growth: float = 1.2) -> MemoryPlan:
    """Place tensors (byte sizes, first and last op) in the given chunks, asking for new ones as needed.

    chunks: sizes of the chunks that already exist (kept across batches); they are tried largest first,
    so that a chunk set grown for big batches also serves the small ones and older small chunks fall
    idle. A new chunk holds max(min_chunk, growth × size) bytes for the tensor that did not fit.
    """
    n = len(sizes)
    aligned = [align(s) for s in sizes]
    first = [int(f) for f in first]
    last = [int(la) for la in last]
    if len(first) != n or len(last) != n:
        raise ValueError(f"sizes, first and last must have one entry per tensor; got {n}, {len(first)}, {len(last)}")
    chunk_sizes = [int(c) for c in chunks]
    placed: list[list[tuple[int, int, int, int]]] = [[] for _ in chunk_sizes]
    where = [0] * n
    offset = [0] * n
    new_chunks: list[int] = []
    for i in sorted(range(n), key=lambda t: (-aligned[t], first[t])):
        size = aligned[i]
        spot = None
        for c in sorted(range(len(chunk_sizes)), key=lambda c: -chunk_sizes[c]):
            found = _best_gap(placed[c], chunk_sizes[c], size, first[i], last[i])
            if found is not None:
                spot = (c, found[0])
                break
        if spot is None:
            chunk_sizes.append(align(max(min_chunk, growth * size)))
            placed.append([])
            new_chunks.append(len(chunk_sizes) - 1)
            spot = (len(chunk_sizes) - 1, 0)
        c, off = spot
        where[i], offset[i] = c, off
        placed[c].append((off, off + size, first[i], last[i]))
    return MemoryPlan(where, offset, aligned, chunk_sizes, new_chunks, frozenset(where))
