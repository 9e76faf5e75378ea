"""The host's request handling as the simulator's HostLoad, measured from a live run's responses.

A live replay records, per request, when it was sent and answered (client clock) and the server's
x-inference-time (the batch's forward). Requests of one batch share that value, so the batches can be put
back together: a batch ends just before its first answer arrives and starts x-inference-time earlier. For
each batch, against the cost model's prediction p for its lengths:

    observed = speed * p + per_arrival * (requests the server took in while it ran)
                         + per_completion * (requests the batch just before it answered)

`speed` is the machine's against the model at the time (the VM drifts), measured on the batches that ran
with neither beside them; the other two are what request handling costs the batches on this host.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from scheduler.cost_model import CostModel, nonnegative_fit
from scheduler.simulator import HostLoad

BACK_TO_BACK_S = 0.01  # a batch that starts this soon after the one before runs while that one's answers go out


@dataclass(frozen=True)
class LiveBatch:
    start: float
    end: float
    lengths: list[int]
    arrivals: int  # requests the server took in while it ran
    after: int  # requests of the batch just before it, if that one ended right before it started


def live_batches(records: list[dict], lengths: list[int]) -> list[LiveBatch]:
    """Batches put back together from one replay's records (dicts with received, inference, total: seconds,
    and status; index i is request i of the trace). A request was taken in by the server x-total-time before
    its answer came back: a burst sent at once is taken in one by one, over the batch that runs meanwhile."""
    groups: dict[float, list[int]] = {}
    for i, r in enumerate(records):
        if r["status"] == 200 and r.get("inference"):
            groups.setdefault(r["inference"], []).append(i)
    spans = []
    for inference, members in groups.items():
        # Two batches that took the same time to the microsecond end at least that time apart.
        members.sort(key=lambda i: records[i]["received"])
        cut = [k for k in range(1, len(members))
               if records[members[k]]["received"] - records[members[k - 1]]["received"] >= inference]
        for part in (members[a:b] for a, b in zip([0, *cut], [*cut, len(members)])):
            end = records[part[0]]["received"]
            spans.append((end - inference, end, sorted(part)))
    spans.sort()
    taken_in = np.sort(np.array([r["received"] - r["total"] for r in records if r["status"] == 200]))
    out: list[LiveBatch] = []
    for k, (start, end, members) in enumerate(spans):
        arrived = int(np.searchsorted(taken_in, end) - np.searchsorted(taken_in, start))
        before = spans[k - 1] if k else None
        after = len(before[2]) if before is not None and 0 <= start - before[1] <= BACK_TO_BACK_S else 0
        out.append(LiveBatch(start, end, [lengths[i] for i in members], arrived, after))
    return out


@dataclass(frozen=True)
class HostFit:
    host: HostLoad
    speed: float  # observed / predicted for a batch with no host work beside it (median)
    batches: int
    median_error_before: float  # |predicted - observed| / observed, the cost model alone
    median_error_after: float  # the same with the fitted speed and host terms


def fit_host(batches: list[LiveBatch], cost: CostModel, min_quiet: int = 5) -> HostFit:
    """The machine's speed against `cost` (the profile, taken on an idle machine), from the batches that ran
    with no host work beside them (no arrival, no answers of a batch before); then the two host terms,
    least squares (absolute seconds, >= 0) on what every batch took beyond that. Not in one fit: the requests
    that arrive during a batch grow with its length, so a joint fit can trade the speed for the host terms."""
    if len(batches) < 8:
        raise ValueError(f"{len(batches)} batches are too few to fit the host's load")
    predicted = np.array([cost.predict_lengths(b.lengths) for b in batches])
    observed = np.array([b.end - b.start for b in batches])
    quiet = np.array([b.arrivals == 0 and b.after == 0 for b in batches])
    if quiet.sum() < min_quiet:
        raise ValueError(f"{int(quiet.sum())} of {len(batches)} batches ran with no host work beside them: too few "
                         "to measure the machine's speed")
    speed = float(np.median(observed[quiet] / predicted[quiet]))
    x = np.column_stack([[b.arrivals for b in batches], [b.after for b in batches]]).astype(np.float64)
    coef = nonnegative_fit(x, observed - speed * predicted, relative=False) if x.any() else np.zeros(2)
    fitted = speed * predicted + x @ coef
    return HostFit(HostLoad(float(coef[0]), float(coef[1])), speed, len(batches),
                   float(np.median(np.abs(predicted - observed) / observed)),
                   float(np.median(np.abs(fitted - observed) / observed)))
