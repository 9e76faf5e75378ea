"""Build the scheduler's cost model for a loaded model: load the saved one for this exact setup, or
measure it (with a progress bar) and save it."""

from __future__ import annotations

import logging

import server
from configs.settings import Settings
from models.runtime import Embedder, ModelInfo, runtime_facts
from scheduler.cost_model import MAX_DRIFT, CostModel
from scheduler.profiler import cache_path, grid, load_or_profile

log = logging.getLogger(__name__)

PROFILE_TOKEN_ID = 1000  # any in-vocabulary id: the cost depends on shapes, not on which tokens


def cost_key(settings: Settings, info: ModelInfo) -> dict:
    s = settings.scheduler
    return {"model": info.name, "path": info.path, "model_type": info.model_type, **runtime_facts(info),
            "turboserve": server.__version__, "max_batch_requests": s.max_batch_requests,
            "max_input_length": info.max_input_length, "profile_max_tokens": s.profile_max_tokens,
            "profile_runs": s.profile_runs}


def build_cost_model(settings: Settings, embedder: Embedder, info: ModelInfo, progress: bool = True) -> tuple[CostModel, bool]:
    """(model, loaded_from_cache) for this model on this device."""
    s = settings.scheduler

    def run(lengths: list[int]) -> None:
        embedder.embed([[PROFILE_TOKEN_ID] * n for n in lengths])

    cells = grid(s.max_batch_requests, info.max_input_length, min(s.profile_max_tokens, s.max_batch_tokens))
    key = cost_key(settings, info)
    if s.profile == "always" and s.cost_model_dir:
        cache_path(s.cost_model_dir, key).unlink(missing_ok=True)
    return load_or_profile(run, key, s.cost_model_dir, cells, s.profile_runs, progress, s.cost_model_alpha)


def save_refined(settings: Settings, cost: CostModel) -> bool:
    """Write the online-refined model back over the measured one, so the next start (and the simulator)
    begins from what live batches showed, event-loop contention included. Refuses (and says so) when
    the refinement drifted more than MAX_DRIFT× from the measurement; True when saved."""
    if not (settings.scheduler.cost_model_dir and cost.observations):
        return False
    drift = cost.drift()
    if drift > MAX_DRIFT:
        log.warning("refined cost model not saved: live batches ran %.1fx away from the measured model "
                    "(limit %.1fx); the host was probably busy. Run `turboserve profile` to re-measure.",
                    drift, MAX_DRIFT)
        return False
    cost.save(cache_path(settings.scheduler.cost_model_dir, cost.key))
    return True
