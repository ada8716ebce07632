#!/usr/bin/env bash
# Build .gpu_carry/: what benchmarks/gpu_check.sh needs on a GPU machine that has torch but neither
# DeepSpeed nor network access (the lent H200: Python 3.12, torch 2.11, transformers 5.17).
#
#   bash benchmarks/gpu_carry.sh [PYTHON_VERSION]      default 3.12; run here, once (~2 min)
#
# Makes .gpu_carry/wheels (a DeepSpeed wheel built with every op left to JIT, and its runtime
# dependencies as wheels for that Python on manylinux x86_64) and .gpu_carry/data (sift-prep of
# ../shared/data, wikitext-2/test.txt held out as validation, vocab 8192, seq 128): ~16 MB.
# Then, with the device tool: carry [".gpu_carry"] and run
#   SIFT_GPU_ARCHIVE=$OUT/gpu_check.tgz bash benchmarks/gpu_check.sh .gpu_carry/data /tmp/gpu
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
pyver=${1:-3.12}
abi="cp${pyver/./}"
venv=${SIFT_VENV:-$root/.venv}
bash launch/setup_env.sh >/dev/null
wheels=.gpu_carry/wheels
mkdir -p "$wheels"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if ! ls "$wheels"/deepspeed-*.whl >/dev/null 2>&1; then
    echo "[gpu_carry] building a DeepSpeed wheel (ops JIT)" >&2
    "$venv/bin/python" -m pip download -q --no-deps --no-binary :all: deepspeed==0.19.8 -d "$tmp"
    DS_BUILD_OPS=0 "$venv/bin/python" -m pip wheel -q --no-deps --no-build-isolation -w "$wheels" \
        "$tmp"/deepspeed-0.19.8.tar.gz
fi
echo "[gpu_carry] runtime dependencies for CPython $pyver" >&2
"$venv/bin/python" -m pip download -q --no-deps --only-binary :all: --python-version "$pyver" \
    --implementation cp --abi "$abi" --abi abi3 --abi none --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any -d "$wheels" \
    hjson "pydantic>=2,<3" annotated-types typing-inspection typing-extensions msgpack ninja \
    py-cpuinfo psutil nvidia-ml-py einops packaging tqdm
# pydantic pins its core exactly: fetch the version it names
core=$(unzip -p "$(ls "$wheels"/pydantic-2*.whl | sort -V | tail -1)" '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core==\([0-9.]*\).*/\1/p')
"$venv/bin/python" -m pip download -q --no-deps --only-binary :all: --python-version "$pyver" \
    --implementation cp --abi "$abi" --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 -d "$wheels" "pydantic-core==$core"
if [ ! -f .gpu_carry/data/manifest.json ]; then
    echo "[gpu_carry] preparing ../shared/data" >&2
    "$venv/bin/sift-prep" ../shared/data --valid-input ../shared/data/wikitext-2/test.txt \
        --encoding-errors replace --vocab-size 8192 --seq-len 128 --output .gpu_carry/data --no-progress
fi
du -sh .gpu_carry >&2
