"""Suite-wide hooks: `gpu` tests skip themselves where no CUDA device is present."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    import torch  # noqa: PLC0415

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
