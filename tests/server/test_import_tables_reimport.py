"""`turboserve import-embeddings` over a table that exists: epochs and row counts after a failed, interrupted or
larger re-import; an empty file's table served; the first bad line named; repeated CSV keys counted."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from configs.settings import EmbeddingSettings
from embeddings.factory import build_parameter_server
from embeddings.persistent import PersistentTier
from server.import_tables import ImportFailed, import_table


def _spec(db, table):
    tier = PersistentTier(db, read_only=True)
    try:
        return tier.tables[table]
    finally:
        tier.close()


def _stored(db, table, keys):
    tier = PersistentTier(db, read_only=True)
    try:
        vectors, found = tier.read(table, torch.tensor(keys, dtype=torch.int64))
        return vectors.numpy(), found.numpy()
    finally:
        tier.close()


@pytest.fixture
def table(tmp_path):
    """A store with table 't': 100 rows of dim 2 (all 1.0), imported; (db, its epoch)."""
    db = str(tmp_path / "db")
    np.save(tmp_path / "old.npy", np.ones((100, 2), np.float32))
    import_table(db, "t", str(tmp_path / "old.npy"), progress=False)
    return db, _spec(db, "t").epoch


def test_a_failed_reimport_that_wrote_rows_gives_the_table_a_new_epoch(tmp_path, table):
    """Rows 0..19 rewritten, then a bad line: a shared Redis tier must not go on serving the old rows of keys 0..19
    under the old epoch (the epoch was set only on success)."""
    db, before = table
    lines = [f"{k},2,2" for k in range(30)]
    lines[25] = "25,x,2"
    (tmp_path / "bad.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(ImportFailed, match="line 26 holds a value that is not a number; the 20 rows before it"):
        import_table(db, "t", str(tmp_path / "bad.csv"), chunk_rows=10, progress=False)
    spec = _spec(db, "t")
    assert spec.epoch and spec.epoch != before
    vectors, _ = _stored(db, "t", [0, 19, 20])
    assert vectors.tolist() == [[2, 2], [2, 2], [1, 1]] and spec.rows == 100


def test_an_interrupted_reimport_gives_the_table_a_new_epoch(tmp_path, table, monkeypatch):
    db, before = table
    np.save(tmp_path / "new.npy", np.full((50, 2), 3, np.float32))
    insert = PersistentTier.insert
    calls = []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        insert(self, *args, **kwargs)

    monkeypatch.setattr(PersistentTier, "insert", interrupted)
    with pytest.raises(KeyboardInterrupt):
        import_table(db, "t", str(tmp_path / "new.npy"), chunk_rows=10, progress=False)
    monkeypatch.undo()
    assert _spec(db, "t").epoch != before
    assert _stored(db, "t", [19, 20])[0].tolist() == [[3, 3], [1, 1]]


def test_an_identical_reimport_still_gives_replicas_the_same_epoch(tmp_path, table):
    """A finished import's epoch stays a digest (replicas imported alike share Redis); a failed one's is its own."""
    _, before = table
    other = str(tmp_path / "other")
    import_table(other, "t", str(tmp_path / "old.npy"), progress=False)
    assert _spec(other, "t").epoch == before


def test_a_reimport_of_more_rows_records_the_new_row_count(tmp_path, table):
    """The device cache is sized from the stored rows: 100 kept after importing 300 sized it for a third."""
    db, _ = table
    np.save(tmp_path / "more.npy", np.ones((300, 2), np.float32))
    import_table(db, "t", str(tmp_path / "more.npy"), progress=False)
    assert _spec(db, "t").rows == 300
    np.save(tmp_path / "fewer.npy", np.ones((40, 2), np.float32))
    import_table(db, "t", str(tmp_path / "fewer.npy"), progress=False)
    assert _spec(db, "t").rows == 300  # rows 40..299 are still stored


def test_a_table_imported_from_an_empty_file_is_served(tmp_path):
    """A [0, 4] .npy made a table with no rows, and every server on the store stayed unready ("a fractional cache
    capacity needs the table's rows")."""
    db = str(tmp_path / "db")
    np.save(tmp_path / "zero.npy", np.zeros((0, 4), np.float32))
    assert "imported 0 rows of dim 4" in import_table(db, "z", str(tmp_path / "zero.npy"), progress=False)
    ps = build_parameter_server(EmbeddingSettings(enabled=True, path=db, cache_fraction=0.2), device="cpu")
    try:
        vectors, found = ps.lookup("z", torch.tensor([0, 5]))
        assert not found.any() and vectors.shape == (2, 4)
    finally:
        ps.close()


def test_a_non_finite_value_is_reported_at_its_line_or_row(tmp_path):
    db = str(tmp_path / "db")
    lines = [f"{k},1,1" for k in range(30)]
    lines[13] = "13,1,nan"
    (tmp_path / "nan.csv").write_text("key,a,b\n" + "\n".join(lines) + "\n")
    with pytest.raises(ImportFailed, match=r"the values on line 15 hold NaN or infinity .*; the 10 rows before it"):
        import_table(db, "c", str(tmp_path / "nan.csv"), chunk_rows=10, progress=False)
    rows = np.ones((30, 2), np.float32)
    rows[17, 1] = np.inf
    np.save(tmp_path / "inf.npy", rows)
    with pytest.raises(ImportFailed, match=r"the values of row 17 hold NaN or infinity"):
        import_table(db, "n", str(tmp_path / "inf.npy"), chunk_rows=10, progress=False)


def test_repeated_csv_keys_are_counted_and_the_last_line_wins(tmp_path):
    db = str(tmp_path / "db")
    (tmp_path / "dup.csv").write_text("1,1,1\n2,2,2\n1,3,3\n3,4,4\n2,5,5\n")
    summary = import_table(db, "d", str(tmp_path / "dup.csv"), chunk_rows=2, progress=False)
    assert "imported 5 rows" in summary and "2 of them repeated an earlier line's key (the last line wins)" in summary
    assert _stored(db, "d", [1, 2, 3])[0].tolist() == [[3, 3], [5, 5], [4, 4]]
    assert _spec(db, "d").rows == 3
    assert "of them repeated" not in import_table(db, "e", str(tmp_path / "dup.csv"), csv_layout="ordered", progress=False)
