#!/usr/bin/env bash
# One-shot set-up used by `make test` and `make demo`: system packages (where apt is
# available), a virtualenv in .venv with the project and its test extra, and OpenAI's BPE
# vocabulary in the local cache. Idempotent: a second run only checks.
#
#   scripts/setup.sh            # everything
#   SKIP_APT=1 scripts/setup.sh # no Debian packages (tests needing them skip)
set -euo pipefail
cd "$(dirname "$0")/.."

export NO_ALBUMENTATIONS_UPDATE=1  # albumentations (via img2dataset) phones home at import
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
STAMP="$VENV/.setup-done"

apt_packages=(dataset-fashion-mnist shellcheck slurmctld slurmd slurm-client munge)
if [ -z "${SKIP_APT:-}" ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  missing=()
  for p in "${apt_packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "[setup] apt-get install ${missing[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  echo "[setup] installing packages (first run: a few minutes)"
  "$VENV/bin/pip" install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  # The CPU build of torch first: the project's torch range is satisfied by it, so pip
  # never reaches for the multi-GB CUDA build on a CPU machine.
  "$VENV/bin/pip" install -q "torch==${TORCH_VERSION:-2.13.0}" 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/pip" install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c "import torch, deepspeed, webdataset, img2dataset, mlflow, tokenizers" >/dev/null
  touch "$STAMP"
fi

# DeepSpeed's C++ ops, built now in one process rather than by racing ranks under a test's
# or a launch's clock (~1.5 min once on 2 cores; later runs only load them).
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$(pwd)/$VENV/torch_extensions}"
if ! "$VENV/bin/python" -m pretrain.train.ds_ops --clear-locks; then
  echo "[setup] WARNING: DeepSpeed ops did not build (no C++ compiler?); CPU-Adam offload is unavailable" >&2
fi

# OpenAI's BPE vocabulary, from the open-clip-torch wheel, into the cache (never committed).
"$VENV/bin/python" -m pretrain.assets fetch
