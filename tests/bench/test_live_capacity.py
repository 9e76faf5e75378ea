"""bench/live_capacity.py's bisection and pass criterion (the live runs themselves are a benchmark)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from bench.live_capacity import bisect_live, passes
from bench.live_server import sim_capacities, simulation_limits
from scheduler.cost_model import CostModel
from scheduler.simulator import HostLoad, poisson_arrivals


def test_bisection_finds_each_policys_threshold_with_steps_interleaved():
    true = {"dp": 0.46, "fifo": 0.34}
    calls = []

    def run(policy, load):
        calls.append(policy)
        return load <= true[policy]

    found = bisect_live(["dp", "fifo"], {"dp": (0.225, 0.675), "fifo": (0.18, 0.54)}, steps=8, run=run)
    assert calls[:4] == ["dp", "fifo", "dp", "fifo"]
    for p in true:
        width = 2 * 0.5 * {"dp": 0.45, "fifo": 0.36}[p] / 2 ** 8
        assert true[p] - width <= found[p]["capacity"] <= true[p]
        assert not found[p]["below_bracket"] and not found[p]["above_bracket"]


@pytest.mark.parametrize(("threshold", "below", "above"), [(0.01, True, False), (5.0, False, True)])
def test_a_capacity_outside_the_bracket_is_flagged(threshold, below, above):
    found = bisect_live(["fifo"], {"fifo": (0.5, 1.5)}, steps=4, run=lambda p, load: load <= threshold)
    assert found["fifo"]["below_bracket"] is below and found["fifo"]["above_bracket"] is above
    assert found["fifo"]["bracket"] == [0.5, 1.5]
    assert found["fifo"]["capacity"] == (0.5 if below else pytest.approx(1.5 - 1.0 / 2 ** 4))


def test_a_run_passes_only_in_time_complete_and_keeping_up():
    good = {"errors": 0, "p99": 0.9, "throughput": 20.0}
    assert passes(good, 20.5, slo=1.0)
    assert not passes(good | {"p99": 1.01}, 20.5, slo=1.0)
    assert not passes(good | {"errors": 1}, 20.5, slo=1.0)
    assert not passes(good, 21.0, slo=1.0)  # 20 < 0.97 x 21: a queue that grows


def test_a_policy_spec_carries_scheduler_settings_of_its_own():
    from bench.live_server import policy_spec, sim_config

    assert policy_spec("dp") == ("dp", {})
    assert policy_spec("dp:deadline_margin=0+max_wait_ms=2") == ("dp", {"deadline_margin": "0", "max_wait_ms": "2"})
    assert sim_config("dp:deadline_margin=0").deadline_margin == 0.0
    assert sim_config("dp").deadline_margin == 1.0  # the setting's default
    for bad in ("nope", "dp:no_such_setting=1", "dp:policy=fifo", "dp:deadline_margin=-1", "dp:deadline_margin"):
        with pytest.raises(ValueError):
            policy_spec(bad)


def test_scattered_batch_times_lower_a_baselines_simulated_capacity():
    """sim_capacities with `scatter`: each simulated batch's time scattered (log-normal), the median over the noise
    seeds; a policy blind to deadlines loses p99 to slow batches, so fifo's capacity falls, and the report says so."""
    cost = CostModel([0.004, 0.0002, 0.00008, 0.0], [1.0], [1.0])
    rng = random.Random(3)
    lengths = [rng.randint(8, 256) for _ in range(300)]
    found = {}
    for scatter in (0.0, 0.4):
        report = {}
        sim_capacities(lengths, poisson_arrivals, simulation_limits(), 0.5, report, cost, cost, HostLoad(), ("fifo",),
                       scatter)
        found[scatter] = report["sim_capacity"]["loads"]["fifo"]
        assert report["sim_capacity"]["scatter"] == scatter
    assert 0 < found[0.4] < found[0.0]


def test_the_arrival_seed_picks_the_trace_the_simulation_bisects_over(tmp_path):
    from bench.live_server import ARRIVAL_SEED, sim_capacity  # noqa: PLC0415
    from bench.sim_fidelity import load_folder  # noqa: PLC0415
    from scheduler.simulator import bursty_arrivals  # noqa: PLC0415

    cost = CostModel([0.004, 0.0002, 0.00008, 0.0], [1.0], [1.0])
    rng = random.Random(3)
    lengths = [rng.randint(8, 256) for _ in range(300)]

    def capacity(seed):
        return sim_capacity("fifo", lengths, bursty_arrivals, 100.0, simulation_limits(), 0.5, cost, cost, HostLoad(),
                            arrival_seed=seed)

    assert ARRIVAL_SEED == 7 and capacity(7) == sim_capacity("fifo", lengths, bursty_arrivals, 100.0, simulation_limits(),
                                                            0.5, cost, cost, HostLoad())
    assert len({capacity(seed) for seed in (7, 8, 9)}) > 1  # other bursts, other capacities
    # bench/sim_fidelity.py replays a folder on the seed its command named (7 when it named none)
    recorded = Path(__file__).resolve().parents[2] / "bench" / "results" / "s24" / "live_capacity_bursts"
    report = json.loads((recorded / "live_capacity.json").read_text())
    report["runs"] = []
    for seed, command in ((7, report["command"]), (12, report["command"] + " --arrival-seed 12")):
        (tmp_path / "live_capacity.json").write_text(json.dumps(report | {"command": command}))
        shutil.copy(recorded / "calibration.json", tmp_path / "calibration.json")
        assert load_folder(tmp_path)["arrival_seed"] == seed
