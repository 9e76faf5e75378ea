"""Import transformers beside this repository's `kernels/` package.

transformers >= 5.25 requires PyPI's `kernels` (Hugging Face's kernel hub) and imports it when it loads its
models; with this repository on sys.path, the name `kernels` is ours and that import fails (no
`CUDAProperties`). pyproject.toml keeps such versions out of our venv, but a machine set up by others (the GPU
machine, a user's environment) may have them. import_transformers() lets transformers bind PyPI's package
first, then gives the name back to ours: transformers keeps references to what it imported, our modules keep
importing `kernels.*` from this repository.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def _ours() -> dict[str, ModuleType]:
    return {name: mod for name, mod in sys.modules.items() if name == "kernels" or name.startswith("kernels.")}


def import_transformers() -> ModuleType:
    """`transformers`, with its model code loaded (where it imports `kernels`). Hub kernels are switched off
    (USE_HUB_KERNELS=NO, unless set): a reference or baseline model is plain transformers, and loading one
    would otherwise import from `kernels` again (`from kernels import Mode` in from_pretrained)."""
    os.environ.setdefault("USE_HUB_KERNELS", "NO")
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        import transformers.modeling_utils  # noqa: F401, PLC0415  (nothing to untangle)

        return sys.modules["transformers"]
    if "transformers.modeling_utils" in sys.modules:
        return sys.modules["transformers"]
    ours = _ours()
    for name in ours:
        del sys.modules[name]
    saved_path = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
    importlib.invalidate_caches()
    try:
        import transformers.modeling_utils  # noqa: F401, PLC0415  (binds PyPI's kernels)
    finally:
        sys.path[:] = saved_path
        for name in _ours():  # PyPI's, now held by transformers
            del sys.modules[name]
        sys.modules.update(ours)
        importlib.invalidate_caches()
    return sys.modules["transformers"]
