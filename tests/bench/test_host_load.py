"""bench/host_load: batches put back together from a replay's answers, and the host's load fitted on them."""

import json
import random

import pytest

from bench.host_load import LiveBatch, fit_host, live_batches, resimulate, run_speed
from scheduler.cost_model import CostModel
from scheduler.simulator import HostLoad

COST = CostModel.linear(0.01, 0.0005, 0.0, 0.0002)


def record(received: float, total: float, inference: float, status: int = 200) -> dict:
    return {"status": status, "received": received, "total": total, "inference": inference, "sent": received - total}


def test_batches_are_rebuilt_from_the_shared_inference_time():
    # Batch A: requests 0-1, forward 0.2 s ending at 1.2; batch B: requests 2-4 right after, 0.3 s to 1.5.
    # Request 2 and 3 were taken in at 1.1 and 1.15 (during A), request 4 at 1.3 (during B).
    records = [record(1.201, 0.3, 0.2), record(1.203, 0.25, 0.2),
               record(1.502, 1.502 - 1.1, 0.3), record(1.504, 1.504 - 1.15, 0.3), record(1.506, 1.506 - 1.3, 0.3),
               record(9.0, 0.1, 0.0, status=503)]  # refused: no batch
    lengths = [10, 20, 30, 40, 50, 60]
    a, b = live_batches(records, lengths)
    assert a.lengths == [10, 20] and b.lengths == [30, 40, 50]
    assert a.start == pytest.approx(1.001) and a.end == pytest.approx(1.201)
    assert a.arrivals == 2 and a.after == 0
    assert b.arrivals == 1 and b.after == 2  # B started 1 ms after A ended: A's answers went out during B


def random_batches(seed: int, n: int, seconds, quiet_arrivals: int = 2) -> list[LiveBatch]:
    """n batches of 1-32 random lengths, with host work beside some (arrivals: none in quiet_arrivals of
    quiet_arrivals + 1; answers of a batch before: none in half); seconds(rng, lengths, arrivals, after) each's time."""
    rng = random.Random(seed)
    batches = []
    for _ in range(n):
        lengths = [rng.randint(8, 256) for _ in range(rng.randint(1, 32))]
        arrivals, after = rng.choice([0] * quiet_arrivals + [rng.randint(1, 40)]), rng.choice([0, rng.randint(1, 32)])
        batches.append(LiveBatch(0.0, seconds(rng, lengths, arrivals, after), lengths, arrivals, after))
    return batches


def test_the_fit_recovers_a_known_host_load():
    batches = random_batches(5, 200, lambda rng, lengths, arrivals, after: (
        1.1 * COST.predict_lengths(lengths) + 0.004 * arrivals + 0.002 * after) * (1 + rng.uniform(-0.02, 0.02)))
    fit = fit_host(batches, COST)
    assert fit.speed == pytest.approx(1.1, rel=0.03)
    assert fit.host.per_arrival == pytest.approx(0.004, rel=0.1)
    assert fit.host.per_completion == pytest.approx(0.002, rel=0.2)
    assert fit.median_error_after < 0.02 < fit.median_error_before


def test_a_host_that_costs_nothing_fits_as_nothing():
    batches = random_batches(6, 50, lambda rng, lengths, arrivals, after: COST.predict_lengths(lengths), quiet_arrivals=1)
    fit = fit_host(batches, COST)
    assert fit.speed == pytest.approx(1.0, rel=1e-6)
    assert fit.host.per_arrival == pytest.approx(0.0, abs=1e-9) and fit.host.per_completion == pytest.approx(0.0, abs=1e-9)


def test_the_scatter_is_the_batches_log_normal_spread_about_the_fit():
    def exact(lengths, arrivals):
        return 1.2 * COST.predict_lengths(lengths) + 0.003 * arrivals

    batches = random_batches(7, 400, lambda rng, lengths, arrivals, after:
                             exact(lengths, arrivals) * rng.lognormvariate(0.0, 0.15))
    fit = fit_host(batches, COST)
    assert fit.scatter == pytest.approx(0.15, rel=0.2)
    on_the_fit = [LiveBatch(0.0, exact(b.lengths, b.arrivals), b.lengths, b.arrivals, b.after) for b in batches]
    assert fit_host(on_the_fit, COST).scatter < 1e-6


def test_too_few_batches_are_refused():
    with pytest.raises(ValueError, match="too few"):
        fit_host([LiveBatch(0.0, 0.1, [10], 0, 0)] * 3, COST)
    with pytest.raises(ValueError, match="no host work beside them"):  # the speed needs quiet batches
        fit_host([LiveBatch(0.0, 0.1, [10], 1, 0)] * 20 + [LiveBatch(0.0, 0.1, [10], 0, 0)] * 4, COST)


def test_two_batches_of_the_same_duration_stay_apart():
    records = [record(1.0, 0.2, 0.1), record(1.001, 0.2, 0.1), record(1.2, 0.2, 0.1), record(1.202, 0.2, 0.1)]
    first, second = live_batches(records, [1, 2, 3, 4])
    assert first.lengths == [1, 2] and second.lengths == [3, 4]


def test_run_speed_takes_the_host_out():
    host = HostLoad(0.004, 0.002)
    batches = []
    for k in range(30):
        lengths = [16 * (k % 5 + 1)] * (k % 3 + 1)
        arrivals, after = k % 7, k % 4
        seconds = 1.25 * COST.predict_lengths(lengths) + 0.004 * arrivals + 0.002 * after
        batches.append(LiveBatch(0.0, seconds, lengths, arrivals, after))
    assert run_speed(batches, COST, host) == pytest.approx(1.25)
    with pytest.raises(ValueError):
        run_speed([], COST, host)


def write_lone_requests(folder, name: str, lengths: list[int], arrivals: list[float], model: CostModel, speed: float):
    """Answers of requests served one at a time, far apart: each its own batch of speed x the model's time."""
    records = []
    for length, arrival in zip(lengths, arrivals):
        seconds = speed * model.predict_lengths([length])
        received = arrival + seconds + 0.001
        records.append({"status": 200, "sent": arrival, "received": received, "latency": received - arrival,
                        "inference": seconds, "total": received - arrival})
    (folder / name).write_text(json.dumps(records))
    return records


def test_resimulate_finds_each_runs_speed(tmp_path):
    lengths = [random.Random(1).randint(8, 128) for _ in range(40)]
    arrivals = [0.5 * i for i in range(40)]  # far apart: every batch is alone, with nothing beside it
    model = CostModel.linear(0.01, 0.0005, 0.0, 0.0002)
    calibration = write_lone_requests(tmp_path, "calibration-answers.json", lengths, arrivals, model, 1.1)
    (tmp_path / "calibration.json").write_text(json.dumps({"arrivals": arrivals, "lengths": lengths, "results": calibration,
                                                           "start_model": model.to_json()}))
    (tmp_path / "trace-0.5.json").write_text(json.dumps({"arrivals": arrivals, "lengths": lengths}))
    runs = []
    for i, (policy, speed) in enumerate([("dp", 1.3), ("fifo", 0.9)]):
        write_lone_requests(tmp_path, f"answers-0.5-{policy}-{i}.json", lengths, arrivals, model, speed)
        runs.append({"load": 0.5, "live": {"policy": policy, "goodput": 2.0, "slo_attainment": 1.0},
                     "sim": {"goodput": 2.0}, "start_model": model.to_json()})
    (tmp_path / "live_policies.json").write_text(json.dumps({"slo_s": 1.0, "runs": runs}))
    rows = resimulate(tmp_path)
    assert [r["policy"] for r in rows] == ["dp", "fifo"]
    assert rows[0]["speed"] == pytest.approx(1.3, rel=1e-3) and rows[1]["speed"] == pytest.approx(0.9, rel=1e-3)
    assert all(r["sim_run_slo"] == 1.0 for r in rows)  # 0.1 s batches, 0.5 s apart, SLO 1 s
