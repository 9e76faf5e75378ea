"""bench/policy_ab.py and bench/simulate.py's option parsers: the specs and device models an A/B is run with."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from bench.policy_ab import spec_config
from bench.simulate import host_ms, spells
from scheduler.simulator import HostLoad, Spells

REPO = Path(__file__).resolve().parents[2]


def test_a_spec_changes_only_the_fields_it_names():
    base = spec_config("dp")
    assert base.name == "dp" and base.max_wait == 0.005 and base.late_grace == 4.0 and base.fixed_batch_size == 32
    c = spec_config("dp:margin_averaging=0.5;shed_longest=0;keep_up=2;partition_cost=refined")
    assert (c.margin_averaging, c.shed_longest, c.keep_up, c.partition_cost) == (0.5, False, 2.0, "refined")
    assert c.deadline_margin == base.deadline_margin and spec_config("fifo:fixed_batch_size=8").fixed_batch_size == 8
    for bad in ("dp:nope=1", "dp:keep_up", "dp:keep_up=fast", "dp:name=fifo"):
        with pytest.raises(argparse.ArgumentTypeError):
            spec_config(bad)


def test_host_and_spells_options():
    assert host_ms("1.74,0.27,0.82") == HostLoad(0.00174, 0.00027, per_forward=0.00082)
    assert host_ms("1,2") == HostLoad(0.001, 0.002)
    assert spells("0.079:0.32,0.075:9.28") == Spells((0.079, 0.075), (0.32, 9.28)) and not spells("")
    for parse, bad in ((host_ms, "1"), (host_ms, "1,-2"), (host_ms, "a,b"), (spells, "0.1"), (spells, "0.1:0"),
                       (spells, "x:1")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(bad)


def test_the_command_prints_each_spec_against_the_first():
    out = subprocess.run([sys.executable, "bench/policy_ab.py", "--slo-ms", "1000", "--family", "uniform", "--arrivals",
                          "poisson", "--requests", "300", "--bisect-steps", "2", "--seeds", "2", "--spells", "0.05:0.3",
                          "dp", "fifo"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "Spells(sigma=(0.05,), tau=(0.3,))" in lines[0]
    assert len(lines) == 2 and lines[1].startswith("uniform 8-256") and " | fifo " in lines[1] and "% se " in lines[1]
