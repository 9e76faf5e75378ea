"""Build the scheduler's cost model for a loaded model: load the saved one for this exact setup, or
measure it (with a progress bar) and save it."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import server
from configs.settings import Settings
from models.runtime import Embedder, ModelInfo, runtime_facts
from scheduler.cost_model import MAX_DRIFT, CostModel
from scheduler.profiler import cache_path, grid, load_or_profile, save

log = logging.getLogger(__name__)

PROFILE_TOKEN_ID = 0  # in every vocabulary, however small (1000 was not: ProtBERT has 30): the cost depends on shapes only


def weights_fingerprint(path: str) -> str:
    """A digest of the model folder's safetensors files (name, size and header: every tensor's name, dtype, shape and
    offsets) and config.json: replaced weights change it, a copy of the same ones (new modification times) does not,
    and no tensor data is read ("" for a path that is no folder)."""
    folder = Path(path)
    if not folder.is_dir():
        return ""
    digest = hashlib.sha256()
    for file in sorted(folder.rglob("*")):
        if not file.is_file():  # (follows a Hugging Face cache's symlinks to the blobs)
            continue
        name = file.relative_to(folder).as_posix()
        if file.suffix == ".safetensors":
            size = file.stat().st_size
            with open(file, "rb") as f:  # 8 bytes of header length, then the JSON header
                header = int.from_bytes(f.read(8), "little")
                digest.update(f"{name}\0{size}\0".encode() + f.read(min(header, max(size - 8, 0))))
        elif file.name == "config.json":
            digest.update(f"{name}\0".encode() + file.read_bytes())
    return digest.hexdigest()[:16]


def cost_key(settings: Settings, info: ModelInfo) -> dict:
    """What decides the measured costs, and nothing else: the model's files (resolved path and weights), the runtime,
    the grid (request cap, input limit and the tokens cap it is cut at). Not the name it is served under, nor the runs
    a cell (a `turboserve profile --runs 1` is what a server with the default runs looks up)."""
    s = settings.scheduler
    key = {"path": os.path.realpath(os.path.expanduser(info.path)), "weights": weights_fingerprint(info.path),
           "model_type": info.model_type, **runtime_facts(info), "turboserve": server.__version__,
           "max_batch_requests": s.max_batch_requests, "max_input_length": info.max_input_length,
           "grid_max_tokens": grid_token_cap(settings)}
    if info.device.startswith("cuda"):  # batches up to this size replay CUDA graphs (server/app.py's default_loader)
        key["cuda_graph_max_tokens"] = min(settings.model.cuda_graph_max_tokens, s.max_batch_tokens)
    return key


def grid_token_cap(settings: Settings) -> int:
    """The largest batch the profile measures, in tokens: a batch the scheduler never makes is not measured."""
    return min(settings.scheduler.profile_max_tokens, settings.scheduler.max_batch_tokens)


def build_cost_model(settings: Settings, embedder: Embedder, info: ModelInfo, progress: bool = True) -> tuple[CostModel, bool]:
    """(model, loaded_from_cache) for this model on this device."""
    s = settings.scheduler

    def run(lengths: list[int]) -> None:
        embedder.embed([[PROFILE_TOKEN_ID] * n for n in lengths])

    cells = grid(s.max_batch_requests, info.max_input_length, grid_token_cap(settings))
    return load_or_profile(run, cost_key(settings, info), s.cost_model_dir, cells, s.profile_runs, progress,
                           s.cost_model_alpha, reuse=s.profile != "always", budget_s=s.profile_budget_s)


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
    return save(cost, cache_path(settings.scheduler.cost_model_dir, cost.key))
