"""Discrete-event simulation of one batching worker under a request trace, with a cost model as the
device. The same planners the server runs decide every batch; the simulated clock is the only clock."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from typing import Callable, ClassVar, Sequence

from scheduler.cost_model import CostModel
from scheduler.planner import Limits, PolicyConfig, Request, plan, recent_rate


@dataclass(frozen=True)
class Trace:
    """Arrival times (seconds, ascending) and token lengths of the sequences; `requests[i]`, when given, the
    client request sequence i belongs to (ascending from 0; a request of several inputs is answered when its
    last sequence is). Without it every sequence is a request of its own."""

    arrivals: list[float]
    lengths: list[int]
    requests: list[int] | None = None

    def __post_init__(self) -> None:
        if len(self.arrivals) != len(self.lengths):
            raise ValueError("arrivals and lengths differ in count")
        if self.requests is not None and len(self.requests) != len(self.arrivals):
            raise ValueError("requests and arrivals differ in count")

    @property
    def request_count(self) -> int:
        """Client requests in the trace (sequences, when `requests` is not given)."""
        return len(self.arrivals) if self.requests is None else len(set(self.requests))


def poisson_arrivals(rate: float, count: int, rng: random.Random) -> list[float]:
    """`count` arrivals of a Poisson process of `rate` per second, from 0."""
    t, out = 0.0, []
    for _ in range(count):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def bursty_arrivals(rate: float, count: int, rng: random.Random, burst: int = 16) -> list[float]:
    """Bursts of `burst` simultaneous requests arriving as a Poisson process, averaging `rate` per second."""
    out: list[float] = []
    t = 0.0
    while len(out) < count:
        t += rng.expovariate(rate / burst)
        out.extend([t] * min(burst, count - len(out)))
    return out


def lengths_uniform(lo: int, hi: int) -> Callable[[random.Random], int]:
    return lambda rng: rng.randint(lo, hi)


def lengths_lognormal(median: float, sigma: float, lo: int, hi: int) -> Callable[[random.Random], int]:
    return lambda rng: int(min(hi, max(lo, round(rng.lognormvariate(math.log(median), sigma)))))


def lengths_empirical(values: Sequence[int]) -> Callable[[random.Random], int]:
    """Draw from observed token lengths (e.g. of a real text corpus)."""
    values = list(values)
    return lambda rng: rng.choice(values)


def make_trace(rate: float, count: int, lengths: Callable[[random.Random], int], seed: int = 0,
               bursty: bool = False, inputs: int = 1) -> Trace:
    """`count` requests arriving at `rate` a second, each of `inputs` sequences (lengths drawn independently)."""
    rng = random.Random(seed)
    arrivals = (bursty_arrivals if bursty else poisson_arrivals)(rate, count, rng)
    if inputs == 1:
        return Trace(arrivals, [lengths(rng) for _ in range(count)])
    return Trace([a for a in arrivals for _ in range(inputs)], [lengths(rng) for _ in range(count * inputs)],
                 [i for i in range(count) for _ in range(inputs)])


@dataclass(frozen=True)
class Result:
    """What one policy did with one trace."""

    policy: str
    completed: int
    duration: float  # first arrival to last completion
    throughput: float  # requests per second
    goodput: float  # requests per second that met the SLO
    p50: float
    p99: float
    slo_attainment: float
    padding_ratio: float  # share of padding had the batches been run padded to their longest input
    batches: int
    mean_batch: float

    def row(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in self.__dict__.items()}


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


@dataclass(frozen=True)
class HostLoad:
    """The request handling a host does beside the device, as time it adds to the batch running then.

    On a CPU host the "device" is the same cores that parse, tokenize and answer requests (and, in a
    benchmark, run the load generator), so a batch that runs while requests arrive or while the previous
    batch's answers are written takes longer than the idle-machine cost model says. `per_arrival` seconds
    are added to the running batch for each request that arrives during it, `per_completion` seconds to a
    batch for each request the batch just before it answered (answers are written while the next batch
    runs). On a GPU host both are ~0: the device does not share the cores.

    `per_batch` seconds pass between the decision to run a batch and its start, the device idle: the worker plans
    (and hands the batch over) between batches. It is the policy's own: live on a 2-vCPU host dp's plan took 1.7-3.2
    ms, a baseline's 0.05 ms (the server's turboserve_scheduler_plan_seconds).

    `per_forward` seconds are added to every batch's own time: what a live forward costs beyond the profile's
    (which times the model alone, in a loop). On the 2-vCPU VM 0.8-2.0 ms a batch on Poisson runs, 5-7 ms on bursts
    (bench/RESULTS.md, section 2, session 25); without it one speed factor fitted on short batches overstated long
    ones by 5-7%.
    """

    per_arrival: float = 0.0
    per_completion: float = 0.0
    per_batch: float = 0.0
    per_forward: float = 0.0


@dataclass(frozen=True)
class Spells:
    """The machine's speed drifting in spells: the log of a factor on every batch's time is a sum of
    Ornstein-Uhlenbeck processes in the trace's time, process k with stationary standard deviation sigma[k] and
    correlation time tau[k] seconds (median factor 1). Batches close in time overrun together, as they do live on a
    VM (bench/spell_fit.py: on the 2-vCPU VM the residuals of batches 0.15 s apart correlate 0.4-0.6, 3 s apart
    0.02-0.25), where a per-batch draw makes overruns independent."""

    sigma: tuple[float, ...] = ()
    tau: tuple[float, ...] = ()
    STEP: ClassVar[float] = 0.01  # seconds a value of the path holds

    def __post_init__(self) -> None:
        if len(self.sigma) != len(self.tau) or any(t <= 0 for t in self.tau) or any(s < 0 for s in self.sigma):
            raise ValueError("spells need one positive correlation time per non-negative sigma")

    def __bool__(self) -> bool:
        return any(s > 0 for s in self.sigma)

    def variance(self) -> float:
        return sum(s * s for s in self.sigma)

    def path(self, seed: int) -> Callable[[float], float]:
        """One realisation, drawn from `seed`: the factor at a time t >= 0 (seconds), held over steps of STEP. The
        same seed gives the same path whenever it is asked (policies compared on a seed run in the same spells)."""
        rng = random.Random(f"spells-{seed}")
        keep = [math.exp(-self.STEP / tau) for tau in self.tau]
        shock = [s * math.sqrt(1.0 - k * k) for s, k in zip(self.sigma, keep)]
        state = [rng.gauss(0.0, s) for s in self.sigma]  # stationary from the start
        values = [math.exp(sum(state))]

        def factor(t: float) -> float:
            step = max(0, int(t / self.STEP))
            while len(values) <= step:
                for k, (kept, sd) in enumerate(zip(keep, shock)):
                    state[k] = state[k] * kept + sd * rng.gauss(0.0, 1.0)
                values.append(math.exp(sum(state)))
            return values[step]

        return factor


@dataclass(frozen=True)
class Scatter:
    """How single batch times scatter about the model: a log-normal factor (median 1) whose sigma falls with
    the batch's length, sigma(t)^2 = floor^2 + jitter^2 / t (t in seconds): a slow or fast spell of the whole
    batch (`floor`) and short hiccups that a long batch averages out (`jitter`, in sqrt-seconds). Live on the
    2-vCPU VM the robust sigma went from 0.12 for 10 ms batches to 0.04-0.06 for 300 ms ones."""

    floor: float = 0.0
    jitter: float = 0.0
    spells: Spells = Spells()  # and the whole machine's speed in spells, batches close in time alike

    def sigma(self, seconds: float) -> float:
        return math.sqrt(self.floor ** 2 + self.jitter ** 2 / max(seconds, 1e-3))

    def __bool__(self) -> bool:
        return self.floor > 0 or self.jitter > 0 or bool(self.spells)

    def less_floor(self, variance: float) -> Scatter:
        """The same scatter with `variance` taken out of its floor's (at least 0): a share something else varies."""
        return replace(self, floor=math.sqrt(max(self.floor ** 2 - variance, 0.0)))

    def with_spells(self, spells: Spells) -> Scatter:
        """The same scatter with as much of its floor as `spells` vary moved into them (a floor fitted on batches
        as if apart already holds the spells' share; what is left is what batches do apart)."""
        return replace(self.less_floor(spells.variance()), spells=spells)


def _batch_end(start: float, seconds: float, after: int, arrivals: list[float], first: int, host: HostLoad) -> float:
    """When a batch that starts at `start` with `seconds` of device time ends, with the host's work: the
    answers of the `after` requests of the batch before, and every arrival (from index `first`) while it runs."""
    end = start + seconds + host.per_completion * after
    if host.per_arrival <= 0:
        return end
    i = first
    while i < len(arrivals) and arrivals[i] < end:  # each arrival lengthens the batch, which can take in more
        end += host.per_arrival
        i += 1
    return end


def _requests(indices: list[int], trace: Trace, slo: float, group: list[int]) -> list[Request]:
    """The planner's view of trace requests `indices`: deadline arrival + `slo`."""
    return [Request(trace.lengths[i], trace.arrivals[i], trace.arrivals[i] + slo, group=group[i]) for i in indices]


def _plan_ahead(rest: list[int], trace: Trace, slo: float, group: list[int], limits: Limits, cost: CostModel,
                now: float, ends: float, config: PolicyConfig) -> tuple[list[int], float] | None:
    """The batch to run after the one that is predicted to end at `ends`, planned from `rest` (what is pending beside it),
    and when it may start (-inf, or the policy's wait_until: if the device is free before, the worker plans again)."""
    if not rest:
        return None
    decided = plan(_requests(rest, trace, slo, group), limits, cost, ends, config, next_only=True,
                   arrival_rate=recent_rate(trace.arrivals, now))
    return [rest[i] for i in decided.batches[0].indices], -math.inf if decided.wait_until is None else decided.wait_until


def simulate(trace: Trace, config: PolicyConfig, limits: Limits, device: CostModel, slo: float,
             planner_cost: CostModel | None = None, host: HostLoad | None = None, refine: bool = False,
             noise: float | Scatter = 0.0, seed: int = 0, speed_at: Callable[[float], float] | None = None) -> Result:
    """Run `trace` through one worker whose batch times are `device`'s predictions (plus `host`'s work, if given).

    The planner sees `planner_cost` (default: the same model); deadlines are arrival + `slo`. With `refine`
    the planner's model (a copy) learns from every simulated batch's time, host work included, as the
    server's model does from live batches. `noise` > 0 multiplies each batch's device time by a log-normal
    factor of that sigma (median 1; drawn from `seed`): a device whose batches scatter about the model, as a
    CPU host's do (session 19: 10-30% median error live); a `Scatter`, by a sigma that depends on the batch's time,
    and with `Scatter.spells` by a factor that moves in time (its own draws from `seed`: the per-batch ones unchanged).
    `speed_at(t)`, when given, multiplies the device time of a batch that starts at t: a machine whose speed moves
    during the trace, as a VM's does in spells of seconds (bench/sim_fidelity.py replays a live run's).
    """
    scatter = noise if isinstance(noise, Scatter) else Scatter(noise)
    planner_cost = planner_cost or device
    if refine:
        planner_cost = CostModel.from_json(planner_cost.to_json())
    host = host or HostLoad()
    n = len(trace.arrivals)
    group = trace.requests or [-1] * n
    finish = [math.nan] * n
    pending: list[int] = []
    next_arrival, now = 0, 0.0
    batches = batch_requests = 0
    padded_tokens = real_tokens = 0
    last_end, last_size = -math.inf, 0
    rng = random.Random(seed)
    drift = scatter.spells.path(seed) if scatter.spells else None
    ahead: tuple[list[int], float] | None = None  # plan_ahead: the batch planned while the last one ran, and from when
    # it may start (one SLO: nothing that arrived since is more urgent)
    while next_arrival < n or pending:
        while next_arrival < n and trace.arrivals[next_arrival] <= now:
            pending.append(next_arrival)
            next_arrival += 1
        if not pending:
            now = trace.arrivals[next_arrival]
            continue
        if ahead and ahead[1] <= now:
            chosen, ahead, gap = ahead[0], None, 0.0  # planned while the device ran: no planning time between the batches
        else:
            ahead = None
            requests = _requests(pending, trace, slo, group)
            rate = recent_rate(trace.arrivals, now)
            decided = plan(requests, limits, planner_cost, now, config, next_only=True, arrival_rate=rate)  # as the server's worker
            upcoming = trace.arrivals[next_arrival] if next_arrival < n else math.inf
            if decided.wait_until is not None and decided.wait_until > now:
                now = min(decided.wait_until, upcoming)  # wait, unless a new arrival comes first
                if now == decided.wait_until and upcoming > now:
                    decided = plan(requests, limits, planner_cost, now, PolicyConfig(**{**config.__dict__, "max_wait": 0.0,
                                                                                         "max_queue_delay": 0.0}),
                                   next_only=True, arrival_rate=rate)
                else:
                    continue
            chosen, gap = [pending[i] for i in decided.batches[0].indices], host.per_batch
        lengths = [trace.lengths[i] for i in chosen]
        after = last_size if now <= last_end else 0  # back to back: its answers are written during this batch
        now += gap
        started = now
        taken = set(chosen)
        if config.plan_ahead:
            ahead = _plan_ahead([i for i in pending if i not in taken], trace, slo, group, limits, planner_cost,
                                now, now + planner_cost.predict_lengths(lengths), config)
        seconds = device.predict_lengths(lengths) * (speed_at(now) if speed_at else 1.0) + host.per_forward
        if scatter.floor > 0 or scatter.jitter > 0:
            seconds *= math.exp(rng.gauss(0.0, scatter.sigma(seconds)))
        if drift is not None:
            seconds *= drift(now)
        now = _batch_end(now, seconds, after, trace.arrivals, next_arrival, host)
        if refine:
            planner_cost.observe(lengths, now - started)
        last_end, last_size = now, len(chosen)
        for i in chosen:
            finish[i] = now
        pending = [i for i in pending if i not in taken]
        batches += 1
        batch_requests += len(chosen)
        real_tokens += sum(lengths)
        padded_tokens += max(lengths) * len(lengths)
    if trace.requests is None:
        latencies = sorted(f - a for f, a in zip(finish, trace.arrivals))
    else:  # a client request's latency: until its last sequence is done
        done: dict[int, float] = {}
        for r, f, a in zip(trace.requests, finish, trace.arrivals):
            done[r] = max(done.get(r, -math.inf), f - a)
        latencies = sorted(done.values())
    duration = max(finish) - trace.arrivals[0]
    good = sum(lat <= slo for lat in latencies)
    count = len(latencies)
    return Result(config.name, count, duration, count / duration, good / duration, _percentile(latencies, 0.5),
                  _percentile(latencies, 0.99), good / count, 1 - real_tokens / padded_tokens, batches,
                  batch_requests / batches)
