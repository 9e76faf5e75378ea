"""Batch planning as pure functions: pending requests, limits, cost model and `now` in; an ordered plan
out. No clock, no queue, no torch. The worker runs `plan.batches[0]` (after `plan.wait_until`, if any)
and plans again; the rest of the plan is the prediction that deadlines and waits are judged by.

Policies: `dp` (ours, scheduler/dp.py) and the baselines users pick instead: `fifo` (fixed-size batches
in arrival order), `token_budget` (TEI's greedy token budget), `triton` (preferred batch sizes plus a
maximum queue delay) and `sort_slice` (infinity: sort by length, slice).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Sequence

from scheduler.cost_model import CostModel


@dataclass(frozen=True)
class Limits:
    """Hard limits a batch must respect."""

    max_batch_tokens: int
    max_batch_requests: int

    def __post_init__(self) -> None:
        if self.max_batch_tokens < 1 or self.max_batch_requests < 1:
            raise ValueError(f"limits must be positive: {self}")


@dataclass(frozen=True)
class Request:
    """The planner's view of one pending sequence. Times are seconds on the caller's clock."""

    length: int
    arrival: float = 0.0
    deadline: float = math.inf
    priority: int = 0  # higher runs first
    # The client request this sequence belongs to (-1: its own). A request of several inputs is answered when
    # its last sequence is: dp sheds and demotes a request's sequences together (scheduler/shed.py).
    group: int = -1


@dataclass(frozen=True)
class Batch:
    """Indices into the pending list and the batch's packed token count."""

    indices: tuple[int, ...]
    tokens: int


@dataclass(frozen=True)
class Plan:
    """Ordered batches (batches[0] runs next) and what the cost model predicts of them."""

    batches: list[Batch]
    cost: float = 0.0  # predicted seconds to run every batch
    late: tuple[int, ...] = ()  # indices predicted to miss their deadline
    infeasible: tuple[int, ...] = ()  # indices that would miss even if run alone right now
    wait_until: float | None = None  # hold batches[0] until then, unless the pending set changes


@dataclass(frozen=True)
class PolicyConfig:
    """Knobs of every policy; each reads its own."""

    name: str = "dp"
    fixed_batch_size: int = 32  # fifo
    preferred_batch_sizes: tuple[int, ...] = (8, 16, 32)  # triton
    max_queue_delay: float = 0.005  # fifo, triton: seconds the oldest request may wait for a fuller batch
    max_wait: float = 0.0  # dp: seconds the oldest request may wait for a cheaper batch
    efficient_fraction: float = 0.9  # dp: wait only while per-token cost is above 1/this of the best
    late_grace: float = 4.0  # dp: a hopeless request goes behind the others until this many SLOs past its deadline
    shed_longest: bool = True  # dp: when not every deadline can be met, the longest requests go behind (Moore-Hodgson)
    # dp: plan each request's slack as if batches ran pessimism() ** deadline_margin times as long as predicted (0: as
    # predicted). Simulated with batch times scattered about the model as live ones are (log-normal, sigma 0.15), a
    # margin of 1 raised dp's SLO capacity 1.12-1.55x on bursts and left Poisson arrivals level
    # (bench/results/s20/margin_sim.py).
    deadline_margin: float = 1.0
    # dp: the margin for a request whose slack holds k full batches is (factor - 1) / k ** margin_averaging, factor
    # the one above: the batches ahead of it overrun one by one, not all at once, and their sum overruns its
    # prediction less than one batch does (independent overruns: sqrt(k)). 0: the whole slack shrunk by the factor,
    # which with a 2 s SLO and short requests had dp cut batches small for deadlines that were not at risk, 2.3% behind
    # token_budget's SLO capacity on English bursts (simulated with the noise and host fitted on live runs,
    # bench/RESULTS.md, section 2, session 26). Overload shedding judges what can still make it the same way (with
    # the p90 factor itself), so that it does not shed requests the margin plans in time. Off by default: live on the
    # 2-vCPU VM, where overruns come in spells of seconds rather than batch by batch, 0.5 lost two of three runs on
    # that very trace (dp's capacity -16% and -13%, +9% in the third; requests planned just in time went late together
    # and waited out their grace).
    margin_averaging: float = 0.0
    # dp: overload shedding (shed_longest) judges which requests can still make it with batches running
    # pessimism() ** shed_margin times as long as predicted (0: as predicted). With the whole factor (1, before session
    # 27) a burst's backlog that the margin saw as overload had its longest requests shed, late for certain, where
    # most would have made it: simulated, 0 raised dp's SLO capacity on bursts by up to 10% at 1-2 s SLOs (English
    # paragraphs +5.6% to +10.3%: from 2.3% behind token_budget to 3.2% ahead) for -0.9% to 0.0% on Poisson arrivals
    # (bench/RESULTS.md, section 2, session 27). The planning margin (deadline_margin) still keeps the rest in time.
    shed_margin: float = 0.0
    # dp: keep requests in deadline order (cut by the same DP) unless the paper's length-sorted cut is cheaper by more
    # than this share of the plan's predicted time. In packed execution the two cost about the same (a batch's
    # attention term is its own sequences' squares wherever they go), and a length-sorted cut lets newer requests
    # of one length run before older ones of another: under bursts with a 2 s SLO dp's p99 at 0.9 load was 1.43 s
    # against token_budget's 1.22 s, 1.17 s with 0.01 (bench/RESULTS.md, section 2, session 22). 0: the paper's cut.
    order_tolerance: float = 0.01
    # dp: while the pending work (as predicted) is more than BACKLOG_SLOS SLOs, the next batch holds at least enough
    # requests to serve them this many times as fast as they arrived lately (0: off). Small batches that save a
    # few deadlines each cost the fixed work of a batch; near capacity that left dp 5% below triton's throughput live,
    # and a backlog that starts then grows (bench/RESULTS.md, section 2, session 23).
    keep_up: float = 1.1
    # dp: the model that prices the candidate partitions ("profiled": as measured at start-up or loaded; "refined":
    # the live one). The refined knots wander ~5% with batch times that scatter by 15%, and picking the cheapest of
    # candidates priced with that noise picks the noise: simulated at 0.93 load (English bursts, 2 s SLO) dp ran 123
    # batches where the profiled prices gave 74, its plans 2.6% cheaper than TEI's split by the refined model and
    # 0.1% dearer by the device's (bench/RESULTS.md, section 2, session 24). The deadlines are always checked with
    # the refined model: it predicts the times.
    partition_cost: str = "profiled"
    # every policy: plan the next batch while the current one runs, as if it starts when the current one is predicted
    # to end, with what was pending when it started; the worker runs that batch as soon as the device is free, unless
    # a request more urgent than everything it planned with (higher priority, or an earlier deadline) arrived
    # meanwhile or the plan said wait. Those that arrived meanwhile wait for the plan after. The device no longer
    # idles while the planner runs (dp: 5-17 ms a batch live on a 2-vCPU host). Simulated with that planning time,
    # +1-5% SLO capacity; live on that host no better, the planner thread slowing the forward it overlaps
    # (bench/RESULTS.md, section 2, session 28). For hosts whose model does not run on the planning cores.
    plan_ahead: bool = False
    # every policy: the worker hands out a batch's answers once it has chosen the next batch (or before it would wait),
    # not before planning it. Answers are written by the event loop, in Python, and under the GIL each one written
    # while the planner runs lengthens the plan by as much, with the device idle: dp planned 5-15 ms a batch live on
    # a 2-vCPU host where the same plans take 0.5-2.5 ms alone. Answers then wait for the plan (uncontended).
    answer_after_plan: bool = False
    extra: dict = field(default_factory=dict)


RATE_WINDOW = 2.0  # seconds of arrivals the worker counts for the recent arrival rate


def recent_rate(arrivals: Sequence[float], now: float, window: float = RATE_WINDOW) -> float:
    """Arrivals a second over the last `window` seconds before `now` (`arrivals` ascending; later ones ignored)."""
    hi = bisect.bisect_right(arrivals, now)
    return (hi - bisect.bisect_left(arrivals, now - window, 0, hi)) / window


def chunk(order: Sequence[int], lengths: Sequence[int], limits: Limits, size: int | None = None) -> list[Batch]:
    """Cut `order` into consecutive batches of at most `size` requests within the limits."""
    cap = min(size or limits.max_batch_requests, limits.max_batch_requests)
    batches: list[Batch] = []
    current: list[int] = []
    tokens = 0
    for i in order:
        n = lengths[i]
        if current and (tokens + n > limits.max_batch_tokens or len(current) == cap):
            batches.append(Batch(tuple(current), tokens))
            current, tokens = [], 0
        current.append(i)
        tokens += n
    if current:
        batches.append(Batch(tuple(current), tokens))
    return batches


def evaluate(batches: list[Batch], requests: Sequence[Request], cost: CostModel | None, now: float,
             wait_until: float | None = None, price=None) -> Plan:
    """Predict each batch's finish time from `now` and list the requests that would be late.
    `price(indices) -> seconds`, when given, replaces pricing each batch from scratch."""
    if cost is None:
        return Plan(batches, wait_until=wait_until)
    t = max(now, wait_until or now)
    late, total = [], 0.0
    for b in batches:
        seconds = price(b.indices) if price else cost.predict_lengths([requests[i].length for i in b.indices])
        t += seconds
        total += seconds
        late.extend(i for i in b.indices if requests[i].deadline < t)
    infeasible = ()
    if late:  # only a late request can be infeasible
        infeasible = tuple(i for i in late if now + cost.predict_one(1, requests[i].length, requests[i].length ** 2)
                           > requests[i].deadline)
    return Plan(batches, total, tuple(sorted(late)), infeasible, wait_until)


def plan_token_budget(requests, limits, cost, now, config) -> Plan:
    """TEI: greedy in arrival order under the token budget and request cap; never waits."""
    lengths = [r.length for r in requests]
    return evaluate(chunk(range(len(requests)), lengths, limits), requests, cost, now)


def _oldest_arrival(requests) -> float:
    return min(r.arrival for r in requests)


def plan_fifo(requests, limits, cost, now, config) -> Plan:
    """Fixed-size batches in arrival order; a short first batch waits up to max_queue_delay to fill."""
    lengths = [r.length for r in requests]
    batches = chunk(range(len(requests)), lengths, limits, config.fixed_batch_size)
    full = min(config.fixed_batch_size, limits.max_batch_requests)
    wait = None
    if len(batches) == 1 and len(batches[0].indices) < full and batches[0].tokens < limits.max_batch_tokens:
        wait = _oldest_arrival(requests) + config.max_queue_delay
    return evaluate(batches, requests, cost, now, wait)


def plan_triton(requests, limits, cost, now, config) -> Plan:
    """Triton's dynamic batcher: the largest preferred size the queue can fill runs now; with fewer
    requests than the smallest preferred size, wait up to max_queue_delay, then run what is there."""
    lengths = [r.length for r in requests]
    sizes = sorted(s for s in config.preferred_batch_sizes if s <= limits.max_batch_requests) or [limits.max_batch_requests]
    fillable = [s for s in sizes if s <= len(requests)]
    size = fillable[-1] if fillable else limits.max_batch_requests
    batches = chunk(range(len(requests)), lengths, limits, size)
    wait = None if fillable else _oldest_arrival(requests) + config.max_queue_delay
    return evaluate(batches, requests, cost, now, wait)


def plan_sort_slice(requests, limits, cost, now, config) -> Plan:
    """infinity: sort the pending requests by length and slice them into full batches; never waits."""
    lengths = [r.length for r in requests]
    order = sorted(range(len(requests)), key=lambda i: lengths[i])
    return evaluate(chunk(order, lengths, limits), requests, cost, now)


def _plan_dp(requests, limits, cost, now, config, next_only: bool = False, arrival_rate: float = 0.0) -> Plan:
    from scheduler.dp import plan_dp  # noqa: PLC0415 - dp builds on this module's types

    return plan_dp(requests, limits, cost, now, config, next_only, arrival_rate)


POLICIES = {
    "dp": _plan_dp,
    "token_budget": plan_token_budget,
    "fifo": plan_fifo,
    "triton": plan_triton,
    "sort_slice": plan_sort_slice,
}


def plan(requests: Sequence[Request], limits: Limits, cost: CostModel | None = None, now: float = 0.0,
         config: PolicyConfig | None = None, next_only: bool = False, arrival_rate: float = 0.0) -> Plan:
    """Plan every pending request into ordered batches with the configured policy. With `next_only` a policy may
    stop once the batch to run next is settled (the worker runs batches[0] and plans again): dp then leaves out the
    priority classes after the first, and the plan's cost and late requests are those of what it holds.
    `arrival_rate`: requests a second lately (`recent_rate`; 0: unknown), for dp's `keep_up`."""
    config = config or PolicyConfig()
    try:
        planner = POLICIES[config.name]
    except KeyError:
        raise ValueError(f"unknown scheduler policy {config.name!r}; known: {', '.join(POLICIES)}") from None
    if not requests:
        return Plan([])
    if config.name == "dp" and cost is None:
        raise ValueError("the dp policy needs a cost model")
    if planner is _plan_dp:
        return planner(requests, limits, cost, now, config, next_only, arrival_rate)
    return planner(requests, limits, cost, now, config)
