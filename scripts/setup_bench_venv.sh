#!/usr/bin/env bash
# The benchmark virtualenv `.venv-bench`: this project beside open_clip, for the side-by-side
# benchmarks benchmarks/bench_vs_openclip_*.py. The project itself never depends on open_clip;
# only this separate environment has it. Idempotent: a second run only checks.
#
#   scripts/setup_bench_venv.sh               # create / update .venv-bench
#   BENCH_VENV=/tmp/vb scripts/setup_bench_venv.sh
#
# open-clip-torch needs torchvision, and torchvision from the registry imports only beside
# torch 2.14.1 (the ~5.5 GB CUDA build, which also runs on CPU; docs/cpu_development.md), so this
# environment pins torch==2.14.1 torchvision==0.29.1 while .venv keeps torch 2.13.0+cpu.
# It never touches .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=${BENCH_VENV:-.venv-bench}
STAMP="$VENV/.setup-done"
TORCH_PIN="torch==2.14.1"
VISION_PIN="torchvision==0.29.1"
OPENCLIP_PIN="open-clip-torch==3.3.0"
# open_clip's "training" extra pins webdataset<=0.2.86: open_clip_train's tar reader breaks on
# the end-of-shard marker that later 0.2.x releases yield (KeyError 'fname'). 0.2.86 also
# satisfies this project (>=0.2.86,<0.3) and img2dataset (<0.3).
WDS_PIN="webdataset==0.2.86"

if [ "$VENV" = ".venv" ]; then
  echo "[bench-setup] refusing to install open_clip into the project's .venv" >&2
  exit 2
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "[bench-setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] || [ "$0" -nt "$STAMP" ]; then
  pip_q() { "$VENV/bin/pip" install -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
  echo "[bench-setup] installing $TORCH_PIN $VISION_PIN (first run: several minutes, ~5.5 GB)"
  pip_q --upgrade pip
  pip_q "$TORCH_PIN" "$VISION_PIN"
  echo "[bench-setup] installing $OPENCLIP_PIN and this project (-e .)"
  # open_clip_train's own data/training deps are its "training" extra; the ones the
  # benchmarks use (webdataset, braceexpand, pandas, fsspec) come with this project too.
  # The torch pins are repeated so that no resolver step swaps the torch build.
  pip_q "$TORCH_PIN" "$VISION_PIN" "$OPENCLIP_PIN" "$WDS_PIN" -e .
  "$VENV/bin/python" - <<'EOF'
import importlib.util
import open_clip, torch, torchvision, deepspeed, webdataset, pretrain  # noqa: F401
assert webdataset.__version__ == "0.2.86", webdataset.__version__
print(f"[bench-setup] torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"open_clip {open_clip.__version__}, open_clip_train "
      f"{'present' if importlib.util.find_spec('open_clip_train') else 'ABSENT'}")
EOF
  touch "$STAMP"
fi
# The BPE vocabulary both tokenizers read (cached, never fetched at run time).
"$VENV/bin/python" -m pretrain.assets fetch
