"""dp under overload: which requests go behind the others when not every deadline can be met.

Moore-Hodgson's rule gives the fewest late jobs on one machine: in deadline order, whenever the running total
passes a deadline, drop the longest job so far. dp applies it before planning, each request counted at its
share of a full batch of its length (a lower bound of its cost; with PolicyConfig.shed_margin > 0, times a power of
the cost model's recent overrun, how much longer than predicted batches have run 1 time in 10), and the requests it
drops go behind, with those that would be late even alone (served after the others,
never dropped). Without it dp served requests in deadline order and kept every
long one, so shortest-first (infinity's sort-and-slice) answered more requests in time than dp once the load
passed capacity (bench/RESULTS.md, section 2, session 5).
"""

from __future__ import annotations

import heapq

import numpy as np

from scheduler.cost_model import CostModel
from scheduler.planner import Limits


def batch_shares(lengths: np.ndarray, limits: Limits, cost: CostModel) -> np.ndarray:
    """Seconds each request costs the device as one of a batch of as many requests of its length as a batch
    may hold (the token budget ignored): its own per-sequence and per-token work plus its share of the
    batch's fixed cost. No batch costs less than its members' shares, so for a model as profiled (no knot
    correction) Moore-Hodgson over them sheds nothing when every deadline can be met. Counting only the
    batches the token budget allows (fewer members for long inputs) made it shed from plans that were
    feasible (tests/scheduler/test_dp.py found one)."""
    n = float(limits.max_batch_requests)
    return cost.predict(n, n * lengths, n * lengths * lengths) / n


def shed_for_deadlines(members: np.ndarray, shares: np.ndarray, deadlines: np.ndarray, start: float,
                       horizon: int | None = None) -> np.ndarray:
    """Moore-Hodgson over `members` (request i takes shares[i] seconds, due at deadlines[i]): in deadline order,
    whenever the running total from `start` passes the current request's deadline, drop the longest kept so
    far. Returns the dropped members: the fewest whose removal lets every other meet its deadline (on one
    machine running the requests one after another; batches only approximate that). Only the first `horizon`
    in deadline order are considered (the planner re-plans before it reaches the others)."""
    order = members[np.argsort(deadlines[members], kind="stable")][:horizon]
    ends = start + np.cumsum(shares[order])
    late = np.flatnonzero(ends > deadlines[order])
    if not late.size:  # the common case, vectorised: nothing to drop
        return np.empty(0, dtype=members.dtype)
    first = int(late[0])  # everything before the first late request is kept as it is
    kept = [(-share, i) for share, i in zip(shares[order[:first]].tolist(), order[:first].tolist())]  # max-heap
    heapq.heapify(kept)
    dropped = []
    t = float(ends[first - 1]) if first else start
    for i, share, due in zip(order[first:].tolist(), shares[order[first:]].tolist(), deadlines[order[first:]].tolist()):
        heapq.heappush(kept, (-share, i))
        t += share
        if t > due:
            longest, j = heapq.heappop(kept)
            t += longest
            dropped.append(j)
    return np.array(dropped, dtype=members.dtype)


def shed_overload(deadlines: np.ndarray, now: float, excluded: np.ndarray, priorities: np.ndarray, shares: np.ndarray,
                  horizon: int, groups: np.ndarray | None = None) -> np.ndarray:
    """Which requests `shed_for_deadlines` drops (a mask) from each priority class, highest first, each class
    starting after the work the classes above keep; requests in `excluded` are not considered; the first
    `horizon` of each class in deadline order; request i takes `shares[i]` seconds.

    `groups[i]`, when given, is the client request sequence i belongs to (0 … g-1): a client request is answered
    only once all its sequences are, so its sequences are shed together, as one job of their summed shares due
    at their earliest deadline. Shedding them one by one (the longest sequence of every request) left every
    many-input request late while the device still ran the rest of it."""
    dropped = np.zeros(len(deadlines), dtype=bool)
    start = now
    for level in np.unique(priorities)[::-1]:
        members = np.flatnonzero((priorities == level) & ~excluded)
        if not members.size:
            continue
        if groups is None:
            dropped[shed_for_deadlines(members, shares, deadlines, start, horizon)] = True
        else:
            ids, job = np.unique(groups[members], return_inverse=True)  # job[k]: members[k]'s client request
            job_share = np.bincount(job, weights=shares[members], minlength=len(ids))
            job_due = np.full(len(ids), np.inf)
            np.minimum.at(job_due, job, deadlines[members])
            gone = shed_for_deadlines(np.arange(len(ids)), job_share, job_due, start, horizon)
            lost = np.zeros(len(ids), dtype=bool)
            lost[gone] = True
            dropped[members[lost[job]]] = True
        start += float(shares[members[~dropped[members]]].sum())  # what this class keeps runs first
    return dropped


def client_requests(groups: np.ndarray) -> np.ndarray | None:
    """Each sequence's client request as 0 … g-1 from the planner's `Request.group` values (-1: a request of its
    own), or None when every sequence is a request of its own (nothing to keep together)."""
    n = len(groups)
    key = np.where(groups >= 0, groups, -1 - np.arange(n, dtype=np.int64))  # singletons get distinct negative ids
    ids, inverse = np.unique(key, return_inverse=True)
    return None if len(ids) == n else inverse.reshape(-1)
