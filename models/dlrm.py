"""DLRM (Naumov et al., 2019) whose embedding rows live outside the model, in a parameter server.

    dense [B, num_dense] ─ bottom MLP (ReLU after every layer, as DLRM's code) ─> x [B, d]
    sparse feature f: a bag of int64 keys per sample ─ lookup(table_f, unique keys) ─ pool ─> e_f [B, d]
    T = [x, e_1 … e_F] [B, F+1, d];  Z = T Tᵀ [B, F+1, F+1];  z = upper triangle of Z without diagonal
    top MLP on [x, z] (ReLU between layers) ─ sigmoid ─> score [B]

The model owns only the dense weights (a folder: config.json + model.safetensors). Embedding vectors come
from `lookup(table, keys) -> [n, d]`, called once per table per batch with that batch's unique keys (or from its
`many`, once for every table: EmbeddingLookup).
Note: DLRM's reference code flattens Z's *lower* triangle ((i, j), j < i, row by row); this model takes the
upper triangle row by row, so loading weights trained there needs the top MLP's first columns permuted.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from models.config import ModelFolderError

POOLING_MODES = ("sum", "mean")
WEIGHTS_FILE = "model.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_TABLE_NAME = re.compile(r"[A-Za-z0-9_.-]+")

# One sparse feature of a batch: (keys [n] int64, offsets [B] or [B+1]) as torch.nn.EmbeddingBag takes them.
Bags = tuple[torch.Tensor, torch.Tensor]


class EmbeddingLookup(Protocol):
    """The parameter server's read path: one float32 row [dim] per key, in the order of `keys`.

    A lookup that also has `many(queries, asked) -> {table: rows}` (queries: each table's distinct keys; asked:
    each table's keys before de-duplication) is asked once for every table of a batch instead (a parameter
    server answers all the tables in one pass: embeddings.hierarchy.ServerLookup)."""

    def __call__(self, table: str, keys: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class SparseFeature:
    """A categorical feature: its name in requests, the table its keys index, and that table's row count."""

    name: str
    table: str
    cardinality: int


@dataclass(frozen=True)
class DLRMConfig:
    """Architecture of a DLRM; every field is checked on construction (ValueError names the values)."""

    num_dense: int
    bottom_mlp: tuple[int, ...]  # output width of each bottom layer; the last is embedding_dim
    top_mlp: tuple[int, ...]  # output width of each top layer; the last is 1 (the logit)
    embedding_dim: int
    sparse_features: tuple[SparseFeature, ...]
    pooling: str = "sum"  # how a bag's vectors combine: sum | mean (an empty bag pools to zeros)

    def __post_init__(self) -> None:
        if self.num_dense < 1 or self.embedding_dim < 1:
            raise ValueError(f"{self.num_dense=} and {self.embedding_dim=} must be >= 1")
        if not self.bottom_mlp or min(self.bottom_mlp) < 1 or self.bottom_mlp[-1] != self.embedding_dim:
            raise ValueError(f"{self.bottom_mlp=} must be positive widths ending in {self.embedding_dim=}")
        if not self.top_mlp or min(self.top_mlp) < 1 or self.top_mlp[-1] != 1:
            raise ValueError(f"{self.top_mlp=} must be positive widths ending in 1")
        if self.pooling not in POOLING_MODES:
            raise ValueError(f"{self.pooling=} must be one of {', '.join(POOLING_MODES)}")
        if not self.sparse_features:
            raise ValueError("a DLRM needs at least one sparse feature")
        names = [f.name for f in self.sparse_features]
        if len(set(names)) != len(names):
            raise ValueError(f"sparse feature names must be unique: {names}")
        rows: dict[str, int] = {}
        for f in self.sparse_features:
            if not f.name or not f.table or f.cardinality < 1:
                raise ValueError(f"sparse feature {f} needs a name, a table and a cardinality >= 1")
            if rows.setdefault(f.table, f.cardinality) != f.cardinality:
                raise ValueError(f"table {f.table!r} has two cardinalities: {rows[f.table]} and {f.cardinality}")

    @property
    def tables(self) -> dict[str, int]:
        """Row count of every table, in first-use order."""
        return {f.table: f.cardinality for f in self.sparse_features}

    @property
    def top_input(self) -> int:
        """Width of [x, z]: d plus one dot product per pair of the F+1 vectors."""
        n = len(self.sparse_features) + 1
        return self.embedding_dim + n * (n - 1) // 2

    def to_dict(self) -> dict:
        return {"model_type": "dlrm", **asdict(self)}

    @classmethod
    def from_dict(cls, cfg: dict) -> DLRMConfig:
        if cfg.get("model_type") != "dlrm":
            raise ValueError(f"model_type {cfg.get('model_type')!r} is not 'dlrm'")
        try:
            return cls(
                num_dense=int(cfg["num_dense"]),
                bottom_mlp=tuple(int(w) for w in cfg["bottom_mlp"]),
                top_mlp=tuple(int(w) for w in cfg["top_mlp"]),
                embedding_dim=int(cfg["embedding_dim"]),
                sparse_features=tuple(
                    SparseFeature(str(f["name"]), str(f["table"]), int(f["cardinality"])) for f in cfg["sparse_features"]
                ),
                pooling=str(cfg.get("pooling", "sum")),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"DLRM config is missing or mistypes {exc}") from exc


def _mlp(width_in: int, widths: Sequence[int]) -> nn.ModuleList:
    return nn.ModuleList(nn.Linear(a, b) for a, b in zip((width_in, *widths[:-1]), widths))


def _as_index(name: str, what: str, t: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
        got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{what} of sparse feature {name!r} must be a 1-D integer tensor; got {got}")
    return t.long()


def _check_bags(feature: SparseFeature, bags: Bags, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate one feature's (keys, offsets); return keys [n] and bag lengths [B]."""
    if not isinstance(bags, (tuple, list)) or len(bags) != 2:
        raise ValueError(f"sparse feature {feature.name!r} must be a pair (keys, offsets)")
    keys, offsets = _as_index(feature.name, "keys", bags[0]), _as_index(feature.name, "offsets", bags[1])
    n = keys.numel()
    if offsets.numel() == batch:  # EmbeddingBag's default: the start of every bag
        bounds = torch.cat([offsets, offsets.new_tensor([n])])
    elif offsets.numel() == batch + 1:  # include_last_offset: the end of the last bag too
        bounds = offsets
        if int(bounds[-1]) != n:
            raise ValueError(f"offsets of sparse feature {feature.name!r} end at {int(bounds[-1])}, not at its {n} keys")
    else:
        raise ValueError(f"offsets of sparse feature {feature.name!r} have {offsets.numel()} entries; batch is {batch}")
    if batch and int(bounds[0]) != 0:
        raise ValueError(f"offsets of sparse feature {feature.name!r} must start at 0, not {int(bounds[0])}")
    lengths = bounds[1:] - bounds[:-1]  # [B]
    if batch and int(lengths.min()) < 0:
        i = int(torch.nonzero(lengths < 0)[0])
        raise ValueError(
            f"offsets of sparse feature {feature.name!r} must be non-decreasing and within its {n} keys: "
            f"bag {i} spans [{int(bounds[i])}, {int(bounds[i + 1])})"
        )
    if n:
        low, high = int(keys.min()), int(keys.max())
        if low < 0 or high >= feature.cardinality:
            bad = low if low < 0 else high
            raise ValueError(
                f"key {bad} of sparse feature {feature.name!r} is out of range for table {feature.table!r} "
                f"of cardinality {feature.cardinality}"
            )
    return keys, lengths


class DLRM(nn.Module):
    """Dense part of a DLRM; embedding rows come from `lookup` (given here or per call)."""

    def __init__(self, config: DLRMConfig, lookup: EmbeddingLookup | None = None) -> None:
        super().__init__()
        self.config = config
        self.lookup = lookup
        self.bottom = _mlp(config.num_dense, config.bottom_mlp)
        self.top = _mlp(config.top_input, config.top_mlp)
        n = len(config.sparse_features) + 1
        pairs = torch.triu_indices(n, n, offset=1)  # [2, n(n-1)/2], row by row
        self.register_buffer("_pairs", pairs[0] * n + pairs[1], persistent=False)  # i < j, in a flattened [n, n]

    def pool(
        self, sparse: Mapping[str, Bags], batch: int, lookup: EmbeddingLookup | None = None, dedup: bool = True
    ) -> torch.Tensor:
        """Pooled embedding of every feature: [B, F, d]. One lookup per table, of the batch's unique keys
        (over every bag of every feature on that table) unless dedup is False."""
        cfg, lookup = self.config, lookup if lookup is not None else self.lookup
        if lookup is None:
            raise ValueError("no embedding lookup: pass one to DLRM(...) or to this call")
        expected = {f.name for f in cfg.sparse_features}
        if not isinstance(sparse, Mapping) or set(sparse) != expected:
            got = sorted(sparse) if isinstance(sparse, Mapping) else type(sparse).__name__
            raise ValueError(f"sparse features must be exactly {sorted(expected)}; got {got}")
        checked = [(f, *_check_bags(f, sparse[f.name], batch)) for f in cfg.sparse_features]
        device, d = self._pairs.device, cfg.embedding_dim
        pooled = torch.zeros(batch, len(checked), d, device=device)  # [B, F, d]
        queries = {}  # table -> (its features, query [u], inverse [n] or None, keys asked n)
        for table in cfg.tables:
            mine = [(i, f, keys, lengths) for i, (f, keys, lengths) in enumerate(checked) if f.table == table]
            keys = torch.cat([k for _, _, k, _ in mine])  # [n] every key of this table in the batch
            if keys.numel():
                queries[table] = (mine, *(torch.unique(keys, return_inverse=True) if dedup else (keys, None)), keys.numel())
        many, answers = getattr(lookup, "many", None), None
        if many is not None and dedup and queries:  # every table in one call
            answers = many({t: q for t, (_, q, _, _) in queries.items()}, {t: n for t, (_, _, _, n) in queries.items()})
        # Every key's row in one tensor (table by table, each table's features in turn), then one index_add into
        # pooled viewed as [B * F, d]: the key of sample b's bag of feature i adds to row b * F + i.
        parts, at, features, lengths = [], [], [], []  # rows of each table's query; each key's row among them
        offset = 0  # rows of the tables before this one
        for table, (mine, query, inverse, _) in queries.items():
            rows = answers.get(table) if answers is not None else lookup(table, query)  # [u, d]
            if not isinstance(rows, torch.Tensor) or tuple(rows.shape) != (query.numel(), d):
                shape = tuple(rows.shape) if isinstance(rows, torch.Tensor) else type(rows).__name__
                u = query.numel()
                raise RuntimeError(f"lookup({table!r}) returned {shape} for {u} keys; expected ({u}, {d})")
            parts.append(rows.to(device=device, dtype=torch.float32))  # [u, d]
            at.append((inverse if inverse is not None else torch.arange(query.numel())) + offset)  # [n]
            offset += query.numel()
            features += [i for i, _, _, _ in mine]
            lengths += [bag_lengths for _, _, _, bag_lengths in mine]
        if parts:
            n_features = len(checked)
            which = torch.tensor(features, device=device)  # [F'] the features with keys, in the rows' order
            per_bag = torch.stack(lengths).to(device)  # [F', B] keys in each bag
            target = torch.arange(batch, device=device) * n_features + which[:, None]  # [F', B] rows of the view
            bag = torch.repeat_interleave(target.reshape(-1), per_bag.reshape(-1))  # [N] row of each key
            rows = torch.cat(parts).index_select(0, torch.cat(at).to(device))  # [N, d]: one copy to a GPU, one gather
            pooled.view(batch * n_features, d).index_add_(0, bag, rows)
            if cfg.pooling == "mean":
                count = torch.ones(batch, n_features, device=device)
                count[:, which] = per_bag.t().clamp(min=1).float()
                pooled /= count.unsqueeze(2)
        return pooled

    @property
    def dtype(self) -> torch.dtype:
        """The dense part's compute dtype (its weights'; `load_dlrm(dtype=...)`); scores are float32 whatever it is."""
        return self.bottom[0].weight.dtype

    def score(self, dense: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """Bottom MLP, pairwise dots, top MLP, sigmoid: dense [B, num_dense], pooled [B, F, d] -> [B] float32.
        Computed in the weights' dtype (bfloat16 halves the MLPs' time on a CPU with AMX)."""
        x = self._check_dense(dense).to(self.dtype)
        pooled = pooled.to(self.dtype)
        for layer in self.bottom:
            x = torch.relu(layer(x))  # [B, d]
        t = torch.cat([x.unsqueeze(1), pooled], dim=1)  # [B, F+1, d]
        # index_select on the flattened products: the same values as [:, i, j], in half the time on a CPU
        z = torch.bmm(t, t.transpose(1, 2)).flatten(1).index_select(1, self._pairs)  # [B, (F+1)F/2]
        h = torch.cat([x, z], dim=1)  # [B, top_input]
        for k, layer in enumerate(self.top):
            h = layer(h)
            if k < len(self.top) - 1:
                h = torch.relu(h)
        return torch.sigmoid(h.squeeze(1).float())

    def forward(
        self, dense: torch.Tensor, sparse: Mapping[str, Bags], lookup: EmbeddingLookup | None = None, dedup: bool = True
    ) -> torch.Tensor:
        """Click probability of every sample: [B]."""
        batch = self._check_dense(dense).shape[0]
        return self.score(dense, self.pool(sparse, batch, lookup, dedup))

    def _check_dense(self, dense: torch.Tensor) -> torch.Tensor:
        want = self.config.num_dense
        if not isinstance(dense, torch.Tensor) or dense.dim() != 2 or not dense.dtype.is_floating_point:
            got = f"{tuple(dense.shape)} {dense.dtype}" if isinstance(dense, torch.Tensor) else type(dense).__name__
            raise ValueError(f"dense features must be a 2-D float tensor [batch, {want}]; got {got}")
        if dense.shape[1] != want:
            raise ValueError(f"dense features have width {dense.shape[1]}; this model takes {want}")
        return dense.to(device=self._pairs.device, dtype=torch.float32)


def read_dlrm_folder(path: str | Path) -> tuple[DLRMConfig, Path]:
    """Parse a DLRM folder (config.json + model.safetensors); raise ModelFolderError naming what is wrong."""
    path = Path(path)
    if not path.is_dir():
        raise ModelFolderError(f"model folder {path} does not exist")
    weights = path / WEIGHTS_FILE
    if not weights.exists():
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        hint = f" (found {', '.join(pickled)}: pickle-based weights are refused; convert them to safetensors)" if pickled else ""
        raise ModelFolderError(f"model folder {path} has no {WEIGHTS_FILE}{hint}")
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFolderError(f"cannot read {path / 'config.json'}: {exc}") from exc
    try:
        return DLRMConfig.from_dict(raw), weights
    except ValueError as exc:
        raise ModelFolderError(f"{path / 'config.json'}: {exc}") from exc


def load_dlrm(path: str | Path, lookup: EmbeddingLookup | None = None, device: str | torch.device = "cpu",
              dtype: str | torch.dtype = torch.float32) -> DLRM:
    """Build a DLRM from a folder; every weight must be present with its shape, and nothing else. dtype: the dense
    part's compute dtype (float32, bfloat16 or float16; the weights are cast once, scores stay float32)."""
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype {dtype} is not float32, bfloat16 or float16")
    config, weights = read_dlrm_folder(path)
    model = DLRM(config, lookup)
    state, wanted = load_file(str(weights)), model.state_dict()
    missing, extra = sorted(set(wanted) - set(state)), sorted(set(state) - set(wanted))
    if missing or extra:
        raise ModelFolderError(f"{weights}: missing weights {missing}, unexpected weights {extra}")
    for name, t in wanted.items():
        if state[name].shape != t.shape:
            raise ModelFolderError(f"{weights}: {name} has shape {tuple(state[name].shape)}; config needs {tuple(t.shape)}")
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.to(device=device, dtype=dtype).eval()


def save_dlrm(folder: str | Path, config: DLRMConfig, seed: int) -> Path:
    """Write a DLRM folder with seeded random dense weights (DLRM's init: W ~ N(0, 2/(in+out)), b ~ N(0, 1/out))."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, t in DLRM(config).state_dict().items():
        out = t.shape[0]
        std = math.sqrt(2 / (out + t.shape[1])) if t.dim() == 2 else math.sqrt(1 / out)
        state[name] = torch.randn(t.shape, generator=gen) * std
    (folder / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    save_file(state, str(folder / WEIGHTS_FILE))
    return folder


def save_random_tables(
    folder: str | Path, config: DLRMConfig, seed: int, chunk_rows: int = 1 << 20
) -> dict[str, Path]:
    """Write every table as `<folder>/<table>.npy`, float32 [cardinality, d], uniform in ±1/sqrt(cardinality)
    (DLRM's init); seeded per table and written in chunks, so tables larger than memory are fine."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for index, (table, rows) in enumerate(config.tables.items()):
        if not _TABLE_NAME.fullmatch(table):
            raise ValueError(f"table name {table!r} cannot name a file; use letters, digits, '_', '.', '-'")
        rng = np.random.default_rng([seed, index])
        bound = 1 / math.sqrt(rows)
        path = folder / f"{table}.npy"
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, config.embedding_dim))
        for start in range(0, rows, chunk_rows):
            stop = min(rows, start + chunk_rows)
            out[start:stop] = rng.uniform(-bound, bound, (stop - start, config.embedding_dim)).astype(np.float32)
        out.flush()
        del out
        paths[table] = path
    return paths


class TableLookup:
    """`lookup` over in-memory or memory-mapped numpy tables (tests and benchmarks; no cache, no tiers)."""

    def __init__(self, tables: Mapping[str, np.ndarray]) -> None:
        self.tables = dict(tables)

    @classmethod
    def from_folder(cls, folder: str | Path, config: DLRMConfig, mmap: bool = True) -> TableLookup:
        return cls({t: np.load(Path(folder) / f"{t}.npy", mmap_mode="r" if mmap else None) for t in config.tables})

    def __call__(self, table: str, keys: torch.Tensor) -> torch.Tensor:
        rows = np.asarray(self.tables[table][keys.cpu().numpy()], dtype=np.float32)  # [n, d]
        return torch.from_numpy(rows)
