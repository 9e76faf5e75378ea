"""The two dynamic programs dp plans with, both over consecutive windows of an ordered list of requests
(O(n·B): n requests, windows of at most B = the request cap):

- cost_dp, the paper's recurrence: the cheapest cut of length-sorted requests into batches;
- deadline_dp, the deadline repair: requests in deadline order, fewest late (or late weighed against time
  under overload), a request it cannot serve in time left out rather than run late.

Both read batch prices from one cost matrix, C[i, k] = seconds of the window of k + 1 requests ending at i,
built by _window_costs in blocks. Pure numpy; no clock, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np

from scheduler.cost_model import CostModel
from scheduler.planner import Limits

CHUNK_CELLS = 4096  # cost-matrix cells computed at once (32 KiB temporaries)
RELAX_MAX_BATCHES = 8  # the cost DP relaxes all rows at once up to this many full batches of requests
RELAX_SLACK = 4  # relaxation rounds allowed beyond one per full batch (a plan may hold smaller ones)


def _window_costs(lengths: np.ndarray, limits: Limits, cost: CostModel) -> Iterator[np.ndarray]:
    """C[i, k]: seconds of the batch made of positions i-k .. i (0-based, inclusive); inf if over a limit
    or if it would reach before position 0. Yields it in blocks of consecutive rows, [rows, width],
    each of at most CHUNK_CELLS cells: the DPs read rows in order, and small temporaries are reused
    from the heap where whole-matrix ones (~128 KiB each at n=256) cost fresh pages on every call."""
    n = len(lengths)
    width = min(limits.max_batch_requests, n)
    # p[0], p[1]: prefix sums of lengths and of squared lengths, after `width` huge negative pads, so
    # windows reaching before position 0 get a huge token count and fail the budget test.
    p = np.zeros((2, n + width + 1))
    p[:, :width] = -1e15
    np.cumsum(lengths, out=p[0, width + 1:])
    np.cumsum(np.square(lengths), out=p[1, width + 1:])
    # before[:, i, k]: both sums before position i-k, a strided view (no gather): [2, n, width]
    s0, s1 = p.strides
    before = np.lib.stride_tricks.as_strided(p[:, width:], (2, n, width), (s0, s1, -s1), writeable=False)
    sizes = np.arange(1, width + 1)
    step = max(1, CHUNK_CELLS // width)
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        tokens, squares = p[:, width + 1 + lo:width + 1 + hi, None] - before[:, lo:hi]
        c = cost.predict(sizes, tokens, squares)
        over = tokens > limits.max_batch_tokens
        if lo < width:  # rows whose longer windows reach before position 0, whatever the budget
            over[:width - lo] |= sizes > np.arange(lo + 1, min(hi, width) + 1)[:, None]
        over[:, 0] = False  # an over-long single input still runs alone
        c[over] = np.inf
        yield c


def _walk_back(choice: Sequence[int], n: int, dropped: Sequence[int] | None = None) -> tuple[list[tuple[int, int]], list[int]]:
    """Recover [start, end) segments from the DP's choices (choice[i]: size - 1 of the last batch of the
    best plan of the first i, or -1: no batch), and the positions left out (dropped[i] of them right before
    that batch; without `dropped`, one for each -1 and none before a batch); together they cover 0..n once."""
    segments, left_out = [], []
    end = n
    while end > 0:
        size = int(choice[end]) + 1
        gone = dropped[end] if dropped is not None else (0 if size else 1)
        if size:
            segments.append((end - size, end))
        left_out.extend(range(end - size - 1, end - size - gone - 1, -1))
        end -= size + gone
    return segments[::-1], left_out[::-1]


def cost_dp(lengths: Sequence[int], limits: Limits, cost: CostModel) -> tuple[list[tuple[int, int]], float]:
    """Min-total-cost partition of `lengths` (already in the order to cut) into consecutive batches.
    Returns ([start, end) segments, predicted total seconds)."""
    arr = np.asarray(lengths, dtype=np.float64)
    n = len(arr)
    if n == 0:
        return [], 0.0
    width = min(limits.max_batch_requests, n)
    # best is padded in front with width-1 zeros for "prefixes" before position 0 (their windows cost
    # inf), and each cost row is reversed, so that row i lines up with the best plans it can follow,
    # best[i:i + width], as one forward slice. argmin ties go to the largest last batch.
    best = np.zeros(n + width)  # best[width - 1 + j]: cheapest plan of the first j
    full_batches = max(-(-n // width), math.ceil(arr.sum() / limits.max_batch_tokens))  # the fewest possible
    if full_batches <= RELAX_MAX_BATCHES:  # a few batches a plan: relax every row at once
        c_rev = np.empty((n, width))  # [n, width]
        for block, lo in zip(_window_costs(arr, limits, cost), range(0, n, max(1, CHUNK_CELLS // width))):
            c_rev[lo:lo + len(block)] = block[:, ::-1]
        picks = _relax(best, c_rev, full_batches + RELAX_SLACK)
        if picks is not None:
            return _walk_back(width - 1 - picks, n)[0], float(best[-1])
        blocks = [c_rev]  # plans of many small batches: not settled, go row by row
    else:
        blocks = (block[:, ::-1] for block in _window_costs(arr, limits, cost))
    # One row at a time (the recurrence itself): three numpy calls a step.
    totals = np.empty(width)
    picks = [0]  # picks[i]: width - 1 - choice[i]; picks[0] is never read
    i = 0
    for block in blocks:
        for row in block:  # the best plan of the first i + 1
            np.add(best[i:i + width], row, out=totals)
            k = totals.argmin()
            best[i + width] = totals[k]
            picks.append(k)
            i += 1
    return _walk_back(width - 1 - np.array(picks), n)[0], float(best[-1])


def _relax(best: np.ndarray, c_rev: np.ndarray, rounds: int) -> np.ndarray | None:
    """Bellman-Ford over the prefixes, every row at once: after r rounds best holds the cheapest plans
    of at most r batches, so it settles after (batches in a plan) + 1 rounds, to exactly the values
    (and argmins) of the row-by-row recurrence, that being the one fixed point. Returns [0, *argmins],
    or None if it has not settled within `rounds`."""
    n, width = c_rev.shape
    best[width:] = np.inf
    view = np.lib.stride_tricks.sliding_window_view(best, width)[:n]  # [n, width]: what row i can follow
    totals = np.empty((n, width))
    rows = np.arange(n)
    for _ in range(rounds):
        np.add(view, c_rev, out=totals)
        k = totals.argmin(axis=1)
        settled = totals[rows, k]
        if np.array_equal(settled, best[width:]):
            return np.concatenate(([0], k))
        best[width:] = settled
    return None


def deadline_dp(lengths: Sequence[int], deadlines: Sequence[float], limits: Limits, cost: CostModel,
                start_time: float, late_cost: float = math.inf) -> tuple[list[tuple[int, int]], list[int]]:
    """Consecutive batches over requests in deadline order, some left out, minimising (late count, finish time)
    lexicographically, or, with a finite `late_cost`, late count × late_cost + finish time (under overload,
    when a second of device time is worth more than serving one more request in time: see plan_dp).

    A request left out is counted late and takes no time here (the caller runs it after the others): a
    batch whose first requests would be late anyway is beaten by leaving them out, so under overload the
    plan spends no device time on requests it already knows it cannot serve in time (the batch-aware
    version of what Moore-Hodgson's shedding approximates). Returns ([start, end) batches in run order,
    the positions left out).

    The best plan of each prefix in turn, seven numpy calls a step: the bulk of planning under overload.
    Times are kept relative to start_time (finish sums start at 0): the comparisons of absolute times up
    to float rounding (a plan that ties to the last bits may come out the other way), one call a step
    fewer."""
    arr = np.asarray(lengths, dtype=np.float64)
    due = np.asarray(deadlines, dtype=np.float64) - start_time  # [n], ascending; times from the start
    n = len(arr)
    if n == 0:
        return [], []
    width = min(limits.max_batch_requests, n)
    # State j (the first j requests planned) lives in slot n - j of these arrays, so that the states a
    # batch ending at request i-1 can follow, j = i-1-k for last batch sizes k+1 = 1..width, are one
    # forward slice in k order (argmin ties go to the smallest last batch). Slots past n stand for
    # states before 0: infinite finish, never chosen.
    finish = np.full(n + width, np.inf)  # seconds after start_time
    finish[n] = 0.0
    late_less_j = np.zeros(n + width, dtype=np.intp)  # late[j] - j: late count before the batch, less its start
    state = np.arange(n, -width, -1)  # j of each slot
    scaled = np.arange(n + 1) * min(late_cost, 1e7)  # scaled[late]: the late count's weight in the key
    t, key = np.empty(width), np.empty(width)
    add, maximum, take = np.add, np.maximum, scaled.take
    picks = [0]  # picks[i]: size - 1 of the last batch of the best plan of the first i, or -1: none
    dropped = [0]  # dropped[i]: requests left out right before that batch (or the one left out: i-1)
    i = 0
    for block in _window_costs(arr, limits, cost):
        for row in block:  # the best plan of the first i + 1 requests
            i += 1
            a = n - i + 1
            add(finish[a:a + width], row, out=t)
            # late in the batch: due before t among j..i-1; deadlines ascend, so they are a prefix of
            # the batch, and clip(reached, j, i) - j counts them (the - j is folded into late_less_j)
            score = due[:i].searchsorted(t)
            maximum(score, state[a:a + width], out=score)
            score += late_less_j[a:a + width]
            # lexicographic (late count, finish) at 1e7: finish times from the start are far below 1e7 s
            take(score, out=key)
            key += t
            k = int(key.argmin())
            best_t, best_key, size, gone = t[k], key[k], k, 0
            # Its members late at the batch's start (deadlines ascend, so they are a prefix) are left out rather
            # than run late: the same late count, and the rest of the batch, smaller, ends no later.
            late_first = int(score[k] - late_less_j[a + k]) - (i - 1 - k)
            if late_first:
                trimmed = finish[a + k] + (row[k - late_first] if late_first <= k else 0.0)
                if trimmed <= best_t:  # always, for a cost that grows with every member
                    best_t, size, gone = trimmed, k - late_first, late_first
                    best_key = scaled[score[k]] + trimmed
            skip = late_less_j[a] + i  # leave request i-1 out: the plan of the first i-1, one more late
            if scaled[skip] + finish[a] < best_key:
                finish[a - 1] = finish[a]
                late_less_j[a - 1] = late_less_j[a]
                picks.append(-1)
                dropped.append(1)
            else:
                finish[a - 1] = best_t
                late_less_j[a - 1] = score[k] - i
                picks.append(size)
                dropped.append(gone)
    return _walk_back(picks, n, dropped)
