"""What every part of bench/embedding_cache.py shares: machine facts, CPU accounting, a redis-server, helpers."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self

import numpy as np
import torch

from bench.cache_trace import CRITEO_KAGGLE_CARDINALITIES
from embeddings.hierarchy import ParameterServer
from embeddings.tier import Tier
from models.runtime import cpu_name

LARGEST_CRITEO = max(CRITEO_KAGGLE_CARDINALITIES)
UNIFORM = 0.0  # alpha 0 means uniform keys in cache_trace


def machine_info() -> dict:
    """CPU model, cores, versions and torch threads, for the record."""
    cpu = cpu_name()
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}


def _machine_busy_s() -> float | None:
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    except (OSError, ValueError):
        return None
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


class Phase:
    """Wall time of a phase and the CPU seconds other processes took during it (`other_cpu_s`)."""

    def __init__(self, name: str, watched: Callable[[], float] | None = None) -> None:
        self.name, self.watched = name, watched  # watched: CPU seconds of a helper we started (redis-server)

    def __enter__(self) -> Self:
        self.t0, self.busy0, self.own0 = time.perf_counter(), _machine_busy_s(), sum(os.times()[:2])
        self.helper0 = self.watched() if self.watched else 0.0
        return self

    def __exit__(self, *exc) -> None:
        self.wall_s = time.perf_counter() - self.t0
        busy = _machine_busy_s()
        own = sum(os.times()[:2]) - self.own0 + ((self.watched() - self.helper0) if self.watched else 0.0)
        self.other_cpu_s = None if busy is None or self.busy0 is None else max(0.0, busy - self.busy0 - own)

    def record(self) -> dict:
        capacity = self.wall_s * (os.cpu_count() or 1)
        other = self.other_cpu_s
        return {"wall_s": round(self.wall_s, 2), "other_cpu_s": None if other is None else round(other, 2),
                "other_share": None if other is None else round(other / capacity, 3)}


def pid_cpu_s(pid: int) -> float:
    try:
        parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def fill_tier(tier: Tier | ParameterServer, table: str, keys: np.ndarray, vectors: np.ndarray, chunk: int = 1 << 16) -> None:
    for i in range(0, keys.size, chunk):
        tier.insert(table, torch.from_numpy(keys[i:i + chunk]), torch.from_numpy(vectors[i:i + chunk]))  # type: ignore[union-attr]


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))
