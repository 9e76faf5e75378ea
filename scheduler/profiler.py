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

from scheduler.cost_model import DEFAULT_ALPHA, MAX_DRIFT, Cell, CostModel

log = logging.getLogger(__name__)

RunBatch = Callable[[list[int]], None]  # runs one packed batch with these sequence lengths


def grid(max_batch_requests: int, max_input_length: int, token_cap: int) -> list[tuple[int, int]]:
    """(n, length) cells: n in powers of two up to the request cap, lengths doubling from 8 up to the
    input limit, keeping cells of at most `token_cap` tokens (larger batches are extrapolated)."""
    ns = sorted({1 << k for k in range(max_batch_requests.bit_length()) if 1 << k <= max_batch_requests} | {max_batch_requests})
    lengths = sorted({8 << k for k in range(16) if 8 << k <= max_input_length} | {max_input_length})
    return [(n, length) for length in lengths for n in ns if n * length <= token_cap]


SLOW_RUN_S = 1.0  # a cell whose warm-up run took this long is timed once: a host's jitter is small beside it
MIN_CELLS = 4  # measured whatever the budget: the cheapest cells, enough to fit the line's four terms


def measure(run: RunBatch, cells: list[tuple[int, int]], runs: int = 3, warmup: int = 1,
            progress: bool = True, passes: int = 2, budget_s: float = 0.0) -> list[Cell]:
    """Seconds per cell: the median of `runs` timed runs after `warmup` untimed ones (one timed run where the
    warm-up took SLOW_RUN_S or more), taken in `passes` passes over the grid, each starting 1/passes further along
    it, keeping each cell's lowest median.

    Another process or a slow spell of the host only ever makes a batch slower, and a spell lasts seconds:
    one pass can measure a cell 3x too slow (seen here: 1,021 ms for 32 x 64 tokens, 160-190 us a token
    in every other cell of that size), and the planner then avoids such batches for good. The second pass meets
    each cell half a pass to a pass and a half later. (A second pass run backwards met the last cells of the first right after them:
    one spell of ~2 s at the turn measured three of the four 2,048-token cells 2.2x too slow, 2026-12-06.)
    Shows a progress bar.

    budget_s > 0: the grid is taken cheapest first (by tokens), and a cell whose runs are predicted (from the
    largest cell measured so far, or its own first pass) to take the profile past budget_s seconds is left out,
    but for the MIN_CELLS cheapest. Returns the cells measured, in the grid's order."""
    from tqdm import tqdm

    order = sorted(cells, key=lambda c: (c[0] * c[1], c)) if budget_s else list(cells)
    best: dict[tuple[int, int], float] = {}
    started = time.perf_counter()
    with tqdm(total=len(order) * passes, desc="profiling batch latency", unit="cell", disable=not progress) as bar:
        for p in range(passes):
            shift = len(order) * p // passes  # each pass starts further along: a cell's runs lie >= half a pass apart
            for n, length in order[shift:] + order[:shift]:
                bar.update()
                if budget_s and len(best) >= MIN_CELLS and time.perf_counter() - started + \
                        _predicted_cost(best, n, length, runs, warmup) > budget_s:
                    continue
                seconds = _time_cell(run, [length] * n, runs, warmup)
                best[n, length] = min(seconds, best.get((n, length), seconds))
    if len(best) < len(cells):
        log.warning("profile budget of %.0f s (scheduler.profile_budget_s) reached: measured %d of %d cells, batches of "
                    "more than %d tokens are extrapolated (0 measures them all)", budget_s, len(best), len(cells),
                    max(n * length for n, length in best))
    return [Cell(n, length, best[n, length]) for n, length in cells if (n, length) in best]


def _time_cell(run: RunBatch, lengths: list[int], runs: int, warmup: int) -> float:
    """Median seconds of `runs` timed runs after `warmup` untimed ones, or of one timed run after a slow warm-up."""
    times = []
    for i in range(warmup):
        began = time.perf_counter()
        run(lengths)
        if i == warmup - 1 and time.perf_counter() - began >= SLOW_RUN_S:
            runs = 1
    for _ in range(runs):
        began = time.perf_counter()
        run(lengths)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def _predicted_cost(best: dict[tuple[int, int], float], n: int, length: int, runs: int, warmup: int) -> float:
    """Seconds a cell's runs are expected to take: its own measured time, else the largest measured cell's scaled
    by tokens (the cells are taken cheapest first, so that one is the nearest below)."""
    one = best.get((n, length))
    if one is None:
        (bn, blength), seconds = max(best.items(), key=lambda item: item[0][0] * item[0][1])
        one = seconds * n * length / (bn * blength)
    return one * (warmup + (1 if one >= SLOW_RUN_S else runs))


def cache_path(directory: str | Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(directory).expanduser() / f"cost-{digest}.json"


def load_or_profile(run: RunBatch, key: dict, directory: str | Path | None, cells: list[tuple[int, int]],
                    runs: int = 3, progress: bool = True, alpha: float = DEFAULT_ALPHA, reuse: bool = True,
                    budget_s: float = 0.0) -> tuple[CostModel, bool]:
    """The cached model for `key` if one is saved (and `reuse`), else a freshly profiled one, saved over any
    earlier one only once measured (an interrupted profile leaves the earlier one). A save that fails (a folder
    that cannot be written) is a warning: the measured model is returned all the same. A saved model that a
    profile budget cut short is measured again when no budget is set (budget_s 0).
    Returns (model, loaded_from_cache)."""
    path = cache_path(directory, key) if directory else None
    if reuse and path is not None and path.exists():
        try:
            model = CostModel.load(path)
            if model.key == key and not budget_s and len(model.cells) < len(cells):
                log.info("the saved cost model measured %d of %d cells (a profile budget); measuring them all",
                         len(model.cells), len(cells))
            elif model.key == key:
                log.info("cost model loaded from %s", path)
                model.alpha = alpha  # the refinement's weight is this start's setting, not the one saved with the model
                drift = model.drift()
                if drift > MAX_DRIFT:
                    log.warning("saved cost model drifted %.1fx from its measurement; starting from the measurement", drift)
                    model = model.measured()
                return model, True
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable cost model %s: %s", path, exc)
    started = time.perf_counter()
    measured = measure(run, cells, runs, progress=progress, budget_s=budget_s)
    model = CostModel.fit(measured, key, alpha)
    log.info("profiled %d cells in %.1fs", len(measured), time.perf_counter() - started)
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
