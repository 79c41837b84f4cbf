#!/usr/bin/env bash
# The peer virtualenv `.venv-peer`: the real open_clip and clip_benchmark packages, and none
# of this project, for the interoperability checks (tests/test_openclip_interop.py loads our
# exported file in open_clip; benchmarks/clip_benchmark_agreement.py runs clip_benchmark on
# it). The project itself never imports either. Idempotent: a second run only checks.
#
#   scripts/setup_peer.sh                # create / update .venv-peer (first run: several minutes)
#   PEER_VENV=/tmp/vp scripts/setup_peer.sh
#   SKIP_PEER=1 scripts/setup_peer.sh    # build nothing (the interop tests then skip, saying why)
#
# open_clip needs torchvision, and torchvision from the registry imports only beside torch
# 2.14.1 (the ~5.5 GB CUDA build, which also runs on CPU; docs/cpu_development.md), so this
# environment pins torch==2.14.1 torchvision==0.29.1 while .venv keeps torch 2.13.0+cpu.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${SKIP_PEER:-}" ]; then
  echo "[peer-setup] SKIP_PEER set: not building the peer virtualenv"
  exit 0
fi
PY=${PYTHON:-python3}
VENV=${PEER_VENV:-.venv-peer}
STAMP="$VENV/.setup-done"
# requests: imported by clip_benchmark's CLI (its dataset builders) but not declared by its wheel.
# numpy<2.4: clip_benchmark 1.6.2's accuracy() calls float() on a 1-element array, which numpy
# 2.4 refuses (deprecated since 1.25).
PINS=(torch==2.14.1 torchvision==0.29.1 open-clip-torch==3.3.0 clip-benchmark==1.6.2 requests "numpy<2.4")

if [ "$VENV" = ".venv" ]; then
  echo "[peer-setup] refusing to install open_clip into the project's .venv" >&2
  exit 2
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "[peer-setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
if [ ! -f "$STAMP" ] || [ "$0" -nt "$STAMP" ]; then
  echo "[peer-setup] installing ${PINS[*]} (first run: several minutes, ~5.5 GB)"
  rm -f "$STAMP"
  "$VENV/bin/pip" install -q "${PINS[@]}" 2>&1 | grep -v "^WARNING: Location" || true
  # Import check: a half-installed environment must not get the stamp.
  "$VENV/bin/python" -c "
import open_clip, clip_benchmark.cli, torch, torchvision
print(f'[peer-setup] torch {torch.__version__}, torchvision {torchvision.__version__}, open_clip {open_clip.__version__}')
"
  touch "$STAMP"
fi
