"""What the recommendation-serving tests share: a small DLRM's config, its data (the `dlrm` fixture in conftest.py
builds them with make_dlrm), the sections that serve it, and the reference scores."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from models.dlrm import DLRMConfig, SparseFeature, TableLookup, load_dlrm, save_dlrm, save_random_tables
from server.import_tables import import_table

NAME = "ctr"
CONFIG = DLRMConfig(num_dense=3, bottom_mlp=(8, 4), top_mlp=(8, 1), embedding_dim=4,
                    sparse_features=(SparseFeature("user", "users", 200), SparseFeature("item", "items", 100),
                                     SparseFeature("history", "items", 100)))


def wait_until(condition, timeout=1.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout} s"
        time.sleep(0.01)


def embedding_sections(dlrm, **extra):
    emb = {"enabled": True, "path": str(dlrm["db"]), "cache_rows": 32, "cache_ways": 4, "cache_device": "cpu", "max_keys": 64}
    emb.update(extra)
    return {"embeddings": emb, "recommend": {"model_path": str(dlrm["folder"]), "max_batch": 8}}


def bags(rows):
    """JSON rows (key or list of keys per sample) as (keys, offsets) tensors."""
    lists = [[r] if isinstance(r, int) else r for r in rows]
    lengths = torch.tensor([len(x) for x in lists])
    return torch.tensor([k for x in lists for k in x], dtype=torch.int64), torch.cumsum(lengths, 0) - lengths


def reference_scores(dlrm, dense, sparse):
    with torch.inference_mode():
        return dlrm["reference"](torch.tensor(dense, dtype=torch.float32), {f: bags(r) for f, r in sparse.items()}).numpy()


DENSE = [[0.5, -1.0, 2.0], [0.0, 0.25, -0.5], [1.5, 1.5, 1.5]]
SPARSE = {"user": [3, 199, 3], "item": [7, 0, 99], "history": [[1, 2, 3], [], [7, 7, 50, 99]]}


def make_dlrm(base: Path) -> dict:
    """A DLRM folder (named NAME), its tables as .npy, and a RocksDB store with them imported (plus 'scratch')."""
    folder = save_dlrm(base / NAME, CONFIG, seed=0)
    tables = save_random_tables(base / "tables", CONFIG, seed=1)
    db = base / "db"
    for table, path in tables.items():
        import_table(str(db), table, str(path), progress=False)
    np.save(base / "scratch.npy", np.zeros((50, 3), np.float32))
    import_table(str(db), "scratch", str(base / "scratch.npy"), default_vector="-1", progress=False)
    reference = load_dlrm(folder, TableLookup.from_folder(base / "tables", CONFIG))
    return {"folder": folder, "tables": tables, "db": db, "reference": reference, "base": base}


