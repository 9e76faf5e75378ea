#!/usr/bin/env bash
# Run HERE (not on the GPU machine), once a session that has a GPU: fills .gpu_carry/ (git-ignored, about 12 MB)
# with what bench/gpu_serve.sh needs there and that machine lacks: wheels for Python 3.12 of the server's packages
# (bench/device_env.py's list, at .venv's versions) and the embedded model's config and tokenizer files (no weights).
# Then a device run with carry [".gpu_carry"]:  bash bench/gpu_serve.sh
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
dir=.gpu_carry
grep -qx '/.gpu_carry/' .git/info/exclude 2>/dev/null || echo '/.gpu_carry/' >> .git/info/exclude
rm -rf "$dir" && mkdir -p "$dir/whl" "$dir/minilm"
pins=$($py bench/device_env.py carry)  # what turboserve needs and the device lacks (bench/device_env.py)
$py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dir/whl" $pins
model=$($py -c "from models.config import default_model_path; print(default_model_path())")
for f in "$model"/*; do  # everything but the weights
    case "$f" in *.safetensors) ;; *) cp -r "$f" "$dir/minilm/" ;; esac
done
du -sh "$dir"
