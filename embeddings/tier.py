"""What every storage tier shares: the table description, the interface, the hit/miss counters.

A tier stores rows of named tables. At the interface keys are a 1-D int64 tensor and vectors a
`[n, dim]` float32 tensor; `lookup` answers `(vectors, found)` with the table's default vector in
the rows whose `found` is False. CPU tiers answer CPU tensors, the device cache answers tensors
on its device.

Write semantics, the same in every tier:
- `insert(table, keys, vectors)` puts the rows (adds them or overwrites them).
- `update(table, keys, vectors)` overwrites only the rows the tier already holds and returns how
  many it wrote; a cache does not take a row just because it changed. The persistent tier holds
  every row, so there `update` is `insert`.
- `evict(table, keys)` drops the rows (missing keys are ignored) and returns how many it dropped.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(frozen=True)
class TableSpec:
    """A table: its name, its vector size, the vector answered for a key no tier holds.

    `rows` is the table's expected number of rows (used to size a cache as a fraction of it);
    `default` is a `[dim]` float32 tensor on the CPU, zeros unless configured; `epoch` names the table's current
    import (a shared Redis tier puts it in its key names, so rows cached before a re-import are never read).
    """

    name: str
    dim: int
    default: torch.Tensor = field(default=None, compare=False)  # type: ignore[assignment]
    rows: int | None = None
    epoch: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"table name must be a non-empty string, got {self.name!r}")
        if self.dim < 1:
            raise ValueError(f"table {self.name!r}: dim={self.dim} must be >= 1")
        if self.rows is not None and self.rows < 1:
            raise ValueError(f"table {self.name!r}: rows={self.rows} must be >= 1")
        default = torch.zeros(self.dim) if self.default is None else torch.as_tensor(self.default)
        default = default.detach().to("cpu", torch.float32).reshape(-1).contiguous()
        if default.numel() != self.dim:
            raise ValueError(f"table {self.name!r}: default has {default.numel()} values, dim={self.dim}")
        object.__setattr__(self, "default", default)


def check_keys(keys: torch.Tensor | np.ndarray | list[int]) -> torch.Tensor:
    """Return keys as a contiguous 1-D int64 tensor; raise ValueError for another shape or dtype."""
    if not isinstance(keys, torch.Tensor):
        keys = torch.as_tensor(np.asarray(keys, dtype=np.int64))
    if keys.dim() != 1:
        raise ValueError(f"keys must be 1-D, got shape {tuple(keys.shape)}")
    if keys.dtype != torch.int64:
        if keys.dtype.is_floating_point or keys.dtype == torch.bool:
            raise ValueError(f"keys must be integers, got {keys.dtype}")
        keys = keys.to(torch.int64)
    return keys.contiguous()


def check_vectors(spec: TableSpec, keys: torch.Tensor, vectors: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Return vectors as a contiguous `[n, dim]` float32 tensor matching `keys`; raise ValueError otherwise."""
    vectors = torch.as_tensor(vectors)
    if vectors.shape != (keys.numel(), spec.dim):
        raise ValueError(
            f"table {spec.name!r}: vectors have shape {tuple(vectors.shape)}, expected ({keys.numel()}, {spec.dim})")
    return vectors.to(torch.float32).contiguous()


def keys_to_numpy(keys: torch.Tensor) -> np.ndarray:
    """A CPU int64 numpy view (a copy only if the keys live on a device)."""
    return keys.detach().cpu().numpy()


def last_occurrence(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique keys of a batch and, for each, the index of its last occurrence (the value that wins)."""
    rev = keys[::-1]
    uniq, first_in_rev = np.unique(rev, return_index=True)
    return uniq, keys.size - 1 - first_in_rev


def moved_together(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """The tensors on `device`, each the same shape, in one copy per dtype: a batch's per-table tensors between the
    host and a GPU (every small copy from pageable memory is a synchronous transfer of its own; 26 tables' keys,
    found masks and rows are dozens of them). Tensors already there, and any on a CPU device, are returned as they are."""
    device = torch.device(device)
    todo = [i for i, t in enumerate(tensors)  # "cuda" is whichever GPU is current: a tensor on one is there
            if t.device.type != device.type or device.index is not None and t.device.index != device.index]
    if len(todo) < 2:
        return [t.to(device) for t in tensors]
    out = list(tensors)
    by_kind: dict[tuple, list[int]] = {}
    for i in todo:
        by_kind.setdefault((tensors[i].dtype, tensors[i].device), []).append(i)
    for idx in by_kind.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in idx]).to(device)
        for i, part in zip(idx, flat.split([tensors[i].numel() for i in idx])):
            out[i] = part.view(tensors[i].shape)
    return out


class Tier(ABC):
    """The interface of one storage level, with its hit/miss/error counters.

    Counters count keys: a lookup of n keys adds its found keys to `hits` and the rest to
    `misses`. `errors` counts failed backend calls (only the Redis tier has them).
    """

    #: the tier's name in counters and metrics (`device`, `volatile`, `redis`, `persistent`)
    name: str = "tier"
    #: whether other processes (replicas) read and write the same rows (Redis): what a replica puts there
    #: must not be older than what the others did (embeddings/stream.py)
    shared: bool = False

    def __init__(self) -> None:
        self.tables: dict[str, TableSpec] = {}
        self._counter_lock = threading.Lock()
        self._counts = {"hits": 0, "misses": 0, "errors": 0, "evictions": 0}

    def create_table(self, spec: TableSpec) -> None:
        """Make room for a table; creating one that exists with the same dim is a no-op."""
        old = self.tables.get(spec.name)
        if old is not None and old.dim != spec.dim:
            raise ValueError(f"{self.name}: table {spec.name!r} exists with dim={old.dim}, asked dim={spec.dim}")
        self.tables[spec.name] = spec

    def spec(self, table: str) -> TableSpec:
        """The table's description; KeyError naming the table if it was never created."""
        try:
            return self.tables[table]
        except KeyError:
            raise KeyError(f"{self.name}: no table {table!r} (known: {sorted(self.tables)})") from None

    def count(self, **increments: int) -> None:
        """Add to the counters (thread-safe)."""
        with self._counter_lock:
            for key, value in increments.items():
                self._counts[key] = self._counts.get(key, 0) + int(value)

    def counters(self) -> dict[str, int]:
        """A copy of the counters: hits, misses, errors, evictions."""
        with self._counter_lock:
            return dict(self._counts)

    def defaults(self, table: str, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """`[n, dim]`: the table's default vector repeated n times."""
        return self.spec(table).default.to(device).expand(n, -1).clone()

    @abstractmethod
    def lookup(self, table: str, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of `keys`: vectors `[n, dim]` float32 (default where missing) and found `[n]` bool."""

    @abstractmethod
    def insert(self, table: str, keys: torch.Tensor, vectors: torch.Tensor) -> None:
        """Put the rows (add or overwrite). With duplicate keys the last one's vector wins."""

    def lookup_many(self, requests: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """`lookup` of several tables (a DLRM batch); a tier that can answer them in one call overrides this."""
        return {table: self.lookup(table, keys) for table, keys in requests.items()}

    def insert_many(self, rows: dict[str, tuple[torch.Tensor, torch.Tensor]], unique: bool = False) -> None:
        """`insert` of several tables: rows = {table: (keys, vectors)}. unique: no key repeats within a table
        (a tier may skip its de-duplication)."""
        for table, (keys, vectors) in rows.items():
            self.insert(table, keys, vectors)

    @abstractmethod
    def update(self, table: str, keys: torch.Tensor, vectors: torch.Tensor) -> int:
        """Overwrite the rows the tier holds; return how many were written."""

    @abstractmethod
    def evict(self, table: str, keys: torch.Tensor) -> int:
        """Drop the rows; return how many were held."""

    def close(self) -> None:
        """Release the tier's resources (files, connections)."""
