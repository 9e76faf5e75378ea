"""Suite-wide hooks: `gpu` tests skip themselves where no CUDA device is present; the `redis_node` fixture."""

from __future__ import annotations

import importlib.metadata

import pytest

try:  # PyPI's `kernels` beside ours (a machine set up by others): let transformers bind it first
    importlib.metadata.distribution("kernels")
except importlib.metadata.PackageNotFoundError:
    pass
else:
    from tests.hf_import import import_transformers

    import_transformers()


@pytest.fixture
def redis_node(tmp_path):
    """A fresh single redis-server on a free loopback port, terminated after the test."""
    from tests.processes import RedisProcess, free_port  # noqa: PLC0415

    node = RedisProcess(free_port(), tmp_path / "redis")
    node.start()
    yield node
    node.stop()


def pytest_collection_modifyitems(config, items):
    import torch  # noqa: PLC0415

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
