#!/usr/bin/env bash
# Download (never install) the wheels benchmarks/gpu_side_by_side.py needs on a GPU machine
# that reaches no package index, into gpu_wheels/ (git-ignored; carried to the machine):
# open_clip (no deps: torch is the machine's own CUDA build) and its small pure-python
# dependencies that a stock CUDA torch image lacks. torchvision is not fetched: open_clip
# imports it only for its image transforms, which the benchmark does not use.
#
#   scripts/fetch_gpu_wheels.sh            # then, on the GPU machine, one command:
#   pip install --no-index --no-deps gpu_wheels/*.whl && \
#     .venv/bin/python benchmarks/gpu_side_by_side.py --fast
set -euo pipefail
cd "$(dirname "$0")/.."
out=gpu_wheels
mkdir -p "$out"
pip=${PIP:-.venv/bin/pip}
"$pip" download --no-deps --only-binary=:all: -d "$out" \
    open-clip-torch==3.3.0 ftfy wcwidth regex huggingface_hub timm safetensors
du -sh "$out"
