"""Suite-wide hooks: `gpu` tests skip themselves where no CUDA device is present; the `redis_node` and
`kernel_device` fixtures."""

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
def kernel_device(request) -> str:
    """The device for a test parametrized over `where`: "cuda", or "cpu" with the test run under
    cuda.emulation() (kernels/emulate.py: the CUDA kernels on the CPU)."""
    where = request.node.callspec.params["where"]
    if where == "cuda":
        return "cuda"
    from kernels import cuda, emulate  # noqa: PLC0415

    if emulate.compiler() is None:
        pytest.fail("no C++ compiler: the emulated kernel tests need g++ (Debian's build-essential)")
    ctx = cuda.emulation()
    ctx.__enter__()
    request.addfinalizer(lambda: ctx.__exit__(None, None, None))
    return "cpu"


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
