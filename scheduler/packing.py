"""The dp planner's parts besides its two DPs: the pending set as arrays with memoised batch prices,
first-fit-decreasing bin packing, TEI's greedy split, and the finish times and lateness of a plan.

Everything here runs once or a few times per plan over up to ~1,000 requests, so the per-request work is
numpy or a plain list access; Python loops run per batch, or per request only where a step depends on
the one before (bin packing).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from itertools import chain

import numpy as np

from scheduler.cost_model import CostModel
from scheduler.planner import Batch, Limits, Request


class Pending:
    """The pending requests as arrays, and predicted seconds of index groups, memoised: a plan's groups
    are priced several times. Groups are priced a partition at a time (token sums by numpy, then the
    cost model's scalar `predict_one` on exact integer sums, so a batch has one price however reached)."""

    def __init__(self, requests: Sequence[Request], cost: CostModel, order_tolerance: float = 0.0):
        self.requests = requests
        self.cost = cost
        self.order_tolerance = order_tolerance  # dp's PolicyConfig.order_tolerance: cuts in deadline order within it
        n = len(requests)
        self.lengths = [r.length for r in requests]  # [n], for scalar loops
        self.length_int = np.fromiter(self.lengths, dtype=np.int64, count=n)  # [n]
        self.length_arr = self.length_int.astype(np.float64)  # [n]
        self.deadline_arr = np.fromiter([r.deadline for r in requests], dtype=np.float64, count=n)  # [n]
        # the deadlines a plan can still meet: inf for a request late in any plan (dp's hopeless ones), so that
        # the deadline DPs neither count it nor try to save one sequence of a client request that is late whole
        self.due_arr = self.deadline_arr
        # due_arr before dp's deadline margin tightened it (None: no margin): what "a deadline that can be met" means
        self.plain_due: np.ndarray | None = None
        self._memo: dict[tuple[int, ...], tuple[float, int]] = {}  # group -> (seconds, tokens)
        # What dp compares candidate partitions with (PolicyConfig.partition_cost): itself, or priced_by(another model).
        self.shape: Pending = self

    def priced_by(self, cost: CostModel) -> Pending:
        """The same requests (arrays shared) priced by `cost`, with a memo of its own."""
        view = copy.copy(self)
        view.cost, view._memo = cost, {}
        view.shape = view
        return view

    def _entries(self, groups: list[list[int]], keys: list[tuple[int, ...]] | None = None) -> list[tuple[float, int]]:
        keys = keys or [tuple(g) for g in groups]
        memo = self._memo
        missing = [k for k in keys if k not in memo]
        if missing:
            sizes = [len(k) for k in missing]
            flat = np.fromiter(chain.from_iterable(missing), dtype=np.intp)  # [members of missing]
            starts = np.cumsum([0, *sizes[:-1]])
            lengths = self.length_int[flat]
            tokens = np.add.reduceat(lengths, starts).tolist()
            squares = np.add.reduceat(lengths * lengths, starts).tolist()
            predict = self.cost.predict_one
            for key, n, tok, sq in zip(missing, sizes, tokens, squares):
                memo[key] = (predict(n, tok, sq), tok)
        return [memo[k] for k in keys]

    def prices(self, groups: list[list[int]]) -> list[float]:
        """Predicted seconds of each batch."""
        return [seconds for seconds, _ in self._entries(groups)]

    def evaluate(self, groups: list[list[int]], t: float) -> tuple[list[Batch], float, np.ndarray, np.ndarray]:
        """What a Plan holds of `groups` run in turn from `t`: (batches, total seconds, the indices in
        run order, whether each misses its deadline)."""
        keys = [tuple(g) for g in groups]
        batches, ends, total = [], [], 0.0
        for key, (seconds, tokens) in zip(keys, self._entries(groups, keys)):
            batches.append(Batch(key, tokens))
            t += seconds
            total += seconds
            ends.append(t)
        flat = np.fromiter(chain.from_iterable(groups), dtype=np.intp)  # [planned]
        late = self.deadline_arr[flat] < np.repeat(ends, [len(g) for g in groups])
        return batches, total, flat, late

    def ends(self, groups: list[list[int]], t: float) -> list[float]:
        """Finish time of each batch run in turn from `t` (summed in order, as `evaluate` does)."""
        out = []
        for seconds in self.prices(groups):
            t += seconds
            out.append(t)
        return out

    def late_count(self, groups: list[list[int]], t: float) -> tuple[int, float]:
        """(requests that miss a deadline they could meet (`due_arr`), finish time) of `groups` run in turn from `t`."""
        if not groups:
            return 0, t
        ends = self.ends(groups, t)
        flat = np.fromiter(chain.from_iterable(groups), dtype=np.intp)  # [planned]
        finish = np.repeat(ends, [len(g) for g in groups])  # [planned]: its batch's end
        return int(np.count_nonzero(self.due_arr[flat] < finish)), ends[-1]

    def total(self, groups: list[list[int]]) -> float:
        total = 0.0
        for seconds in self.prices(groups):
            total += seconds
        return total

    def run_order(self, groups: list[list[int]]) -> list[list[int]]:
        """Earliest deadline first; among equal deadlines the cheaper batch first (shortest job first)."""
        if len(groups) < 2:
            return groups
        flat = np.fromiter(chain.from_iterable(groups), dtype=np.intp)
        starts = np.cumsum([0, *map(len, groups[:-1])])
        due = np.minimum.reduceat(self.deadline_arr[flat], starts).tolist()
        prices = self.prices(groups)
        return [groups[g] for g in sorted(range(len(groups)), key=lambda g: (due[g], prices[g]))]


def first_fit_decreasing(members: list[int], lengths: Sequence[int], limits: Limits) -> list[list[int]]:
    """Bin packing: longest first, each into the first batch with room under both limits."""
    order = sorted(members, key=lengths.__getitem__, reverse=True)  # stable: ties keep member order
    smallest = lengths[order[-1]] if order else 0
    bins: list[list[int]] = []
    room: list[int] = []  # tokens left, per bin
    open_bins: list[int] = []  # bins that can still take the smallest request, in creation order
    for i in order:
        n = lengths[i]
        for pos, b in enumerate(open_bins):
            if n <= room[b]:
                bins[b].append(i)
                room[b] -= n
                if len(bins[b]) == limits.max_batch_requests or room[b] < smallest:
                    del open_bins[pos]  # full: never scanned again
                break
        else:
            bins.append([i])
            room.append(limits.max_batch_tokens - n)
            if limits.max_batch_requests > 1 and room[-1] >= smallest:
                open_bins.append(len(bins) - 1)
    return bins


def greedy(members: list[int], pending: Pending, limits: Limits) -> list[list[int]]:
    """In the given order, each batch filled until the next request would break a limit (TEI). One
    searchsorted a batch: lengths are non-negative, so the requests that fit are a prefix."""
    if not members:
        return []
    # cum[j]: tokens of members[:j]
    cum = np.concatenate(([0.0], np.cumsum(pending.length_arr[members])))  # [m + 1]
    # most members[:end] that fit from each start: the budget, then the request cap, then at least one
    fit = cum.searchsorted(cum + limits.max_batch_tokens, side="right") - 1  # [m + 1]
    groups = []
    start, m, cap = 0, len(members), limits.max_batch_requests
    while start < m:
        end = max(min(int(fit[start]), start + cap), start + 1)
        groups.append(members[start:end])
        start = end
    return groups
