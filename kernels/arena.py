"""The memory arena: a batch's intermediates as views into chunks planned from their lifetimes.

A forward pass asks a *workspace* for every intermediate (`ws.empty(shape, dtype)`) and writes
into it (`out=` for GEMMs, output pointers for kernels, in-place element-wise ops). Three workspaces
share that one call:

- `FreshWorkspace`: plain `torch.empty` each time (the reference, and the "sum of allocations" a
  plan-less run costs);
- `record_lifetimes`: runs a forward once under a TorchFunctionMode that notes, for every tensor the
  workspace handed out, the first and last torch call that touched it (views included), and its
  bytes; two recordings at different token counts give each size as a·tokens + c, exactly, since
  packed execution shapes every intermediate [tokens, ...];
- `Arena.batch(tokens)`: the k-th `empty` of the forward gets the k-th planned tensor, a view at its
  offset in a chunk the arena allocated once. Plans are cached per token bucket; chunks are kept
  across batches and freed when unused for `release_after` batches.

Weights are not in the arena; neither are the inputs (token ids) and the pooled outputs.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from kernels.memory_plan import MemoryPlan, align, lower_bound, plan_memory

log = logging.getLogger(__name__)


class Workspace(Protocol):
    """Where a forward pass gets its intermediates."""

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised tensor the forward will write before it reads."""
        ...


class FreshWorkspace:
    """Every intermediate freshly allocated by torch; counts the bytes asked for."""

    def __init__(self):
        self.allocated_bytes = 0
        self.allocations = 0

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A new uninitialised tensor."""
        out = torch.empty(shape, dtype=dtype, device=device)
        self.allocated_bytes += out.nbytes
        self.allocations += 1
        return out


@dataclass(frozen=True)
class Lifetimes:
    """The intermediates of one forward, in the order the forward asks for them.

    Tensor i takes per_token[i] × tokens + fixed[i] bytes and is alive from op first[i] to op last[i].
    """

    per_token: tuple[int, ...]
    fixed: tuple[int, ...]
    first: tuple[int, ...]
    last: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.first)

    def sizes(self, tokens: int) -> list[int]:
        """Byte size of every intermediate for a batch of `tokens` packed tokens."""
        return [a * tokens + c for a, c in zip(self.per_token, self.fixed)]

    def lower_bound(self, tokens: int) -> int:
        """Peak live bytes for a batch of `tokens` tokens: no plan can use less."""
        return lower_bound(self.sizes(tokens), self.first, self.last)


def _storage_key(t: torch.Tensor) -> int | None:
    """The address of the storage under `t`. A jagged nested tensor (attention's packed inputs) has no storage
    of its own: its packed values' storage is the planned buffer. None for anything else without one."""
    if t.is_nested:
        values = getattr(t, "_values", None)
        return _storage_key(values) if isinstance(values, torch.Tensor) else None
    return t.untyped_storage().data_ptr()


class _Recorder(TorchFunctionMode):
    """Notes the step of every torch call that touches a tensor handed out by the workspace."""

    def __init__(self):
        super().__init__()
        self.step = 0
        self.owner: dict[int, int] = {}  # storage data_ptr -> tensor index
        self.keep: list[torch.Tensor] = []
        self.sizes: list[int] = []
        self.first: list[int] = []
        self.last: list[int] = []

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype, device=device)
        key, nbytes = out.untyped_storage().data_ptr(), out.nbytes
        self.sizes.append(nbytes)
        self.first.append(self.step)
        self.last.append(self.step)
        self.owner[key] = len(self.sizes) - 1
        self.keep.append(out)  # held so that no later tensor gets its address while recording
        return out

    def touch(self, values) -> None:
        for leaf in tree_leaves(values):
            if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta":
                index = self.owner.get(_storage_key(leaf))
                if index is not None:
                    self.last[index] = self.step

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.step += 1
        self.touch((args, kwargs))
        out = func(*args, **kwargs)
        self.touch(out)
        return out


def _record_once(forward: Callable, tokens: int) -> tuple[list[int], list[int], list[int]]:
    recorder = _Recorder()
    with recorder:
        out = forward(recorder, tokens)
    # The forward's result is read after it returns (pooling): alive to the end.
    recorder.step += 1
    recorder.touch(out)
    return recorder.sizes, recorder.first, recorder.last


def record_lifetimes(forward: Callable[[object, int], torch.Tensor], probe_tokens: tuple[int, int, int] = (4, 8, 13)) -> Lifetimes:
    """Lifetimes of `forward(ws, tokens)`'s intermediates, from three small real runs.

    `forward` must take every intermediate from `ws.empty` and return its output. Raises ValueError
    when the forward's op sequence or its sizes do not follow the token count linearly (such a
    forward cannot be planned ahead by token bucket).
    """
    # One run first, unrecorded in effect: a first call may set things up once (nested tensors' first use does),
    # which would make the first recording differ from the others.
    _record_once(forward, probe_tokens[0])
    (s1, f1, l1), (s2, f2, l2), (s3, f3, l3) = (_record_once(forward, t) for t in probe_tokens)
    t1, t2, t3 = probe_tokens
    if not (len(s1) == len(s2) == len(s3) and f1 == f2 == f3 and l1 == l2 == l3):
        raise ValueError("the forward's sequence of intermediates changes with the token count")
    per_token, fixed = [], []
    for a1, a2, a3 in zip(s1, s2, s3):
        slope, rest = divmod(a2 - a1, t2 - t1)
        const = a1 - slope * t1
        if rest or slope * t3 + const != a3:
            raise ValueError(f"an intermediate's size is not linear in the token count ({a1}, {a2}, {a3} bytes)")
        per_token.append(slope)
        fixed.append(const)
    return Lifetimes(tuple(per_token), tuple(fixed), tuple(f1), tuple(l1))


def token_bucket(tokens: int) -> int:
    """Tokens rounded up to its plan bucket: steps of 1/32 of the power of two below (≤ 3.2% slack), at least 16."""
    if tokens <= 16:
        return 16
    step = max(16, 1 << max(0, tokens.bit_length() - 6))
    return -(-tokens // step) * step


@dataclass
class ArenaStats:
    """Counters the benchmark and /info read."""

    chunk_allocations: int = 0
    chunk_releases: int = 0
    plan_hits: int = 0
    plan_misses: int = 0
    batches: int = 0
    last_plan_seconds: float = 0.0
    plan_seconds: list[float] = field(default_factory=list)  # misses only, most recent 1,000


class _ArenaWorkspace:
    """Hands out the planned views, in the order the plan was recorded."""

    def __init__(self, views: list[tuple[torch.Tensor, int]]):
        self.views = views
        self.next = 0

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if self.next >= len(self.views):
            raise RuntimeError("the forward asked for more intermediates than its recorded lifetimes")
        base, capacity = self.views[self.next]
        self.next += 1
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > capacity or base.device != torch.device(device):
            raise RuntimeError(f"intermediate {self.next - 1} needs {nbytes} bytes on {device}; planned {capacity} on {base.device}")
        return base[:nbytes].view(dtype).view(shape)


class Arena:
    """Chunks on one device, and a plan per token bucket that maps every intermediate into them."""

    def __init__(self, lifetimes: Lifetimes, device: torch.device | str, min_chunk: int = 2 << 20, growth: float = 1.2,
                 release_after: int = 64):
        if release_after < 1:
            raise ValueError(f"{release_after=} must be >= 1")
        self.lifetimes = lifetimes
        self.device = torch.device(device)
        self.min_chunk = int(min_chunk)
        self.growth = growth
        self.release_after = release_after
        self.stats = ArenaStats()
        self._chunks: list[torch.Tensor | None] = []  # uint8 buffers; None once released
        self._last_used: list[int] = []
        self._plans: dict[int, MemoryPlan] = {}
        self._views: dict[int, tuple[MemoryPlan, list]] = {}  # id(plan) -> its views (they pin the chunks)
        self._largest_bucket = 0
        self._recent_peaks: deque[int] = deque(maxlen=release_after)
        self._lock = threading.Lock()

    @property
    def reserved_bytes(self) -> int:
        """Bytes the arena holds on its device now."""
        return sum(c.nbytes for c in self._chunks if c is not None)

    def plan(self, tokens: int) -> MemoryPlan:
        """The (cached) plan for a batch of `tokens` tokens; allocates chunks the plan asks for."""
        bucket = token_bucket(tokens)
        cached = self._plans.get(bucket)
        if cached is not None:
            self.stats.plan_hits += 1
            return cached
        started = time.perf_counter()
        sizes, first, last = self.lifetimes.sizes(bucket), self.lifetimes.first, self.lifetimes.last
        live = [i for i, c in enumerate(self._chunks) if c is not None]
        plan = plan_memory(sizes, first, last, [self._chunks[i].nbytes for i in live], self.min_chunk, self.growth)
        largest = self._plans.get(self._largest_bucket)
        if plan.new_chunks and bucket <= self._largest_bucket and largest is not None:
            # Every tensor of a smaller bucket is no bigger than in the largest bucket's plan, so that
            # placement holds for this batch too: take it rather than grow the arena.
            plan = largest
        elif plan.new_chunks:
            # A batch larger than any before needs more room. Start over with one chunk that fits
            # its plan exactly: no batch is running (we hold the lock), so the old chunks can go now.
            # The arena stays at the size of one plan for the largest batch seen, instead of a pile of
            # chunks sized for ever larger batches; every smaller batch then fits in the same chunk.
            whole = plan_memory(sizes, first, last, [1 << 62])  # one unbounded chunk
            size = align(max(self.min_chunk, whole.peak_bytes))
            self.stats.chunk_releases += len(live)
            self._drop_all_chunks()  # no plan is left to name them (cleared now: the allocation below may fail)
            live = []
            plan = MemoryPlan(whole.chunk, whole.offset, whole.sizes, [size], [0], whole.used_chunks)
        if plan is not largest:
            plan = self._allocate(plan, live)
        self._plans[bucket] = plan
        self._largest_bucket = max(self._largest_bucket, bucket)
        self.stats.plan_misses += 1
        self.stats.last_plan_seconds = time.perf_counter() - started
        self.stats.plan_seconds = self.stats.plan_seconds[-999:] + [self.stats.last_plan_seconds]
        return plan

    def _allocate(self, plan: MemoryPlan, live: list[int]) -> MemoryPlan:
        """Allocate the plan's new chunks and renumber its chunks as ours (`live` are the existing ones)."""
        mapping = list(live)
        for c in plan.new_chunks:
            self._chunks.append(torch.empty(plan.chunk_sizes[c], dtype=torch.uint8, device=self.device))
            self._last_used.append(self.stats.batches)
            self.stats.chunk_allocations += 1
            mapping.append(len(self._chunks) - 1)
        return MemoryPlan([mapping[c] for c in plan.chunk], plan.offset, plan.sizes,
                          [c.nbytes if c is not None else 0 for c in self._chunks], [mapping[c] for c in plan.new_chunks],
                          frozenset(mapping[c] for c in plan.used_chunks))

    def _release_idle(self, plan: MemoryPlan) -> None:
        """Free chunks no batch used for `release_after` batches, and shrink a set that grew for batches
        that stopped coming: when the last `release_after` batches all touched at most half of the
        reserved bytes, everything is given back and the next batch plans afresh."""
        self._recent_peaks.append(plan.peak_bytes)
        if len(self._recent_peaks) == self.release_after and 2 * max(self._recent_peaks) <= self.reserved_bytes:
            self.stats.chunk_releases += sum(c is not None for c in self._chunks)
            self._drop_all_chunks()
            self._largest_bucket = 0
            self._recent_peaks.clear()
            return
        for i, chunk in enumerate(self._chunks):
            if chunk is not None and self.stats.batches - self._last_used[i] > self.release_after:
                self._chunks[i] = None
                self.stats.chunk_releases += 1
                self._views.clear()
                self._plans = {b: p for b, p in self._plans.items() if i not in p.used_chunks}
        if all(c is None for c in self._chunks):
            self._drop_all_chunks()

    def _drop_all_chunks(self) -> None:
        """Forget every chunk and every plan (which name chunks by their place in the list): the list starts empty
        again, rather than growing by a released slot for every chunk ever made (each batch scans it)."""
        self._chunks.clear()
        self._last_used.clear()
        self._views.clear()
        self._plans.clear()

    @contextmanager
    def batch(self, tokens: int) -> Iterator[_ArenaWorkspace]:
        """A workspace for one forward of `tokens` tokens; the views are valid until the block ends."""
        with self._lock:
            plan = self.plan(tokens)
            cached = self._views.get(id(plan))
            if cached is None or cached[0] is not plan:
                views = [(self._chunks[c][off:off + size], size) for c, off, size in zip(plan.chunk, plan.offset, plan.sizes)]
                cached = self._views[id(plan)] = (plan, views)
            ws = _ArenaWorkspace(cached[1])
            yield ws
            self.stats.batches += 1
            for c in plan.used_chunks:
                self._last_used[c] = self.stats.batches
            self._release_idle(plan)


def new_arena(forward: Callable[[object, int], torch.Tensor], device: torch.device | str, min_chunk_mib: float = 2.0,
              release_after: int = 64) -> Arena:
    """An arena for `forward(ws, tokens)`, its lifetimes recorded on the device it will run on."""
    started = time.perf_counter()
    lifetimes = record_lifetimes(forward)
    log.info("memory arena: %d intermediates recorded in %.1f ms", len(lifetimes), 1e3 * (time.perf_counter() - started))
    return Arena(lifetimes, device, align(int(min_chunk_mib * (1 << 20))), release_after=release_after)
