"""Measure the runtime's batch latency over a grid at start-up, and cache the fitted model on disk.

The profiler times a callable that runs one batch; it never imports torch itself. The cache key holds
everything that changes the answer: model, device, dtype, software versions, threads and the grid.
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from scheduler.cost_model import MAX_DRIFT, Cell, CostModel

log = logging.getLogger(__name__)

RunBatch = Callable[[list[int]], None]  # runs one packed batch with these sequence lengths


def grid(max_batch_requests: int, max_input_length: int, token_cap: int) -> list[tuple[int, int]]:
    """(n, length) cells: n in powers of two up to the request cap, lengths doubling from 8 up to the
    input limit, keeping cells of at most `token_cap` tokens (larger batches are extrapolated)."""
    ns = sorted({1 << k for k in range(max_batch_requests.bit_length()) if 1 << k <= max_batch_requests} | {max_batch_requests})
    lengths = sorted({8 << k for k in range(16) if 8 << k <= max_input_length} | {max_input_length})
    return [(n, length) for length in lengths for n in ns if n * length <= token_cap]


def measure(run: RunBatch, cells: list[tuple[int, int]], runs: int = 3, warmup: int = 1,
            progress: bool = True, passes: int = 2) -> list[Cell]:
    """Seconds per cell: the median of `runs` timed runs after `warmup` untimed ones, taken in `passes`
    passes over the grid (alternately forwards and backwards), keeping each cell's lowest median.

    Another process or a slow spell of the host only ever makes a batch slower, and a spell lasts seconds:
    one pass can measure a cell 3x too slow (seen here: 1,021 ms for 32 x 64 tokens, 160-190 us a token
    in every other cell of that size), and the planner then avoids such batches for good. A second pass,
    the other way round, meets the cell at another time. Shows a progress bar."""
    from tqdm import tqdm

    best: dict[tuple[int, int], float] = {}
    with tqdm(total=len(cells) * passes, desc="profiling batch latency", unit="cell", disable=not progress) as bar:
        for p in range(passes):
            for n, length in cells if p % 2 == 0 else cells[::-1]:
                lengths = [length] * n
                for _ in range(warmup):
                    run(lengths)
                times = []
                for _ in range(runs):
                    started = time.perf_counter()
                    run(lengths)
                    times.append(time.perf_counter() - started)
                seconds = statistics.median(times)
                best[n, length] = min(seconds, best.get((n, length), seconds))
                bar.update()
    return [Cell(n, length, best[n, length]) for n, length in cells]


def cache_path(directory: str | Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(directory).expanduser() / f"cost-{digest}.json"


def load_or_profile(run: RunBatch, key: dict, directory: str | Path | None, cells: list[tuple[int, int]],
                    runs: int = 3, progress: bool = True, alpha: float = 0.2, reuse: bool = True) -> tuple[CostModel, bool]:
    """The cached model for `key` if one is saved (and `reuse`), else a freshly profiled one, saved over any
    earlier one only once measured (an interrupted profile leaves the earlier one). A save that fails (a folder
    that cannot be written) is a warning: the measured model is returned all the same.
    Returns (model, loaded_from_cache)."""
    path = cache_path(directory, key) if directory else None
    if reuse and path is not None and path.exists():
        try:
            model = CostModel.load(path)
            if model.key == key:
                log.info("cost model loaded from %s", path)
                drift = model.drift()
                if drift > MAX_DRIFT:
                    log.warning("saved cost model drifted %.1fx from its measurement; starting from the measurement", drift)
                    model = model.measured()
                return model, True
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable cost model %s: %s", path, exc)
    started = time.perf_counter()
    model = CostModel.fit(measure(run, cells, runs, progress=progress), key, alpha)
    log.info("profiled %d cells in %.1fs", len(cells), time.perf_counter() - started)
    if path is not None and save(model, path):
        log.info("cost model saved to %s", path)
    return model, False


def save(model: CostModel, path: Path) -> bool:
    """Save the model; False, with a warning, where it cannot be written (scheduler.cost_model_dir a file, read-only)."""
    try:
        model.save(path)
    except OSError as exc:
        log.warning("cost model not saved to %s: %s (check scheduler.cost_model_dir)", path, exc)
        return False
    return True
