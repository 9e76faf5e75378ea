"""An embedding model and a cross-encoder in one server (reranker.path): the embedding routes answer from the
model, the re-ranking and classification routes from the reranker, each as a server of that model alone would;
the OpenAI model list names both, health covers both, and the CLI refuses a reranker that is not one."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from server.app import create_app
from tests.cross_encoders import cross_encoder_folder
from tests.support import ServerThread, settings

QUERY = "what is deep learning?"
TEXTS = ["Deep learning is a kind of machine learning with many layers.", "Paris is the capital of France.", "cats"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return cross_encoder_folder(tmp_path_factory.mktemp("beside"))


@pytest.fixture(scope="module")
def both(folder):
    app = create_app(settings(reranker={"path": str(folder), "name": "ce"}))
    with ServerThread(app) as s, s.client() as c:
        yield s, c


@pytest.fixture(scope="module")
def alone(folder):
    with ServerThread(create_app(settings(model={"path": str(folder), "name": "ce"}))) as s, s.client() as c:
        yield c


def test_each_route_answers_from_its_model(both, alone, real_server):
    server, c = both
    with real_server.client() as embedder_alone:
        want = embedder_alone.post("/embed", json={"inputs": TEXTS}).json()
        info = embedder_alone.get("/info").json()
    np.testing.assert_allclose(c.post("/embed", json={"inputs": TEXTS}).json(), want, atol=1e-6)
    assert c.get("/info").json()["model_id"] == info["model_id"]  # TEI's /info: the main model
    for path, body in [("/rerank", {"query": QUERY, "texts": TEXTS}), ("/predict", {"inputs": [QUERY, TEXTS[0]]}),
                       ("/v1/rerank", {"model": "ce", "query": QUERY, "documents": TEXTS}),
                       ("/score", {"text_1": QUERY, "text_2": TEXTS}), ("/v1/classify", {"input": TEXTS})]:
        got, ref = c.post(path, json=body), alone.post(path, json=body)
        assert got.status_code == 200, (path, got.text)
        a, b = got.json(), ref.json()
        if isinstance(a, dict):
            for key in ("id", "created"):
                a.pop(key, None), b.pop(key, None)
        assert str(a) == str(b) or np.allclose(_numbers(a), _numbers(b), atol=1e-6), path
    assert c.post("/", json={"query": QUERY, "texts": TEXTS}).json() == c.post("/rerank", json={"query": QUERY, "texts": TEXTS}).json()
    assert sorted(m["id"] for m in c.get("/v1/models").json()["data"]) == sorted([info["model_id"], "ce"])
    r = c.post("/v1/rerank", json={"model": info["model_id"], "query": QUERY, "documents": TEXTS})
    assert r.status_code == 404 and "'ce'" in r.json()["error"]["message"]
    assert c.get("/health").status_code == 200
    r = c.post("/v1/embeddings", json={"model": "ce", "input": "x"})
    assert r.status_code == 400 and "/v1/rerank" in r.json()["error"]["message"]
    # Triton's repository lists what KServe v2 serves: the model (KServe infer does not serve re-rankers).
    assert [m["name"] for m in c.post("/v2/repository/index").json()] == [info["model_id"]]
    assert server.app.state.reranker.info.name == "ce" and server.app.state.reranker.queue is not server.app.state.engine.queue


def test_triton_statistics_count_each_models_own_batches(both):
    """Both workers shared one batch counter: the encoder's execution_count grew with re-ranking (past its
    inference_count, which Triton's never is); each model now reports its own, the re-ranker included."""
    server, c = both

    def stats():
        return {s["name"]: (int(s["execution_count"]), int(s["inference_count"]))
                for s in c.get("/v2/models/stats").json()["model_stats"]}

    encoder = server.app.state.engine.info.name
    before = stats()
    for _ in range(3):
        assert c.post("/v1/rerank", json={"query": "q", "documents": ["a", "b"]}).status_code == 200
    after = stats()
    assert after[encoder] == before[encoder] and after["ce"][0] >= before.get("ce", (0, 0))[0] + 3
    assert c.post("/embed", json={"inputs": ["x", "y z"]}).status_code == 200
    executions, inferences = stats()[encoder]
    assert executions == before[encoder][0] + 1 and 1 <= executions <= inferences


def _numbers(x) -> list[float]:
    if isinstance(x, dict):
        return [n for v in x.values() for n in _numbers(v)]
    if isinstance(x, list):
        return [n for v in x for n in _numbers(v)]
    return [float(x)] if isinstance(x, (int, float)) and not isinstance(x, bool) else []


def test_the_cli_refuses_a_reranker_that_is_not_one(tmp_path):
    from models.config import default_model_path  # noqa: PLC0415

    cli = [sys.executable, "-m", "server.cli", "serve", "--port", "0", "--reranker"]
    r = subprocess.run(cli + [str(default_model_path())], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "reranker.path" in r.stderr and "not a cross-encoder" in r.stderr
    r = subprocess.run(cli + [str(tmp_path / "missing")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "reranker.path" in r.stderr and "does not exist" in r.stderr


def test_the_cli_refuses_a_reranker_named_as_the_model(folder):
    """Two folders of one name (both `model`, say) would list two models under one name: refused at start."""
    cli = [sys.executable, "-m", "server.cli", "serve", "--port", "0", "--reranker", str(folder),
           "--model-name", folder.name]
    r = subprocess.run(cli, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "reranker.name" in r.stderr and "Traceback" not in r.stderr, r.stderr
