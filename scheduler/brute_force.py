"""Exhaustive references for the planners, for tests on small instances (n <= 8 or so)."""

from __future__ import annotations

import itertools
import math
from typing import Iterator, Sequence

from scheduler.cost_model import CostModel
from scheduler.planner import Limits, Request


def set_partitions(items: list[int]) -> Iterator[list[list[int]]]:
    """Every partition of `items` into non-empty blocks (Bell-number many)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in set_partitions(rest):
        for i in range(len(part)):
            yield part[:i] + [[first, *part[i]]] + part[i + 1:]
        yield [[first], *part]


def fits(block: Sequence[int], lengths: Sequence[int], limits: Limits) -> bool:
    tokens = sum(lengths[i] for i in block)
    return len(block) <= limits.max_batch_requests and (tokens <= limits.max_batch_tokens or len(block) == 1)


def min_cost_consecutive(lengths: Sequence[int], limits: Limits, cost: CostModel) -> float:
    """Cheapest split of `lengths` (in the given order) into consecutive batches, over all 2^(n-1) splits."""
    n = len(lengths)
    best = math.inf
    for cuts in itertools.product((False, True), repeat=max(n - 1, 0)):
        blocks, start = [], 0
        for i, cut in enumerate(cuts, start=1):
            if cut:
                blocks.append(list(range(start, i)))
                start = i
        blocks.append(list(range(start, n)))
        if all(fits(b, lengths, limits) for b in blocks):
            best = min(best, sum(cost.predict_lengths([lengths[i] for i in b]) for b in blocks))
    return best if n else 0.0


def min_cost_any(lengths: Sequence[int], limits: Limits, cost: CostModel) -> float:
    """Cheapest partition of the requests into batches, over every set partition."""
    best = math.inf
    for part in set_partitions(list(range(len(lengths)))):
        if all(fits(b, lengths, limits) for b in part):
            best = min(best, sum(cost.predict_lengths([lengths[i] for i in b]) for b in part))
    return best if lengths else 0.0


def deadlines_feasible(requests: Sequence[Request], limits: Limits, cost: CostModel, now: float) -> bool:
    """Whether some partition, in some order, meets every deadline (n <= 6 or so)."""
    lengths = [r.length for r in requests]
    for part in set_partitions(list(range(len(requests)))):
        if not all(fits(b, lengths, limits) for b in part):
            continue
        for order in itertools.permutations(part):
            t, ok = now, True
            for b in order:
                t += cost.predict_lengths([lengths[i] for i in b])
                if any(requests[i].deadline < t for i in b):
                    ok = False
                    break
            if ok:
                return True
    return False
