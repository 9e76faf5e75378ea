"""bench/sim_fidelity.py on two runs of a recorded live_capacity folder (session 24's bursts, SLO 1 s)."""

import json
import math
import shutil
from pathlib import Path

from bench.sim_fidelity import fidelity
from scheduler.simulator import Spells

RECORDED = Path(__file__).resolve().parents[2] / "bench" / "results" / "s24" / "live_capacity_bursts"


def test_each_run_is_simulated_at_its_own_speed_and_a_capacity_at_the_median(tmp_path: Path):
    report = json.loads((RECORDED / "live_capacity.json").read_text())
    report["runs"] = report["runs"][:2]  # dp and fifo at load 0.24: both held the SLO live
    (tmp_path / "live_capacity.json").write_text(json.dumps(report))
    for name in ("calibration.json", "answers-dp-1.json", "answers-fifo-2.json"):
        shutil.copy(RECORDED / name, tmp_path / name)
    result = fidelity(tmp_path, synthetic=Spells((0.08, 0.1), (0.4, 40.0)))
    assert [r["policy"] for r in result["rows"]] == ["dp", "fifo"]
    for row in result["rows"]:
        assert 0.9 < row["speed"] < 1.5 and row["passed"]
        for key in ("calibration", "runs", "spells", "synthetic"):
            assert 0.5 < row[key]["p99"] / row["live_p99"] < 1.5 and 0 <= row[key]["passes"] <= 7
    assert set(result["summary"]) == {"calibration", "runs", "spells", "synthetic"}
    assert result["summary"]["runs"]["runs"] == 2 and result["summary"]["runs"]["agree"] == 2
    fit = result["runs_fit"]
    assert fit["per_arrival_s"] >= 0 and fit["per_forward_s"] >= 0 and 0 < fit["median_error"] < 0.2
    for policy in ("dp", "fifo"):
        capacity = result["capacities"][policy]
        assert capacity["passed_up_to"] > 0.2 and math.isinf(capacity["failed_from"])  # one passing run each
        assert 0 < capacity["simulated"] < 2
