from __future__ import annotations

import pytest

from tests.server.recommend_support import make_dlrm
from tests.support import DummyEmbedder, ServerThread, dummy_server, settings


@pytest.fixture(scope="module")
def embedder() -> DummyEmbedder:
    return DummyEmbedder()


@pytest.fixture(scope="module")
def srv(embedder):
    """A dummy-engine server shared by a module's tests (tests must leave the embedder ungated)."""
    with dummy_server(embedder) as s:
        yield s


@pytest.fixture
def client(srv):
    with srv.client() as c:
        yield c


@pytest.fixture(scope="session")
def real_server():
    """The embedded all-MiniLM-L6-v2 behind a real uvicorn (loaded once for the session)."""
    from server.app import create_app  # noqa: PLC0415

    app = create_app(settings(model={"warmup": True}))
    with ServerThread(app) as s:
        yield s


@pytest.fixture(scope="module")
def dlrm(tmp_path_factory):
    """A small DLRM, its tables and a RocksDB store holding them (tests/server/recommend_support.py)."""
    return make_dlrm(tmp_path_factory.mktemp("dlrm"))
