"""Fixtures of the update-stream tests: a replica holding rows 0..9 of table "t", a client of the node."""

from __future__ import annotations

import pytest
import redis

from tests.embeddings.stream.support import replica_server


@pytest.fixture
def ps(tmp_path):
    server = replica_server(tmp_path / "db")
    yield server
    server.close()


@pytest.fixture
def client(redis_node):
    c = redis.Redis(port=redis_node.port)
    yield c
    c.close()
