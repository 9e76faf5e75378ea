"""This repository's `kernels/` package and PyPI's `kernels` (Hugging Face's kernel hub, required by
transformers >= 5.25) share one import name: with both installed, whichever is first on sys.path hides the
other, and either turboserve (no kernels.arena) or transformers (no kernels.CUDAProperties) fails to import.
pyproject.toml keeps transformers below 5.25 for that reason; where someone else set up the machine (the GPU
machine), tests/hf_import.py lets transformers bind PyPI's package first and gives the name back to ours."""

import importlib.metadata
from pathlib import Path

import pytest


def test_pypi_kernels_is_not_installed_beside_ours():
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        dist = importlib.metadata.distribution("kernels")
        pytest.fail(f"PyPI's kernels {dist.version} is installed and clashes with this repository's kernels/ "
                    "package; keep transformers < 5.25 (pyproject.toml) and `pip uninstall kernels`")


def test_kernels_resolves_to_this_repository():
    import kernels.arena  # noqa: PLC0415

    assert Path(kernels.arena.__file__).resolve().parent == Path(__file__).resolve().parents[1] / "kernels"
