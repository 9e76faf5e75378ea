"""Smoke test of bench/embedding_cache.py: every part on tiny sizes gives sane outputs (it measures nothing)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bench.cache_trace import KeyHash
from bench.embcache.hitrate import ideal_lfu_hits, static_oracle_hits
from bench.embedding_cache import cache_slots, call_costs, dlrm_end_to_end, hit_rate_grid, main, throughput

RATES = ("device_lru", "device_lfu", "device_tinylfu", "lru_ref", "lfu_ref", "static_frequency", "static_oracle", "ideal_lfu", "belady",
         "belady_bypass")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The benchmark's default (main sets it too); restored afterwards for the other tests of the session."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_hit_rates_are_rates_and_belady_bounds_them():
    cells = hit_rate_grid(rows=4000, fractions=(0.02, 0.1), alphas=(1.05, 0.0), batch=128, batches=30, warm_batches=15,
                          ways=8, lfu_reference=True)
    assert [(c["alpha"], c["fraction"]) for c in cells] == [(1.05, 0.02), (1.05, 0.1), (0.0, 0.02), (0.0, 0.1)]
    for c in cells:
        assert c["slots"] == cache_slots(4000, c["fraction"], 8) and c["slots"] % 8 == 0
        assert 0 < c["lookups"] <= 15 * 128
        assert all(0.0 <= c[k] <= 1.0 for k in RATES), c
        # LRU and LFU references insert every miss: the demand-paging optimum bounds them; bypass bounds everything
        assert c["belady"] >= max(c["lru_ref"], c["lfu_ref"]), c
        assert c["belady_bypass"] >= max(c["belady"], c["device_lru"], c["device_lfu"], c["device_tinylfu"]), c
        assert c["belady_bypass"] >= max(c["static_frequency"], c["static_oracle"], c["ideal_lfu"]), c  # all bypass
    skewed = [c for c in cells if c["alpha"] == 1.05]
    assert all(c["belady"] > 0.2 for c in skewed)
    assert skewed[1]["belady"] >= skewed[0]["belady"]  # a bigger cache cannot do worse at the optimum
    # Frozen with the truly most probable keys: beats the frozen past-frequency guess at 2% (80 of 4,000 keys,
    # 15 warm-up batches rank the tail by noise), and is far above the cache's share on skewed keys.
    assert skewed[0]["static_oracle"] > skewed[0]["static_frequency"]
    assert all(c["static_oracle"] > 3 * c["fraction"] for c in skewed)


def test_throughput_every_tier_answers():
    rows = throughput(rows=2048, dim=64, batch=512, batches=2, rounds=1, use_redis=True)
    assert [r["tier"] for r in rows] == ["device cache", "volatile (memory)", "redis", "persistent (RocksDB)",
                                         "ParameterServer (warm)"]
    for r in rows:
        assert r["keys_per_s"] > 0 and r["GB_per_s"] == pytest.approx(r["keys_per_s"] * 64 * 4 / 1e9)
    assert next(r for r in rows if r["tier"].startswith("persistent"))["vs_persistent"] == 1.0


def test_dlrm_paths_agree():
    (d,) = dlrm_end_to_end(scale=0.0005, dim=4, batch=64, cache_fractions=(0.2,), warm_batches=4, timed_batches=2,
                           rounds=2, bottom=(8,), top=(8,))
    assert d["max_score_diff"] <= 1e-5
    assert d["server_samples_per_s"] > 0 and d["persistent_samples_per_s"] > 0 and d["ratio"] > 0
    assert 0.0 <= d["device_hit_rate_timed"] <= 1.0
    assert d["server_lookup_ms_per_batch"] <= d["server_ms_per_batch"]


def test_call_costs_positive():
    rows = call_costs(cache_slots_list=(256,), sizes=(10,), dim=4, repeats=2, tables=3)
    assert [(r["tier"], r["keys"]) for r in rows] == [("device cache", 100), ("volatile", 10), ("persistent", 10),
                                                      ("device x3 tables", 300), ("volatile x3 tables", 300)]
    assert all(r["lookup_ms"] > 0 and r["insert_ms"] > 0 for r in rows)
    assert all(r["per_table_lookup_ms"] > 0 and r["per_table_insert_ms"] > 0 for r in rows[3:])


def test_main_quick_path_writes_json(tmp_path, capsys):
    assert main(["--quick", "--hit-scale", "0.0005", "--hit-batch", "128", "--hit-batches", "10", "--tp-rows", "2048",
                 "--tp-batch", "512", "--dlrm-scale", "0.0005", "--dlrm-warm", "2", "--dlrm-batch", "64",
                 "--only", "hit,throughput,dlrm", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "embedding_cache.json").read_text())
    assert {"hit_rates", "throughput", "dlrm", "machine", "commit"} <= set(results)
    assert len(results["hit_rates"]["cells"]) == 12 and len(results["dlrm"]) == 2
    out = capsys.readouterr().out
    assert "Belady" in out and "ParameterServer" in out and "samples/s" in out


def test_oracle_keeps_the_most_probable_keys_seen_and_misses_first_lookups():
    # One key a batch, 2 slots; ranks 0 and 1 are the most probable. Before each batch the cache holds the two
    # lowest ranks seen so far: 0 miss, 1 miss, 5 miss, 0 hit, 5 miss (not held), 1 hit, 0 hit.
    ranks = np.array([0, 1, 5, 0, 5, 1, 0])
    keys = KeyHash(8, 4)(ranks)
    assert static_oracle_hits(keys, batch=1, warm_batches=0, slots=2, rows=8, seed=4) == (3, 7)
    assert static_oracle_hits(keys, batch=1, warm_batches=3, slots=2, rows=8, seed=4) == (3, 4)


def test_ideal_lfu_holds_the_keys_counted_most():
    # 3 3 3 1 1 2 3 1 2 with 2 slots: 2 never displaces 3 or 1, counted more: hits at 3 3 . 1 . 3 1 .
    keys = np.array([3, 3, 3, 1, 1, 2, 3, 1, 2])
    assert ideal_lfu_hits(keys, batch=1, warm_batches=0, slots=2, rows=8) == (5, 9)
