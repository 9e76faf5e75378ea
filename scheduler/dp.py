"""The dynamic-programming planner (TurboTransformers' batch scheduler), with deadlines and priorities.

1. Cost DP (the paper). Sort by length, l1 <= ... <= ln; a batch is a consecutive run j..i;
   best[i] = min over j of best[j-1] + cost(j..i), within the request cap and token budget; O(n·B).
   The cost matrix for every (i, batch size) is built in a few vectorised calls. Cutting the sorted order
   is optimal for padded execution, not for packed execution under a token budget, where pairing long
   with short inputs fills batches better (bin packing): so first-fit-decreasing packing and the
   arrival-order greedy split (TEI's) are candidates too, and the cheapest predicted partition wins. But the
   same DP over the requests in deadline order is taken when it costs at most `order_tolerance` (1%) more: in
   packed execution the cuts cost about the same, and the length-sorted one runs newer requests of one length
   before older ones of another (a longer tail, with no time saved). The candidates are priced by the model as
   profiled (PolicyConfig.partition_cost), not as refined online: the refined knots' noise is larger than most
   differences between candidates, and the cheapest by noisy prices is mostly the one with the kindest noise.
2. Priorities are strict classes: a higher class's batches all run before a lower class's.
3. Deadlines. Batches run earliest-deadline first. If that order still leaves a request late, an
   EDF DP (requests in deadline order, consecutive batches, minimising (late count, finish time)) is
   tried; it may leave a request out (late, run after the others) rather than spend device time on a
   request it cannot serve in time. For classes of at most EXACT_LIMIT requests an exact subset search
   finds a plan that meets every deadline whenever one exists. Requests that would be late even alone
   are reported. (Both DPs: scheduler/recurrences.py.)
4. Bounded wait: with everything in one batch that is still cheap per token to grow, hold it while no
   deadline is put at risk and the oldest request has waited less than max_wait.
5. Overload. Requests that would miss their deadline even alone go behind the others, and so do those
   Moore-Hodgson's rule sheds when the rest still cannot all make it (scheduler/shed.py). While it
   sheds, time saved is worth requests served later, so the EDF DP weighs a late request as
   LATE_COST_SHARES median requests' device time instead of putting it before any amount of time:
   it no longer keeps a request in time at the price of small, inefficient batches.
6. Keeping up. While the pending work is more than BACKLOG_SLOS SLOs (a backlog, not a burst), the next batch
   holds at least the requests a batch needs to serve `keep_up` times the recent arrival rate, topped up from
   the batches its class runs after it: the repair's small batches each save a few deadlines and cost a batch's
   fixed work (and a plan), and near capacity that is what decides whether a backlog drains or grows. Not while
   requests of several inputs are pending: growing the first batch undid item 7 (goodput 1.19 against 1.71
   requests/s in tests/scheduler/test_simulator.py's trace of 8-input requests past capacity).
7. A client request of several inputs (`Request.group`) is answered with its last sequence: it is hopeless,
   shed and demoted as a whole, and when a plan runs one of its sequences late the others go to the end of
   their class (run in time, they would only delay the rest).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import chain

import numpy as np

from scheduler.cost_model import CostModel
from scheduler.packing import Pending, first_fit_decreasing, greedy
from scheduler.planner import Batch, Limits, Plan, PolicyConfig, Request, evaluate
from scheduler.recurrences import cost_dp, deadline_dp
from scheduler.shed import batch_shares, client_requests, shed_overload

EXACT_LIMIT = 8  # classes this small get an exact search when the heuristics leave someone late
URGENT_BATCHES = 4  # the deadline repair looks at this many full batches' worth of the most urgent requests
LATE_COST_SHARES = 2.0  # under overload a late request weighs as much as this many median requests' device time
BACKLOG_SLOS = 2.0  # keep_up applies while the pending work, as predicted, is more than this many SLOs
HORIZON = 256  # requests planned in full detail (at least 4 full batches); the rest, which the worker
#                will plan again before it reaches them, are cut in deadline-then-length order


def exact_feasible(members: list[int], requests: Sequence[Request], limits: Limits, cost: CostModel,
                   start_time: float, deadlines: Sequence[float] | None = None) -> list[list[int]] | None:
    """Batches (in run order) meeting every deadline of `members` (the requests' own, or `deadlines`, indexed as
    requests), by search over subsets; None if none exists. Among feasible plans it returns one that finishes
    earliest. For small classes only."""
    n = len(members)
    full = (1 << n) - 1
    lengths = [requests[m].length for m in members]
    due = [requests[m].deadline if deadlines is None else float(deadlines[m]) for m in members]
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
    arrival-order greedy (so it never costs more than the token-budget baseline); but the same DP over the
    requests in deadline order when that costs at most `pending.order_tolerance` more than the cheapest and no
    more than TEI's split (older requests are then not held back behind newer ones of a cheaper length).
    Prices are `pending.shape`'s (the profiled model unless PolicyConfig.partition_cost is "refined")."""
    idx = np.asarray(members)
    shape = pending.shape  # the prices the candidates are compared by
    by_length = idx[np.argsort(pending.length_arr[idx], kind="stable")]
    segments, best_cost = cost_dp(pending.length_arr[by_length], limits, shape.cost)
    best = [by_length[s:e].tolist() for s, e in segments]
    tei = greedy(sorted(members), pending, limits)
    for candidate in (first_fit_decreasing(members, pending.lengths, limits), tei):
        c = shape.total(candidate)
        if c < best_cost:
            best, best_cost = candidate, c
    if pending.order_tolerance > 0 and len(members) > 1:
        by_deadline = idx[np.lexsort((pending.length_arr[idx], pending.deadline_arr[idx]))]
        if not np.array_equal(by_deadline, by_length):  # equal deadlines: the deadline order is the sorted one
            segments, c = cost_dp(pending.length_arr[by_deadline], limits, shape.cost)
            if c <= min(best_cost * (1 + pending.order_tolerance), shape.total(tei)):
                return [by_deadline[s:e].tolist() for s, e in segments]
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
    segments, left_out = deadline_dp(pending.length_arr[urgent], pending.due_arr[urgent], limits, cost,
                                     start_time, late_cost)
    edf_groups = [urgent[s:e].tolist() for s, e in segments]
    for part in (rest, urgent[left_out].tolist()):  # those left out go last: late whenever they run
        if part:
            edf_groups += pending.run_order(cheapest_partition(part, pending, limits))
    edf_late, edf_finish = pending.late_count(edf_groups, start_time)
    if _worse((late, finish), (edf_late, edf_finish), late_cost):
        groups, late = edf_groups, edf_late
    if late and len(members) <= EXACT_LIMIT:
        exact = exact_feasible(members, pending.requests, limits, cost, start_time, pending.due_arr)
        if exact is None and pending.plain_due is not None:  # no plan keeps the margin: one that meets the deadlines
            exact = exact_feasible(members, pending.requests, limits, cost, start_time, pending.plain_due)
        if exact is not None:
            return exact
    return groups


def _late_requests_last(groups: list[list[int]], pending: Pending, limits: Limits, start_time: float,
                        jobs: np.ndarray) -> list[list[int]]:
    """A client request with a sequence that the plan `groups` runs late is late whatever its other sequences
    do: take those out of their batches (which end sooner for everyone else) and run them after the rest."""
    if not groups:
        return groups
    flat = np.fromiter(chain.from_iterable(groups), dtype=np.intp)
    finish = np.repeat(pending.ends(groups, start_time), [len(g) for g in groups])
    late_jobs = np.unique(jobs[flat[pending.deadline_arr[flat] < finish]])
    if not late_jobs.size:
        return groups
    moved = np.isin(jobs[flat], late_jobs)
    if moved.all():
        return groups
    out = set(flat[moved].tolist())
    kept = [batch for batch in ([i for i in g if i not in out] for g in groups) if batch]
    return kept + pending.run_order(cheapest_partition(sorted(out), pending, limits))


def keep_up_size(lengths: np.ndarray, limits: Limits, cost: CostModel, rate: float) -> int:
    """Fewest requests of the pending mean length a batch needs to serve `rate` requests a second, its time as the
    model predicts it; the largest batch the limits allow when none does."""
    mean = max(float(lengths.mean()), 1.0)
    n = np.arange(1, full_batch_size(mean, limits) + 1, dtype=np.float64)
    served = n / cost.predict(n, n * mean, n * mean * mean)  # requests a second at each size
    enough = np.flatnonzero(served >= rate)
    return int(n[enough[0]] if enough.size else n[-1])


def _top_up(groups: list[list[int]], size: int, pending: Pending, limits: Limits) -> list[list[int]]:
    """`groups` with its first batch grown to `size` requests (within the token budget) by the requests of the
    batches after it, in their run order; the batches they leave are kept without them."""
    first, taken = list(groups[0]), set()
    tokens = int(pending.length_int[first].sum())
    for i in chain.from_iterable(groups[1:]):
        if len(first) >= size:
            break
        if tokens + pending.lengths[i] <= limits.max_batch_tokens:
            first.append(i)
            taken.add(i)
            tokens += pending.lengths[i]
    rest = [kept for kept in ([i for i in g if i not in taken] for g in groups[1:]) if kept]
    return [first, *rest]


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
    per_token_full = full_batch_seconds(mean_len, limits, cost) / (full_batch_size(mean_len, limits) * mean_len)
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


def full_batch_size(length: float, limits: Limits) -> int:
    """Most requests of `length` tokens one batch may hold (at least 1)."""
    return max(1, min(limits.max_batch_requests, int(limits.max_batch_tokens // max(length, 1.0))))


def full_batch_seconds(length: float, limits: Limits, cost: CostModel) -> float:
    """Predicted seconds of the fullest batch the limits allow of requests of `length` tokens (the bounded wait's
    best per-token cost; the deadline margin counts a request's slack in such batches of the median length)."""
    n = full_batch_size(length, limits)
    return float(cost.predict(n, n * length, n * length * length))


def margin_due(due: np.ndarray, origin: float, factor: float, batch: float, averaging: float) -> np.ndarray:
    """Deadlines to plan with when batches may overrun by `factor` (a p90 of observed / predicted): each slack from
    `origin` divided by 1 + (factor - 1) / k ** averaging, k the slack in batches of `batch` seconds (at least 1).
    The batches ahead of a request overrun one by one, and their sum overruns its prediction by less than one batch
    does (about 1 / sqrt(k) of it for independent overruns: averaging 0.5); averaging 0 divides every slack by the
    factor. Past and infinite deadlines stay as they are (all of them with a factor of at most 1)."""
    if factor <= 1:
        return due
    with np.errstate(invalid="ignore", divide="ignore"):
        slack = due - origin
        if averaging > 0:
            factor = 1 + (factor - 1) / np.maximum(1.0, slack / batch) ** averaging
        return np.where(due > origin, origin + slack / factor, due)


def plan_dp(requests: Sequence[Request], limits: Limits, cost: CostModel, now: float, config: PolicyConfig,
            next_only: bool = False, arrival_rate: float = 0.0) -> Plan:
    """The DP policy: priority classes in turn, each planned by cost DP with deadline repair.

    With `next_only` it stops after the first class that plans a batch: the batch to run next is settled then (a
    class's batches all run before the next class's), and under overload the classes behind (requests that can no
    longer make it, a lower priority) were most of the planning time.

    Within a priority, requests that would miss their deadline even if run alone right now go behind
    those that can still make it: under overload the server spends its time on requests it can still
    answer in time (they are still served, never dropped, and reported as infeasible). The demotion
    lasts `late_grace` SLOs past the deadline; after that a late request is overdue and runs before the
    rest of its priority (neither shed nor left out), so no request starves behind a stream of fresh ones."""
    if len(requests) == 1:  # nothing to choose: skip the numpy machinery (~0.3 ms) on the latency path
        return evaluate([Batch((0,), requests[0].length)], requests, cost, now)
    pending = Pending(requests, cost, config.order_tolerance)
    if config.partition_cost == "profiled":
        pending.shape = pending.priced_by(cost.profiled())
    lengths, deadlines = pending.length_arr, pending.deadline_arr
    alone = cost.predict(np.ones_like(lengths), lengths, lengths * lengths)
    hopeless = now + alone > deadlines
    group_ids = [r.group for r in requests]
    jobs = client_requests(np.array(group_ids, dtype=np.int64)) if max(group_ids) >= 0 else None
    if jobs is not None:  # a client request whose sequences cannot all make it in one batch is hopeless as a whole
        count = np.bincount(jobs).astype(np.float64)
        together = cost.predict(count, np.bincount(jobs, weights=lengths), np.bincount(jobs, weights=lengths * lengths))
        hopeless = (np.bincount(jobs, weights=hopeless) > 0)[jobs] | (now + together[jobs] > deadlines)
    arrivals = np.fromiter([r.arrival for r in requests], dtype=np.float64, count=len(requests))
    overdue = np.zeros_like(hopeless)
    if hopeless.any():
        # Demote while it is hopeless, but only until late_grace SLOs (deadline - arrival) past its deadline;
        # then it is overdue and goes first in its priority (an infinite deadline with late_grace 0 gives nan
        # there: never overdue, as it should be).
        with np.errstate(invalid="ignore"):
            overdue = hopeless & (now >= deadlines + config.late_grace * (deadlines - arrivals))
        hopeless &= ~overdue
        if jobs is not None and np.unique(jobs[hopeless]).size == 1:
            # One client request is lost (late in any plan): the DPs stop counting its sequences, so its batches
            # are not cut to run a few of them in time (a lone 16-input request on a slow model ran as 3 + 13
            # sequences, its answer waiting on the last). With several lost, their deadlines still order them:
            # ignored, the cheapest partition mixed them all and finished each later (goodput 0.98 against 1.10
            # a second on bursts of 8-input requests at 1.3x load, bench/results/s16/).
            pending.due_arr = np.where(hopeless, np.inf, deadlines)
    batch = full_batch_seconds(max(1.0, float(np.median(lengths))), limits, cost) if config.margin_averaging > 0 else 1.0
    if config.deadline_margin > 0:
        factor = cost.pessimism() ** config.deadline_margin
        due = pending.due_arr
        if factor > 1 and np.isfinite(due).any():  # a request is at risk when the work ahead fills its slack
            pending.plain_due, pending.due_arr = due, margin_due(due, now, factor, batch, config.margin_averaging)
    priorities = [r.priority for r in requests]
    horizon = max(HORIZON, URGENT_BATCHES * limits.max_batch_requests)  # requests planned in full detail
    late_cost = math.inf  # lexicographic (late count, finish time)
    shares = batch_shares(lengths, limits, cost) if np.isfinite(deadlines).any() else None
    floor = 0  # the next batch's fewest requests (keep_up), 0: none
    if shares is not None and config.keep_up > 0 and arrival_rate > 0 and jobs is None:
        finite = np.isfinite(deadlines)
        slo = float(np.median(deadlines[finite] - arrivals[finite]))
        if float(shares.sum()) * cost.pessimism() > BACKLOG_SLOS * slo:
            floor = keep_up_size(lengths, limits, cost, config.keep_up * arrival_rate)
    if config.shed_longest and shares is not None:
        # Overdue requests are never shed (they would starve behind a stream of fresh ones): they run first.
        start = now + float(shares[overdue].sum())
        # Judged with the work ahead as predicted (shed_margin 0), or overrunning by a power of the p90 factor.
        shed = shed_overload(margin_due(deadlines, start, cost.pessimism() ** config.shed_margin, batch,
                                        config.margin_averaging), start,
                             hopeless | overdue, np.array(priorities), shares, horizon, jobs)
        if shed.any():
            # Overloaded: a second saved now serves requests that arrive later, so the DPs may let a request
            # go late when that saves more than LATE_COST_SHARES typical requests' worth of device time
            # (as the model predicts it: the DPs' own time scale).
            late_cost = LATE_COST_SHARES * float(np.median(shares))
            hopeless |= shed
    # Classes by (priority; overdue, can still make it, hopeless), highest first; members in index order.
    if hopeless.any() or overdue.any() or priorities.count(priorities[0]) != len(priorities):
        rank = np.unique(np.array(priorities), return_inverse=True)[1].reshape(-1)  # any ints: no overflow
        code = rank * 3 + np.where(overdue, 2, np.where(hopeless, 0, 1))
        classes = [np.flatnonzero(code == key) for key in np.unique(code)[::-1]]
    else:
        classes = [np.arange(len(requests))]
    groups: list[list[int]] = []
    t = now
    planned_all = True
    for k, members in enumerate(classes):
        if len(members) > horizon:  # beyond the horizon: a cheap cut, re-planned before it runs
            members = members[np.lexsort((lengths[members], deadlines[members]))]  # by deadline, then length
        members = members.tolist()
        members, beyond = members[:horizon], members[horizon:]
        class_groups = _plan_class(members, pending, limits, t, late_cost) if members else []
        if jobs is not None:
            class_groups = _late_requests_last(class_groups, pending, limits, t, jobs)
        class_groups += greedy(beyond, pending, limits)
        if floor and not groups and len(class_groups) > 1 and len(class_groups[0]) < floor:
            class_groups = _top_up(class_groups, floor, pending, limits)
        horizon -= len(members)
        groups.extend(class_groups)
        if next_only and groups:
            planned_all = k == len(classes) - 1
            break
        t = pending.ends(class_groups, t)[-1] if class_groups else t
    plan = _evaluate(groups, pending, now, alone)
    if not planned_all:  # classes left unplanned: more than one batch, never a wait
        return plan
    wait = _bounded_wait(plan, requests, limits, cost, now, config)
    return plan if wait is None else Plan(plan.batches, plan.cost, plan.late, plan.infeasible, wait)
