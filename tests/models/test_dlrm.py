"""DLRM against a plain reference (torch.nn.EmbeddingBag + explicit loops) on the same weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models.config import ModelFolderError
from models.dlrm import (
    DLRM,
    DLRMConfig,
    SparseFeature,
    TableLookup,
    load_dlrm,
    read_dlrm_folder,
    save_dlrm,
    save_random_tables,
)

FEATURES = (
    SparseFeature("user", "users", 50),
    SparseFeature("item", "items", 7),
    SparseFeature("seen", "items", 7),  # shares a table with "item": one lookup for both
    SparseFeature("city", "cities", 1),
)


def _config(pooling: str = "sum") -> DLRMConfig:
    return DLRMConfig(num_dense=5, bottom_mlp=(16, 8), top_mlp=(12, 6, 1), embedding_dim=8,
                      sparse_features=FEATURES, pooling=pooling)


def _batch(cfg: DLRMConfig, batch: int, seed: int, max_bag: int = 4):
    """Random dense features and multi-hot bags (empty bags included), as flat keys + offsets."""
    gen = torch.Generator().manual_seed(seed)
    dense = torch.randn(batch, cfg.num_dense, generator=gen)
    sparse = {}
    for f in cfg.sparse_features:
        lengths = torch.randint(0, max_bag + 1, (batch,), generator=gen)
        keys = torch.randint(0, f.cardinality, (int(lengths.sum()),), generator=gen)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
        sparse[f.name] = (keys, offsets)
    return dense, sparse


@pytest.fixture(params=["sum", "mean"])
def model_folder(tmp_path, request):
    cfg = _config(request.param)
    save_dlrm(tmp_path / "model", cfg, seed=3)
    save_random_tables(tmp_path / "tables", cfg, seed=4, chunk_rows=16)  # several chunks for "users"
    return tmp_path, cfg


def _reference(folder, cfg: DLRMConfig, dense, sparse) -> torch.Tensor:
    """The textbook DLRM, one sample at a time, from the files on disk."""
    weights = __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(folder / "model" / "model.safetensors"))
    bags = {}
    for f in cfg.sparse_features:
        table = torch.from_numpy(np.load(folder / "tables" / f"{f.table}.npy"))
        bag = torch.nn.EmbeddingBag.from_pretrained(table, mode=cfg.pooling)
        bags[f.name] = bag(*sparse[f.name])  # [B, d]
    scores = []
    for b in range(dense.shape[0]):
        x = dense[b]
        for k in range(len(cfg.bottom_mlp)):
            x = torch.relu(weights[f"bottom.{k}.weight"] @ x + weights[f"bottom.{k}.bias"])
        vectors = [x] + [bags[f.name][b] for f in cfg.sparse_features]
        dots = [torch.dot(vectors[i], vectors[j]) for i in range(len(vectors)) for j in range(i + 1, len(vectors))]
        h = torch.cat([x, torch.stack(dots)])
        for k in range(len(cfg.top_mlp)):
            h = weights[f"top.{k}.weight"] @ h + weights[f"top.{k}.bias"]
            h = torch.relu(h) if k < len(cfg.top_mlp) - 1 else torch.sigmoid(h)
        scores.append(h[0])
    return torch.stack(scores)


class CountingLookup(TableLookup):
    """Records every call, to check de-duplication."""

    def __init__(self, tables):
        super().__init__(tables)
        self.calls: list[tuple[str, torch.Tensor]] = []

    def __call__(self, table, keys):
        self.calls.append((table, keys.clone()))
        return super().__call__(table, keys)


def test_matches_reference(model_folder):
    folder, cfg = model_folder
    model = load_dlrm(folder / "model", TableLookup.from_folder(folder / "tables", cfg))
    for batch, seed in [(1, 0), (9, 1), (64, 2)]:
        dense, sparse = _batch(cfg, batch, seed)
        with torch.inference_mode():
            ours = model(dense, sparse)
        assert ours.shape == (batch,) and ours.dtype == torch.float32
        torch.testing.assert_close(ours, _reference(folder, cfg, dense, sparse), rtol=1e-5, atol=1e-5)


def test_shapes_and_include_last_offset(model_folder):
    folder, cfg = model_folder
    model = load_dlrm(folder / "model", TableLookup.from_folder(folder / "tables", cfg))
    dense, sparse = _batch(cfg, 6, seed=5)
    pooled = model.pool(sparse, 6)
    assert pooled.shape == (6, len(cfg.sparse_features), cfg.embedding_dim)
    assert cfg.top_input == 8 + 5 * 4 // 2
    with_end = {n: (k, torch.cat([o, torch.tensor([k.numel()])])) for n, (k, o) in sparse.items()}
    torch.testing.assert_close(model(dense, with_end), model(dense, sparse))
    empty = {n: (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)) for n in sparse}
    assert model(torch.zeros(0, cfg.num_dense), empty).shape == (0,)


def _served(model_folder, make_lookup, seed):
    """The folder's model over a lookup made from its tables, and a batch of 32 bags of up to 6 keys."""
    folder, cfg = model_folder
    tables = {t: np.load(folder / "tables" / f"{t}.npy") for t in cfg.tables}
    lookup = make_lookup(tables)
    return cfg, tables, lookup, load_dlrm(folder / "model", lookup), *_batch(cfg, 32, seed=seed, max_bag=6)


def test_dedup_same_result_fewer_rows(model_folder):
    cfg, _, lookup, model, dense, sparse = _served(model_folder, CountingLookup, seed=6)
    deduped = model(dense, sparse)
    assert [t for t, _ in lookup.calls] == list(cfg.tables)  # one call per table, features on a table merged
    for table, keys in lookup.calls:
        assert torch.equal(keys, torch.unique(keys))
        wanted = torch.cat([sparse[f.name][0] for f in cfg.sparse_features if f.table == table])
        assert set(keys.tolist()) == set(wanted.tolist())
    lookup.calls.clear()
    plain = model(dense, sparse, dedup=False)
    assert sum(k.numel() for _, k in lookup.calls) == sum(k.numel() for k, _ in sparse.values())
    torch.testing.assert_close(deduped, plain, rtol=1e-6, atol=1e-6)


class BatchLookup(CountingLookup):
    """A lookup that also answers every table at once (as embeddings.hierarchy.ServerLookup)."""

    def __init__(self, tables):
        super().__init__(tables)
        self.batches = []

    def many(self, queries, asked):
        self.batches.append(({t: q.clone() for t, q in queries.items()}, dict(asked)))
        return {t: torch.from_numpy(self.tables[t][q.numpy()]) for t, q in queries.items()}


def test_a_lookup_with_many_is_asked_once_for_every_table(model_folder):
    folder = model_folder[0]
    cfg, tables, lookup, model, dense, sparse = _served(model_folder, BatchLookup, seed=7)
    scores = model(dense, sparse)
    assert lookup.calls == [] and len(lookup.batches) == 1
    queries, asked = lookup.batches[0]
    for table in cfg.tables:
        wanted = torch.cat([sparse[f.name][0] for f in cfg.sparse_features if f.table == table])
        assert torch.equal(queries[table], torch.unique(wanted)) and asked[table] == wanted.numel()
    torch.testing.assert_close(scores, load_dlrm(folder / "model", CountingLookup(tables))(dense, sparse), rtol=0, atol=0)
    model(dense, sparse, dedup=False)  # without de-duplication: one call a table, as before
    assert len(lookup.batches) == 1 and [t for t, _ in lookup.calls] == list(cfg.tables)
    bad = BatchLookup(tables)
    bad.many = lambda queries, asked: {}  # a table missing from the answer: the model's error, not a KeyError
    with pytest.raises(RuntimeError, match="returned NoneType"):
        load_dlrm(folder / "model", bad)(dense, sparse)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_half_precision_dense_part_scores_close_to_float32(model_folder, dtype):
    folder, cfg = model_folder
    tables = {t: np.load(folder / "tables" / f"{t}.npy") for t in cfg.tables}
    full = load_dlrm(folder / "model", TableLookup(tables))
    half = load_dlrm(folder / "model", TableLookup(tables), dtype=dtype)
    assert half.dtype == getattr(torch, dtype) and full.dtype == torch.float32
    assert all(p.dtype == half.dtype for p in half.parameters()) and half._pairs.dtype == torch.int64
    dense, sparse = _batch(cfg, 64, seed=8)
    with torch.inference_mode():
        want, got = full(dense, sparse), half(dense, sparse)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=0.02)
    assert not torch.equal(got, want)  # computed in the lower precision, not silently in float32
    with pytest.raises(ValueError, match="float64"):
        load_dlrm(folder / "model", dtype=torch.float64)


def test_seeded_files_are_deterministic(tmp_path):
    cfg = _config()
    for name in ("a", "b"):
        save_dlrm(tmp_path / name, cfg, seed=11)
        save_random_tables(tmp_path / name, cfg, seed=12)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    for t, rows in cfg.tables.items():
        a, b = np.load(tmp_path / "a" / f"{t}.npy"), np.load(tmp_path / "b" / f"{t}.npy")
        assert a.shape == (rows, cfg.embedding_dim) and a.dtype == np.float32 and np.array_equal(a, b)
    assert read_dlrm_folder(tmp_path / "a")[0] == cfg


def _model(tmp_path) -> tuple[DLRM, DLRMConfig]:
    cfg = _config()
    save_random_tables(tmp_path, cfg, seed=0)
    return DLRM(cfg, TableLookup.from_folder(tmp_path, cfg)), cfg


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda s: s.update(user=(s["user"][0], torch.tensor([0, 3, 2]))), "non-decreasing"),
        (lambda s: s.update(user=(s["user"][0], torch.tensor([1, 2, 3]))), "must start at 0"),
        (lambda s: s.update(user=(s["user"][0], torch.tensor([0, 2]))), "have 2 entries; batch is 3"),
        (lambda s: s.update(user=(torch.tensor([1, 50, 2]), torch.tensor([0, 1, 2]))), "key 50 of sparse feature 'user'"),
        (lambda s: s.update(item=(torch.tensor([-1, 2, 2]), torch.tensor([0, 1, 2]))), "key -1 of sparse feature 'item'"),
        (lambda s: s.update(user=(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 1, 2]))), "1-D integer tensor"),
        (lambda s: s.update(user=(torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2, 2]))), "end at 2, not at its 3 keys"),
        (lambda s: s.update(user=(torch.tensor([1, 2, 3]), torch.tensor([0, 1, 4]))), "within its 3 keys"),
        (lambda s: s.pop("city"), "sparse features must be exactly"),
    ],
)
def test_bad_sparse_input(tmp_path, mutate, message):
    model, cfg = _model(tmp_path)
    sparse = {f.name: (torch.tensor([0, 0, 0]), torch.tensor([0, 1, 2])) for f in cfg.sparse_features}
    mutate(sparse)
    with pytest.raises(ValueError, match=message):
        model(torch.zeros(3, cfg.num_dense), sparse)


def test_bad_dense_input(tmp_path):
    model, cfg = _model(tmp_path)
    sparse = {f.name: (torch.tensor([0]), torch.tensor([0])) for f in cfg.sparse_features}
    with pytest.raises(ValueError, match="dense features have width 4; this model takes 5"):
        model(torch.zeros(1, 4), sparse)
    with pytest.raises(ValueError, match="2-D float tensor"):
        model(torch.zeros(5), sparse)


def test_bad_lookup_result(tmp_path):
    cfg = _config()
    model = DLRM(cfg, lambda table, keys: torch.zeros(keys.numel(), 3))
    sparse = {f.name: (torch.tensor([0]), torch.tensor([0])) for f in cfg.sparse_features}
    with pytest.raises(RuntimeError, match=r"returned \(1, 3\) for 1 keys; expected \(1, 8\)"):
        model(torch.zeros(1, 5), sparse)


def test_pickle_weights_refused(tmp_path):
    cfg = _config()
    save_dlrm(tmp_path, cfg, seed=0)
    (tmp_path / "model.safetensors").unlink()
    torch.save(DLRM(cfg).state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelFolderError, match="pytorch_model.bin: pickle-based weights are refused"):
        load_dlrm(tmp_path)


def test_bad_folders(tmp_path):
    cfg = _config()
    save_dlrm(tmp_path, cfg, seed=0)
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "bottom_mlp": [16, 7]}))
    with pytest.raises(ModelFolderError, match="must be positive widths ending in self.embedding_dim=8"):
        load_dlrm(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**raw, "top_mlp": [12, 7, 1]}))
    with pytest.raises(ModelFolderError, match=r"top.1.weight has shape \(6, 12\); config needs \(7, 12\)"):
        load_dlrm(tmp_path)
    with pytest.raises(ModelFolderError, match="does not exist"):
        load_dlrm(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(pooling="max"), "pooling='max'"),
        (dict(top_mlp=(4, 2)), "ending in 1"),
        (dict(sparse_features=FEATURES + (SparseFeature("more", "users", 51),)), "two cardinalities: 50 and 51"),
        (dict(sparse_features=FEATURES + (SparseFeature("user", "x", 3),)), "must be unique"),
        (dict(sparse_features=()), "at least one sparse feature"),
    ],
)
def test_bad_config(change, message):
    fields = dict(num_dense=5, bottom_mlp=(16, 8), top_mlp=(12, 6, 1), embedding_dim=8, sparse_features=FEATURES)
    with pytest.raises(ValueError, match=message):
        DLRMConfig(**{**fields, **change})
