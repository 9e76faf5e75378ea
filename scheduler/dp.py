"""The dynamic-programming planner (TurboTransformers' batch scheduler), with deadlines and priorities.

1. Cost DP (the paper). Sort by length, l1 <= ... <= ln; a batch is a consecutive run j..i;
   best[i] = min over j of best[j-1] + cost(j..i), within the request cap and token budget; O(n·B).
   The cost matrix for every (i, batch size) is built in one vectorised call. Cutting the sorted order
   is optimal for padded execution, not for packed execution under a token budget, where pairing long
   with short inputs fills batches better (bin packing): so first-fit-decreasing packing and the
   arrival-order greedy split (TEI's) are candidates too, and the cheapest predicted partition wins.
2. Priorities are strict classes: a higher class's batches all run before a lower class's.
3. Deadlines. Batches run earliest-deadline first. If that order still leaves a request late, an
   EDF DP (requests in deadline order, consecutive batches, minimising (late count, finish time)) is
   tried, and for classes of at most EXACT_LIMIT requests an exact subset search finds a plan that
   meets every deadline whenever one exists. Requests that would be late even alone are reported.
4. Bounded wait: with everything in one batch that is still cheap per token to grow, hold it while no
   deadline is put at risk and the oldest request has waited less than max_wait.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from scheduler.cost_model import CostModel
from scheduler.planner import Batch, Limits, Plan, PolicyConfig, Request, evaluate

EXACT_LIMIT = 8  # classes this small get an exact search when the heuristics leave someone late
URGENT_BATCHES = 4  # the deadline repair looks at this many full batches' worth of the most urgent requests
HORIZON = 256  # requests planned in full detail (at least 4 full batches); the rest, which the worker
#                will plan again before it reaches them, are cut in deadline-then-length order


def _window_costs(lengths: np.ndarray, limits: Limits, cost: CostModel) -> np.ndarray:
    """C[i, k]: seconds of the batch made of positions i-k .. i (0-based, inclusive); inf if over a limit."""
    n = len(lengths)
    width = min(limits.max_batch_requests, n)
    # Prefix sums padded in front with a huge negative value: windows reaching before position 0 get a
    # huge token count and fail the budget test, and row i of a sliding-window view holds the prefix
    # sums before every candidate start without any gather.
    pad = np.full(width, -1e15)
    p1 = np.concatenate([pad, [0.0], np.cumsum(lengths, dtype=np.float64)])
    p2 = np.concatenate([pad, [0.0], np.cumsum(lengths.astype(np.float64) ** 2)])
    before1 = np.lib.stride_tricks.sliding_window_view(p1[1:-1], width)[:, ::-1]  # [n, width]
    before2 = np.lib.stride_tricks.sliding_window_view(p2[1:-1], width)[:, ::-1]
    tokens = p1[width + 1:, None] - before1
    squares = p2[width + 1:, None] - before2
    c = cost.predict(np.arange(1, width + 1), tokens, squares)
    over = tokens > limits.max_batch_tokens
    over[:, 0] = False  # an over-long single input still runs alone
    c[over] = np.inf
    return c


def _walk_back(choice: np.ndarray, n: int) -> list[tuple[int, int]]:
    """Recover [start, end) segments from the DP's argmins; covers 0..n exactly once."""
    segments = []
    end = n
    while end > 0:
        start = end - int(choice[end]) - 1
        segments.append((start, end))
        end = start
    segments.reverse()
    return segments


def cost_dp(lengths: Sequence[int], limits: Limits, cost: CostModel) -> tuple[list[tuple[int, int]], float]:
    """Min-total-cost partition of `lengths` (already in the order to cut) into consecutive batches.
    Returns ([start, end) segments, predicted total seconds)."""
    arr = np.asarray(lengths, dtype=np.int64)
    n = len(arr)
    if n == 0:
        return [], 0.0
    c = _window_costs(arr, limits, cost)
    width = c.shape[1]
    # Columns reversed so that row i-1 lines up with best[i-width .. i-1] as a forward slice.
    c_rev = np.ascontiguousarray(c[:, ::-1])
    best = np.zeros(n + 1)
    choice = np.zeros(n + 1, dtype=np.int64)
    for i in range(1, width):  # fewer than `width` predecessors
        totals = best[:i] + c_rev[i - 1, width - i:]
        k = int(totals.argmin())
        best[i], choice[i] = totals[k], i - 1 - k
    totals = np.empty(width)
    for i in range(width, n + 1):
        np.add(best[i - width:i], c_rev[i - 1], out=totals)
        k = int(totals.argmin())
        best[i], choice[i] = totals[k], width - 1 - k
    return _walk_back(choice, n), float(best[n])


def deadline_dp(lengths: Sequence[int], deadlines: Sequence[float], limits: Limits, cost: CostModel,
                start_time: float) -> list[tuple[int, int]]:
    """Consecutive batches over requests in deadline order minimising (late count, finish time)."""
    arr = np.asarray(lengths, dtype=np.int64)
    due = np.asarray(deadlines, dtype=np.float64)
    n = len(arr)
    c = _window_costs(arr, limits, cost)
    width = c.shape[1]
    ks = np.arange(width)
    late = np.zeros(n + 1)
    finish = np.full(n + 1, np.inf)
    finish[0] = start_time
    choice = np.zeros(n + 1, dtype=np.int64)
    for i in range(1, n + 1):
        m = min(width, i)
        k = ks[:m]
        prev = i - 1 - k
        t = finish[i - 1::-1][:m] + c[i - 1, :m]
        # deadlines ascend, so the late ones among prev..i-1 are a prefix of the window
        below = np.minimum(np.maximum(due.searchsorted(t) - prev, 0), k + 1)
        score = late[i - 1::-1][:m] + below
        # lexicographic (late count, finish): finish times relative to the start are far below 1e7 s
        best = int((score * 1e7 + (t - start_time)).argmin())
        late[i], finish[i], choice[i] = score[best], t[best], best
    return _walk_back(choice, n)


def exact_feasible(members: list[int], requests: Sequence[Request], limits: Limits, cost: CostModel,
                   start_time: float) -> list[list[int]] | None:
    """Batches (in run order) meeting every deadline of `members`, by search over subsets; None if none
    exists. Among feasible plans it returns one that finishes earliest. For small classes only."""
    n = len(members)
    full = (1 << n) - 1
    lengths = [requests[m].length for m in members]
    due = [requests[m].deadline for m in members]
    seconds = [math.inf] * (full + 1)
    tightest = [math.inf] * (full + 1)
    for s in range(1, full + 1):
        picked = [i for i in range(n) if s >> i & 1]
        tokens = sum(lengths[i] for i in picked)
        if len(picked) <= limits.max_batch_requests and (tokens <= limits.max_batch_tokens or len(picked) == 1):
            seconds[s] = cost.predict_lengths([lengths[i] for i in picked])
        tightest[s] = min(due[i] for i in picked)
    finish = [math.inf] * (full + 1)
    last = [0] * (full + 1)
    finish[0] = start_time
    for s in range(1, full + 1):
        sub = s
        while sub:  # `sub` is the batch run last among the set s
            t = finish[s ^ sub] + seconds[sub]
            if t <= tightest[sub] and t < finish[s]:
                finish[s], last[s] = t, sub
            sub = (sub - 1) & s
    if math.isinf(finish[full]):
        return None
    batches, s = [], full
    while s:
        batches.append([members[i] for i in range(n) if last[s] >> i & 1])
        s ^= last[s]
    batches.reverse()
    return batches


def _as_batches(groups: list[list[int]], requests: Sequence[Request]) -> list[Batch]:
    return [Batch(tuple(g), sum(requests[i].length for i in g)) for g in groups]


def _run_order(groups: list[list[int]], requests: Sequence[Request], price: "GroupCost") -> list[list[int]]:
    """Earliest deadline first; among equal deadlines the cheaper batch first (shortest job first)."""
    return sorted(groups, key=lambda g: (min(requests[i].deadline for i in g), price(g)))


def _late_count(groups: list[list[int]], requests: Sequence[Request], price: "GroupCost", t: float) -> tuple[int, float]:
    late = 0
    for g in groups:
        t += price(g)
        late += sum(requests[i].deadline < t for i in g)
    return late, t


def first_fit_decreasing(members: list[int], lengths: Sequence[int], limits: Limits) -> list[list[int]]:
    """Bin packing: longest first, each into the first batch with room under both limits."""
    order = sorted(members, key=lambda m: -lengths[m])
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


def _greedy(members: list[int], lengths: Sequence[int], limits: Limits) -> list[list[int]]:
    """Arrival order, each batch filled until the next request would break a limit (TEI)."""
    groups: list[list[int]] = []
    tokens = 0
    for i in members:
        if groups and len(groups[-1]) < limits.max_batch_requests and tokens + lengths[i] <= limits.max_batch_tokens:
            groups[-1].append(i)
            tokens += lengths[i]
        else:
            groups.append([i])
            tokens = lengths[i]
    return groups


class GroupCost:
    """Predicted seconds of index groups, memoised: a plan's groups are priced several times."""

    def __init__(self, requests: Sequence[Request], cost: CostModel):
        self.lengths = [r.length for r in requests]
        self.cost = cost
        self._memo: dict[tuple[int, ...], float] = {}

    def __call__(self, group: Sequence[int]) -> float:
        key = tuple(group)
        seconds = self._memo.get(key)
        if seconds is None:
            ls = self.lengths
            tokens = sum(ls[i] for i in group)
            squares = sum(ls[i] * ls[i] for i in group)
            seconds = self._memo[key] = self.cost.predict_one(len(group), tokens, squares)
        return seconds


def _total(groups: list[list[int]], price: GroupCost) -> float:
    return sum(price(g) for g in groups)


def cheapest_partition(members: list[int], price: GroupCost, limits: Limits) -> list[list[int]]:
    """The cheapest predicted of: the paper's DP over sorted lengths, first-fit-decreasing, and TEI's
    arrival-order greedy (so it never costs more than the token-budget baseline)."""
    lengths = price.lengths
    by_length = sorted(members, key=lambda i: lengths[i])
    segments, dp_cost = cost_dp([lengths[i] for i in by_length], limits, price.cost)
    best, best_cost = [by_length[s:e] for s, e in segments], dp_cost
    for candidate in (first_fit_decreasing(members, lengths, limits), _greedy(sorted(members), lengths, limits)):
        c = _total(candidate, price)
        if c < best_cost:
            best, best_cost = candidate, c
    return best


def _plan_class(members: list[int], requests: Sequence[Request], limits: Limits, price: GroupCost,
                start_time: float) -> list[list[int]]:
    cost = price.cost
    groups = _run_order(cheapest_partition(members, price, limits), requests, price)
    late, finish = _late_count(groups, requests, price, start_time)
    if late == 0:
        return groups
    # Repair: the most urgent requests (a few batches' worth) in deadline order, then the rest by cost.
    by_deadline = sorted(members, key=lambda i: (requests[i].deadline, requests[i].length))
    horizon = URGENT_BATCHES * limits.max_batch_requests
    urgent, rest = by_deadline[:horizon], by_deadline[horizon:]
    segments = deadline_dp([requests[i].length for i in urgent], [requests[i].deadline for i in urgent],
                           limits, cost, start_time)
    edf_groups = [urgent[s:e] for s, e in segments]
    if rest:
        edf_groups += _run_order(cheapest_partition(rest, price, limits), requests, price)
    edf_late, edf_finish = _late_count(edf_groups, requests, price, start_time)
    if (edf_late, edf_finish) < (late, finish):
        groups, late = edf_groups, edf_late
    if late and len(members) <= EXACT_LIMIT:
        exact = exact_feasible(members, requests, limits, cost, start_time)
        if exact is not None:
            return exact
    return groups


def _bounded_wait(plan: Plan, requests: Sequence[Request], limits: Limits, cost: CostModel, now: float,
                  config: PolicyConfig) -> float | None:
    """When one batch holds everything and growing it would still cut the cost per token, wait for more
    arrivals: at most until the oldest has waited max_wait, never past any request's slack, and only
    when the pending requests' own arrival rate predicts another arrival in that window (an isolated
    request at low load runs at once)."""
    if config.max_wait <= 0 or len(plan.batches) != 1 or plan.late or len(requests) < 2:
        return None
    batch = plan.batches[0]
    if len(batch.indices) >= limits.max_batch_requests:
        return None
    mean_len = batch.tokens / len(batch.indices)
    per_token_now = plan.cost / batch.tokens
    n_full = max(1, min(limits.max_batch_requests, int(limits.max_batch_tokens // max(mean_len, 1))))
    full_tokens = n_full * mean_len
    per_token_full = float(cost.predict(n_full, full_tokens, full_tokens * mean_len)) / full_tokens
    if per_token_full >= per_token_now * config.efficient_fraction:
        return None  # a fuller batch would not be cheaper enough per token to be worth a wait
    arrivals = [r.arrival for r in requests]
    oldest, newest = min(arrivals), max(arrivals)
    slack = min(r.deadline for r in requests) - (now + plan.cost)
    until = min(oldest + config.max_wait, now + slack)
    rate = (len(arrivals) - 1) / max(newest - oldest, 1e-6)  # arrivals per second seen in the queue
    if until <= now or rate * (until - now) < 1.0:
        return None
    return until


def plan_dp(requests: Sequence[Request], limits: Limits, cost: CostModel, now: float, config: PolicyConfig) -> Plan:
    """The DP policy: priority classes in turn, each planned by cost DP with deadline repair.

    Within a priority, requests that would miss their deadline even if run alone right now go behind
    those that can still make it: under overload the server spends its time on requests it can still
    answer in time (they are still served, never dropped, and reported as infeasible). The demotion
    lasts `late_grace` SLOs past the deadline; after that a late request rejoins its class in deadline
    order, so no request starves behind a stream of fresh ones."""
    if len(requests) == 1:  # nothing to choose: skip the numpy machinery (~0.3 ms) on the latency path
        return evaluate([Batch((0,), requests[0].length)], requests, cost, now)
    groups: list[list[int]] = []
    t = now
    lengths = np.array([r.length for r in requests], dtype=np.float64)
    alone = cost.predict(np.ones_like(lengths), lengths, lengths * lengths)
    deadlines = np.array([r.deadline for r in requests])
    arrivals = np.array([r.arrival for r in requests])
    # Demote while it is hopeless, but only until late_grace SLOs (deadline - arrival) past its deadline.
    hopeless = (now + alone > deadlines) & (now < deadlines + config.late_grace * (deadlines - arrivals))
    classes: dict[tuple[int, bool], list[int]] = {}
    for i, r in enumerate(requests):
        classes.setdefault((r.priority, not hopeless[i]), []).append(i)
    price = GroupCost(requests, cost)
    horizon = max(HORIZON, URGENT_BATCHES * limits.max_batch_requests)
    for key in sorted(classes, reverse=True):
        members = classes[key]
        if len(members) > horizon:  # beyond the horizon: a cheap cut, re-planned before it runs
            idx = np.asarray(members)
            members = idx[np.lexsort((lengths[idx], deadlines[idx]))].tolist()  # by deadline, then length
            members, beyond = members[:horizon], members[horizon:]
        else:
            beyond = []
        class_groups = _plan_class(members, requests, limits, price, t) if members else []
        class_groups += _greedy(beyond, price.lengths, limits)
        horizon -= len(members)
        groups.extend(class_groups)
        t = _late_count(class_groups, requests, price, t)[1]
    plan = evaluate(_as_batches(groups, requests), requests, cost, now, price=price)
    wait = _bounded_wait(plan, requests, limits, cost, now, config)
    return plan if wait is None else Plan(plan.batches, plan.cost, plan.late, plan.infeasible, wait)
