"""dp cuts batches from the requests in deadline order when that costs no more than order_tolerance over the
cheapest cut (PolicyConfig.order_tolerance; scheduler.order_tolerance)."""

from scheduler.cost_model import CostModel
from scheduler.planner import Limits, PolicyConfig, Request, plan

# Packed execution: a batch costs a fixed 10 ms plus its tokens, whichever sequences it holds.
COST = CostModel.linear(0.010, 1e-5)
# The same, 5% dearer per token at 1,024 tokens than at 16 (a knot's correction, as on a CPU): pairing lengths
# (two small batches, one large) is then a little cheaper than pairing arrivals.
KNOTTED = CostModel([0.010, 0.0, 1e-5, 0.0], [16.0, 1024.0], [1.0, 1.05])


def test_older_requests_run_first_when_deadline_order_costs_within_the_tolerance():
    limits = Limits(max_batch_tokens=10_000, max_batch_requests=2)
    # Two older requests (10 and 200 tokens), then two newer ones of nearly the same lengths; generous deadlines.
    requests = [Request(10, 0.0, 1.0), Request(200, 0.0, 1.0), Request(12, 0.1, 1.1), Request(190, 0.1, 1.1)]
    ordered = plan(requests, limits, KNOTTED, 0.2, PolicyConfig("dp"))
    assert [sorted(b.indices) for b in ordered.batches] == [[0, 1], [2, 3]]
    # The paper's cut pairs the lengths: the older 200-token request waits behind the newer 12-token one.
    paper = plan(requests, limits, KNOTTED, 0.2, PolicyConfig("dp", order_tolerance=0.0))
    assert [sorted(b.indices) for b in paper.batches] == [[0, 2], [1, 3]]
    assert paper.cost < ordered.cost <= paper.cost * 1.01


def test_a_cheaper_cut_wins_when_deadline_order_costs_more_than_the_tolerance():
    limits = Limits(max_batch_tokens=300, max_batch_requests=4)
    # In deadline order (250, 250, 50, 50) no two neighbours but the last fit one 300-token batch: three batches;
    # packed (250 + 50 twice) it is two: 26 ms against 36 ms, the deadline-order cut 38% dearer.
    requests = [Request(250, 0.0, 5.0), Request(250, 0.1, 5.1), Request(50, 0.2, 5.2), Request(50, 0.2, 5.2)]
    got = plan(requests, limits, COST, 0.3, PolicyConfig("dp", order_tolerance=0.2))
    assert len(got.batches) == 2
    assert sorted(sorted(b.indices) for b in got.batches) in ([[0, 2], [1, 3]], [[0, 3], [1, 2]])
    # A tolerance that covers the difference keeps deadline order, at the price of a third batch.
    loose = plan(requests, limits, COST, 0.3, PolicyConfig("dp", order_tolerance=0.5))
    assert len(loose.batches) == 3 and loose.batches[0].indices == (0,)
