"""The dynamic-programming planner (TurboTransformers' batch scheduler), with deadlines and priorities.

1. Cost DP (the paper). Sort by length, l1 <= ... <= ln; a batch is a consecutive run j..i;
   best[i] = min over j of best[j-1] + cost(j..i), within the request cap and token budget; O(n·B).
   The cost matrix for every (i, batch size) is built in a few vectorised calls. Cutting the sorted order
   is optimal for padded execution, not for packed execution under a token budget, where pairing long
   with short inputs fills batches better (bin packing): so first-fit-decreasing packing and the
   arrival-order greedy split (TEI's) are candidates too, and the cheapest predicted partition wins.
2. Priorities are strict classes: a higher class's batches all run before a lower class's.
3. Deadlines. Batches run earliest-deadline first. If that order still leaves a request late, an
   EDF DP (requests in deadline order, consecutive batches, minimising (late count, finish time)) is
   tried; it may leave a request out (late, run after the others) rather than spend device time on a
   request it cannot serve in time. For classes of at most EXACT_LIMIT requests an exact subset search finds a plan that
   meets every deadline whenever one exists. Requests that would be late even alone are reported.
4. Bounded wait: with everything in one batch that is still cheap per token to grow, hold it while no
   deadline is put at risk and the oldest request has waited less than max_wait.
5. Overload. Requests that would miss their deadline even alone go behind the others, and so do those
   Moore-Hodgson's rule sheds when the rest still cannot all make it (scheduler/shed.py). While it
   sheds, time saved is worth requests served later, so the EDF DP weighs a late request as
   LATE_COST_SHARES median requests' device time instead of putting it before any amount of time:
   it no longer keeps a request in time at the price of small, inefficient batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np

from scheduler.cost_model import CostModel
from scheduler.packing import Pending, first_fit_decreasing, greedy
from scheduler.planner import Batch, Limits, Plan, PolicyConfig, Request, evaluate
from scheduler.shed import batch_shares, shed_overload

EXACT_LIMIT = 8  # classes this small get an exact search when the heuristics leave someone late
URGENT_BATCHES = 4  # the deadline repair looks at this many full batches' worth of the most urgent requests
CHUNK_CELLS = 4096  # cost-matrix cells computed at once (32 KiB temporaries)
RELAX_MAX_BATCHES = 8  # the cost DP relaxes all rows at once up to this many full batches of requests
RELAX_SLACK = 4  # relaxation rounds allowed beyond one per full batch (a plan may hold smaller ones)
LATE_COST_SHARES = 2.0  # under overload a late request weighs as much as this many median requests' device time
HORIZON = 256  # requests planned in full detail (at least 4 full batches); the rest, which the worker
#                will plan again before it reaches them, are cut in deadline-then-length order


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


def _walk_back(choice: Sequence[int], n: int) -> list[tuple[int, int]]:
    """Recover [start, end) segments from the DP's choices (choice[i]: size - 1 of the last batch of the
    best plan of the first i); covers 0..n exactly once."""
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
            return _walk_back(width - 1 - picks, n), float(best[-1])
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
    return _walk_back(width - 1 - np.array(picks), n), float(best[-1])


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
    picks = [0]  # picks[i]: size - 1 of the last batch of the best plan of the first i, or -1: i-1 left out
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
            k = key.argmin()
            skip = late_less_j[a] + i  # leave request i-1 out: the plan of the first i-1, one more late
            if scaled[skip] + finish[a] < key[k]:
                finish[a - 1] = finish[a]
                late_less_j[a - 1] = late_less_j[a]
                picks.append(-1)
            else:
                finish[a - 1] = t[k]
                late_less_j[a - 1] = score[k] - i
                picks.append(k)
    segments, left_out = [], []
    end = n
    while end > 0:
        if picks[end] < 0:
            end -= 1
            left_out.append(end)
        else:
            segments.append((end - picks[end] - 1, end))
            end -= picks[end] + 1
    return segments[::-1], left_out[::-1]


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


def cheapest_partition(members: list[int], pending: Pending, limits: Limits) -> list[list[int]]:
    """The cheapest predicted of: the paper's DP over sorted lengths, first-fit-decreasing, and TEI's
    arrival-order greedy (so it never costs more than the token-budget baseline)."""
    idx = np.asarray(members)
    by_length = idx[np.argsort(pending.length_arr[idx], kind="stable")]
    segments, best_cost = cost_dp(pending.length_arr[by_length], limits, pending.cost)
    by_length = by_length.tolist()
    best = [by_length[s:e] for s, e in segments]
    for candidate in (first_fit_decreasing(members, pending.lengths, limits), greedy(sorted(members), pending, limits)):
        c = pending.total(candidate)
        if c < best_cost:
            best, best_cost = candidate, c
    return best


def _worse(a: tuple[int, float], b: tuple[int, float], late_cost: float) -> bool:
    """Whether plan outcome a = (late count, finish time) is worse than b: lexicographic, or weighed by
    `late_cost` seconds a late request when that is finite."""
    if math.isinf(late_cost):
        return b < a
    return b[0] * late_cost + b[1] < a[0] * late_cost + a[1]


def _plan_class(members: list[int], pending: Pending, limits: Limits, start_time: float,
                late_cost: float = math.inf) -> list[list[int]]:
    cost = pending.cost
    groups = pending.run_order(cheapest_partition(members, pending, limits))
    late, finish = pending.late_count(groups, start_time)
    if late == 0:
        return groups
    # Repair: the most urgent requests (a few batches' worth) in deadline order, then the rest by cost.
    idx = np.asarray(members)
    by_deadline = idx[np.lexsort((pending.length_arr[idx], pending.deadline_arr[idx]))]  # stable
    horizon = URGENT_BATCHES * limits.max_batch_requests
    urgent, rest = by_deadline[:horizon], by_deadline[horizon:].tolist()
    segments, left_out = deadline_dp(pending.length_arr[urgent], pending.deadline_arr[urgent], limits, cost,
                                     start_time, late_cost)
    edf_groups = [urgent[s:e].tolist() for s, e in segments]
    for part in (rest, urgent[left_out].tolist()):  # those left out go last: late whenever they run
        if part:
            edf_groups += pending.run_order(cheapest_partition(part, pending, limits))
    edf_late, edf_finish = pending.late_count(edf_groups, start_time)
    if _worse((late, finish), (edf_late, edf_finish), late_cost):
        groups, late = edf_groups, edf_late
    if late and len(members) <= EXACT_LIMIT:
        exact = exact_feasible(members, pending.requests, limits, cost, start_time)
        if exact is not None:
            return exact
    return groups


def _evaluate(groups: list[list[int]], pending: Pending, now: float, alone: np.ndarray) -> Plan:
    """`planner.evaluate` for dp's groups, vectorised over requests. Infeasible is judged by `alone[i]`,
    request i's seconds alone, the vectorised prediction the demotion of hopeless requests uses (evaluate
    uses the scalar one: the same model, equal up to float rounding)."""
    batches, total, flat, late = pending.evaluate(groups, now)
    late_idx = flat[late]  # in run order
    infeasible = late_idx[now + alone[late_idx] > pending.deadline_arr[late_idx]]
    return Plan(batches, total, tuple(np.sort(late_idx).tolist()), tuple(infeasible.tolist()))


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
    pending = Pending(requests, cost)
    lengths, deadlines = pending.length_arr, pending.deadline_arr
    alone = cost.predict(np.ones_like(lengths), lengths, lengths * lengths)
    hopeless = now + alone > deadlines
    if hopeless.any():
        # Demote while it is hopeless, but only until late_grace SLOs (deadline - arrival) past its
        # deadline (an infinite deadline with late_grace 0 gives nan there: never hopeless, as it should be).
        arrivals = np.array([r.arrival for r in requests], dtype=np.float64)
        with np.errstate(invalid="ignore"):
            hopeless &= now < deadlines + config.late_grace * (deadlines - arrivals)
    priorities = [r.priority for r in requests]
    horizon = max(HORIZON, URGENT_BATCHES * limits.max_batch_requests)  # requests planned in full detail
    late_cost = math.inf  # lexicographic (late count, finish time)
    if config.shed_longest:
        shares = batch_shares(lengths, limits, cost)
        shed = shed_overload(pending, now, hopeless, np.array(priorities), shares * cost.pessimism(), horizon)
        if (shed != hopeless).any():
            # Overloaded: a second saved now serves requests that arrive later, so the DPs may let a request
            # go late when that saves more than LATE_COST_SHARES typical requests' worth of device time
            # (as the model predicts it: the DPs' own time scale).
            late_cost = LATE_COST_SHARES * float(np.median(shares))
        hopeless = shed
    # Classes by (priority, can still make it), highest first; members in index order.
    if hopeless.any() or priorities.count(priorities[0]) != len(priorities):
        rank = np.unique(np.array(priorities), return_inverse=True)[1].reshape(-1)  # any ints: no overflow
        code = rank * 2 + ~hopeless
        classes = [np.flatnonzero(code == key) for key in np.unique(code)[::-1]]
    else:
        classes = [np.arange(len(requests))]
    groups: list[list[int]] = []
    t = now
    for members in classes:
        if len(members) > horizon:  # beyond the horizon: a cheap cut, re-planned before it runs
            members = members[np.lexsort((lengths[members], deadlines[members]))]  # by deadline, then length
        members = members.tolist()
        members, beyond = members[:horizon], members[horizon:]
        class_groups = _plan_class(members, pending, limits, t, late_cost) if members else []
        class_groups += greedy(beyond, pending, limits)
        horizon -= len(members)
        groups.extend(class_groups)
        t = pending.ends(class_groups, t)[-1] if class_groups else t
    plan = _evaluate(groups, pending, now, alone)
    wait = _bounded_wait(plan, requests, limits, cost, now, config)
    return plan if wait is None else Plan(plan.batches, plan.cost, plan.late, plan.infeasible, wait)
