"""The saved cost model: which setups share a key (server/profiling.py's cost_key), and saving it where it cannot be
written, twice at once, or with `profile: always` interrupted."""

from __future__ import annotations

import logging
import os
import threading

import pytest

from configs.settings import load_settings
from models.runtime import ModelInfo
from scheduler.cost_model import DEFAULT_ALPHA, Cell, CostModel
from scheduler.profiler import cache_path, load_or_profile
from server.profiling import build_cost_model, cost_key, save_refined


def _info(path: str, name: str = "m") -> ModelInfo:
    return ModelInfo(name=name, path=path, model_type="bert", dim=4, max_input_length=128, pooling="mean",
                     normalize=True, matryoshka_dimensions=(), dtype="float32", device="cpu")


def _settings(**scheduler):
    return load_settings(None, {"scheduler": scheduler})


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"x" * 100)
    return tmp_path / "m"


def test_the_key_follows_what_decides_the_measurements(folder, monkeypatch):
    base = cost_key(_settings(), _info(str(folder)))
    # The grid is cut at max_batch_tokens too: a model measured up to 64 tokens is not a default server's.
    assert cost_key(_settings(max_batch_tokens=64), _info(str(folder))) != base
    assert cost_key(_settings(profile_max_tokens=64), _info(str(folder))) == cost_key(
        _settings(profile_max_tokens=64, max_batch_tokens=64), _info(str(folder)))
    # Runs a cell and the served name do not change what was measured; the path as typed does not either.
    assert cost_key(_settings(profile_runs=1), _info(str(folder), name="other")) == base
    monkeypatch.chdir(folder.parent)
    assert cost_key(_settings(), _info("m")) == cost_key(_settings(), _info("./m/")) == base
    # The same files copied anew (new modification times) do not.
    os.utime(folder / "model.safetensors", (1, 1))
    assert cost_key(_settings(), _info(str(folder))) == base
    # Other weights in the same folder do.
    (folder / "model.safetensors").write_bytes(b"y" * 101)
    assert cost_key(_settings(), _info(str(folder))) != base


def _truth_cells():
    truth = CostModel.linear(0.003, 2e-4, 1e-7, 1e-4)
    return [Cell(n, length, truth.predict_lengths([length] * n)) for n in (1, 2) for length in (8, 16)]


def test_an_unwritable_cost_model_dir_is_a_warning_and_the_measured_model_is_kept(tmp_path, caplog):
    (tmp_path / "file").write_text("x")  # scheduler.cost_model_dir names a regular file

    def run(lengths):
        pass

    with caplog.at_level(logging.WARNING, logger="scheduler.profiler"):
        model, loaded = load_or_profile(run, {"k": 1}, tmp_path / "file", [(1, 8), (2, 8)], runs=1, progress=False)
    assert not loaded and model.knots
    assert "cost model not saved" in caplog.text


def test_concurrent_saves_of_one_key_never_collide(tmp_path):
    """Two processes saving the same key wrote one `cost-<key>.tmp`: one's rename took the other's file away."""
    model = CostModel.fit(_truth_cells(), {"k": 1})
    path = cache_path(tmp_path, {"k": 1})
    errors = []

    def saver():
        try:
            for _ in range(100):
                model.save(path)
        except OSError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=saver) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert CostModel.load(path).key == {"k": 1}
    assert os.listdir(tmp_path) == [path.name]  # no temporary file left behind


class _Interrupted(Exception):
    pass


def test_profile_always_keeps_the_saved_model_until_the_new_one_is_measured(tmp_path, folder):
    """`turboserve profile` (profile: always) removed the saved model before measuring: Ctrl-C left none."""
    settings = _settings(cost_model_dir=str(tmp_path / "cm"), profile="always", profile_runs=1, profile_max_tokens=16)
    info = _info(str(folder))
    saved = cache_path(settings.scheduler.cost_model_dir, cost_key(settings, info))
    CostModel.fit(_truth_cells(), cost_key(settings, info)).save(saved)

    class Stops:
        def embed(self, batch):
            raise _Interrupted

    with pytest.raises(_Interrupted):
        build_cost_model(settings, Stops(), info, progress=False)
    assert CostModel.load(saved).key == cost_key(settings, info)

    class Runs:
        calls = 0

        def embed(self, batch):
            Runs.calls += 1

    _, loaded = build_cost_model(settings, Runs(), info, progress=False)
    assert not loaded and Runs.calls  # measured, not loaded, and saved over the old one
    assert CostModel.load(saved).cells != _truth_cells()


def test_saving_the_refined_model_where_it_cannot_be_written_is_a_warning(tmp_path, caplog):
    """At shutdown: an OSError here ended the shutdown with a traceback."""
    (tmp_path / "file").write_text("x")
    model = CostModel.fit(_truth_cells(), {"k": 1})
    model.observe([8], 1.1 * model.predict_lengths([8]))
    with caplog.at_level(logging.WARNING, logger="scheduler.profiler"):
        assert save_refined(_settings(cost_model_dir=str(tmp_path / "file")), model) is False
    assert "cost model not saved" in caplog.text


class _FakeClock:
    """Each run advances time by the true cost of its batch (times `scale`); counts runs per cell."""

    def __init__(self, monkeypatch, scale: float = 1.0):
        from scheduler import profiler  # noqa: PLC0415

        self.now, self.runs, self.scale = 0.0, {}, scale
        self.truth = CostModel.linear(0.005, 1.5e-4, 1e-7, 3e-4)
        monkeypatch.setattr(profiler.time, "perf_counter", lambda: self.now)

    def __call__(self, lengths):
        cell = (len(lengths), lengths[0])
        self.runs[cell] = self.runs.get(cell, 0) + 1
        self.now += self.scale * self.truth.predict_lengths(lengths)


def test_a_profile_budget_measures_the_cheapest_cells_and_stops_near_it(monkeypatch, caplog):
    from scheduler.profiler import MIN_CELLS, grid, measure  # noqa: PLC0415

    clock = _FakeClock(monkeypatch)
    cells = grid(64, 512, 2048)
    full = sum(4 * clock.truth.predict_lengths([length] * n) for n, length in cells)  # 1 warm-up + 3 runs, one pass
    budget = full / 3
    with caplog.at_level(logging.WARNING, logger="scheduler.profiler"):
        measured = measure(clock, cells, runs=3, progress=False, budget_s=budget)
    assert MIN_CELLS <= len(measured) < len(cells)
    assert clock.now <= budget * 1.2, (clock.now, budget)  # predictions scale by tokens: near, not exact
    biggest = max(c.tokens for c in measured)
    left_out = [(n, length) for n, length in cells if (n, length) not in {(c.n, c.length) for c in measured}]
    assert min(n * length for n, length in left_out) >= biggest / 2  # the cheap ones came first
    assert f"measured {len(measured)} of {len(cells)} cells" in caplog.text
    model = CostModel.fit(measured)  # larger batches are extrapolated from what was measured
    assert model.predict_lengths([512] * 4) == pytest.approx(clock.truth.predict_lengths([512] * 4), rel=0.5)


def test_the_budget_still_measures_the_cheapest_cells_and_no_budget_measures_all(monkeypatch):
    from scheduler.profiler import MIN_CELLS, grid, measure  # noqa: PLC0415

    cells = grid(64, 512, 2048)
    assert len(measure(_FakeClock(monkeypatch), cells, runs=3, progress=False, budget_s=1e-9)) == MIN_CELLS
    clock = _FakeClock(monkeypatch)
    assert len(measure(clock, cells, runs=3, progress=False)) == len(cells)
    assert set(clock.runs.values()) == {8}  # 2 passes of 1 warm-up + 3 timed runs


def test_a_cell_whose_warm_up_takes_a_second_is_timed_once(monkeypatch):
    from scheduler.profiler import measure  # noqa: PLC0415

    clock = _FakeClock(monkeypatch, scale=10.0)  # 10x slower: the large cells take seconds a run
    cells = [(1, 8), (64, 2048)]
    measured = {(c.n, c.length): c.seconds for c in measure(clock, cells, runs=3, progress=False)}
    assert clock.runs == {(1, 8): 8, (64, 2048): 4}  # 2 passes of 1 + 3 runs; of 1 + 1 run
    assert measured[64, 2048] == pytest.approx(10 * clock.truth.predict_lengths([2048] * 64))


def test_a_model_a_budget_cut_short_is_measured_again_when_no_budget_is_set(tmp_path, monkeypatch):
    cells = [(1, 8), (2, 8), (1, 16), (2, 16), (4, 16)]
    short = CostModel.fit(_truth_cells()[:4], {"k": 1})  # 4 of the 5 cells
    short.save(cache_path(tmp_path, {"k": 1}))
    measured = []

    def run(lengths):
        measured.append(lengths)

    model, loaded = load_or_profile(run, {"k": 1}, tmp_path, cells, runs=1, progress=False, budget_s=60)
    assert loaded and not measured  # a budget is set: what it measured will do
    model, loaded = load_or_profile(run, {"k": 1}, tmp_path, cells, runs=1, progress=False, budget_s=0)
    assert not loaded and len(model.cells) == len(cells) and measured


def test_a_loaded_model_refines_with_this_starts_alpha_not_the_saved_one(tmp_path):
    def run(lengths):
        raise AssertionError("a saved model is not measured again")

    saved = CostModel.fit(_truth_cells(), {"k": 1}, alpha=0.2)
    saved.save(cache_path(tmp_path, {"k": 1}))
    model, loaded = load_or_profile(run, {"k": 1}, tmp_path, [(1, 8), (2, 8), (1, 16), (2, 16)], runs=1, progress=False,
                                    alpha=0.05)
    assert loaded and model.alpha == 0.05
    before = model.factors[0]
    model.observe([8], 2 * model.predict_lengths([8]))  # a batch twice as long as predicted
    assert 1.0 < model.factors[0] / before < 2 ** 0.2  # moved by the new weight's share of the log error only


def test_the_settings_default_alpha_is_the_cost_models():
    assert _settings().scheduler.cost_model_alpha == DEFAULT_ALPHA == CostModel([0.0, 0.0, 0.0, 0.0], [1.0], [1.0]).alpha
