"""RocksDB persistent tier: semantics, metadata, reopen, and a write that survives a killed process."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from embeddings.persistent import PersistentTier, encode_keys
from embeddings.tier import TableSpec


def test_key_encoding_sorts_like_the_numbers():
    keys = np.array([5, -1, 0, -(1 << 63), (1 << 63) - 1, 3])
    assert sorted(encode_keys(keys)) == encode_keys(np.sort(keys))


def test_insert_lookup_update_evict(tmp_path):
    tier = PersistentTier(tmp_path / "db", sync=False)
    tier.create_table(TableSpec("t", 3, torch.tensor([1.0, 2.0, 3.0])))
    tier.insert("t", torch.tensor([10, -10, 10]), torch.tensor([[1.0] * 3, [2.0] * 3, [3.0] * 3]))
    vectors, found = tier.lookup("t", torch.tensor([10, 11, -10]))
    assert found.tolist() == [True, False, True]
    assert vectors.tolist() == [[3.0] * 3, [1.0, 2.0, 3.0], [2.0] * 3]
    assert tier.update("t", torch.tensor([11]), torch.zeros(1, 3)) == 1  # the source of truth takes new rows
    assert tier.lookup("t", torch.tensor([11]))[1].tolist() == [True]
    assert tier.evict("t", torch.tensor([10, 12])) == 1
    assert tier.lookup("t", torch.tensor([10]))[1].tolist() == [False]
    assert tier.counters()["hits"] == 3 and tier.counters()["misses"] == 2
    tier.close()


def test_tables_are_separate_column_families(tmp_path):
    tier = PersistentTier(tmp_path / "db")
    tier.create_table(TableSpec("a", 2))
    tier.create_table(TableSpec("b", 4))
    tier.insert("a", torch.tensor([1]), torch.ones(1, 2))
    assert tier.lookup("b", torch.tensor([1]))[1].tolist() == [False]
    with pytest.raises(ValueError, match="dim=2"):
        tier.create_table(TableSpec("a", 3))
    tier.close()


def test_reopen_finds_tables_rows_and_defaults(tmp_path):
    tier = PersistentTier(tmp_path / "db")
    tier.create_table(TableSpec("clicks", 4, torch.full((4,), 0.25), rows=1000))
    tier.create_table(TableSpec("users", 2))
    keys = torch.arange(0, 5000, 7)
    values = torch.randn(keys.numel(), 4)
    tier.insert("clicks", keys, values)
    tier.close()
    again = PersistentTier(tmp_path / "db")
    assert sorted(again.tables) == ["clicks", "users"]
    spec = again.tables["clicks"]
    assert spec.dim == 4 and spec.rows == 1000 and spec.default.tolist() == [0.25] * 4
    vectors, found = again.lookup("clicks", torch.cat([keys, torch.tensor([1])]))
    assert found[:-1].all() and not found[-1]
    assert torch.equal(vectors[:-1], values) and vectors[-1].tolist() == [0.25] * 4
    again.create_table(TableSpec("clicks", 4))  # re-creating keeps the stored default
    assert again.tables["clicks"].default.tolist() == [0.25] * 4
    again.close()


def test_an_acknowledged_write_survives_a_killed_process(tmp_path):
    path = tmp_path / "db"
    script = textwrap.dedent(f"""
        import os, torch
        from embeddings.persistent import PersistentTier
        from embeddings.tier import TableSpec
        tier = PersistentTier({str(path)!r}, sync=True)
        tier.create_table(TableSpec("t", 2))
        tier.update("t", torch.tensor([42]), torch.tensor([[4.0, 2.0]]))
        print("acknowledged", flush=True)
        os._exit(9)  # no close, no flush of memtables: only the WAL has the row
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert "acknowledged" in result.stdout, result.stderr
    tier = PersistentTier(path)
    vectors, found = tier.lookup("t", torch.tensor([42]))
    assert found.tolist() == [True] and vectors.tolist() == [[4.0, 2.0]]
    tier.close()


def test_the_servers_own_reads_are_not_counted_as_lookups(tmp_path):
    """refresh (the update stream's settling) reads rows to rewrite the caches: no hit or miss of a client's lookup."""
    from embeddings.hierarchy import ParameterServer  # noqa: PLC0415

    server = ParameterServer(PersistentTier(tmp_path / "db", sync=False))
    server.create_table("t", 2)
    server.update("t", torch.tensor([1, 2]), torch.ones(2, 2))
    assert server.refresh("t", torch.tensor([1, 2, 3])) == 2
    assert server.persistent.counters()["hits"] == 0 and server.persistent.counters()["misses"] == 0
    server.lookup("t", torch.tensor([1, 3]))
    assert server.persistent.counters()["hits"] == 1 and server.persistent.counters()["misses"] == 1
    server.close()


def test_scan_reads_rows_in_key_order_in_chunks(tmp_path):
    tier = PersistentTier(tmp_path / "db", sync=False)
    tier.create_table(TableSpec("t", 2))
    keys = np.array([5, -7, 2**62, 0, -(2**63), 2**63 - 1, 42])
    tier.insert("t", torch.from_numpy(keys), torch.from_numpy(np.stack([keys / 2**60, -keys / 2**60], 1)))
    got, vectors = tier.scan("t")
    assert got.tolist() == sorted(keys.tolist()) and got.dtype == np.int64
    np.testing.assert_array_equal(vectors[:, 0], (got / 2**60).astype(np.float32))
    assert tier.scan("t", 1, limit=2)[0].tolist() == [5, 42] and tier.scan("t", 2**62 + 1)[0].tolist() == [2**63 - 1]
    assert tier.scan("t", limit=0)[0].size == 0 and tier.counters()["hits"] == 0  # a scan is not a lookup
    tier.flush()
    assert tier.estimated_rows("t") == 7
    tier.close()
