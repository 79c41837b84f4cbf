#!/usr/bin/env bash
# Download (never install) the wheels benchmarks/gpu_side_by_side.py needs on a GPU machine
# that reaches no package index, into gpu_wheels/ (git-ignored; carried to the machine):
# open_clip (no deps: torch is the machine's own CUDA build) and its small pure-python
# dependencies that a stock CUDA torch image lacks (huggingface_hub's own dependencies,
# filelock/fsspec/pyyaml/tqdm/requests/packaging, ship with such images). torchvision is not
# fetched: `import open_clip` needs it, and it comes with the CUDA torch image it matches.
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
