# The two commands of the README:
#   make demo   the main job end to end on the embedded default data
#   make test   the whole test suite
# Both set up everything they need (virtualenv, packages, vocabulary) on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
export NO_ALBUMENTATIONS_UPDATE := 1
# DeepSpeed's JIT-built ops stay with this checkout's virtualenv (pretrain/train/ds_ops.py).
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: setup test demo clean

setup:
	scripts/setup.sh

# The test suite also needs the peer virtualenv .venv-peer (the real open_clip and
# clip_benchmark beside torchvision; ~4 min and ~6 GB once), which the demo does not: without
# it the interop tests fail, saying so; SKIP_PEER=1 skips building it and them.
# Three pytest-xdist workers on two cores, each file on one worker, slow files first
# (tests/conftest.py); why three, with the measurements: README, `make test`.
# TEST_WORKERS=0 runs them in this one process.
TEST_WORKERS ?= 3
test: setup
	scripts/setup_peer.sh || echo "[setup] WARNING: .venv-peer did not build: tests/test_openclip_interop.py will fail (SKIP_PEER=1 skips it)" >&2
	$(PY) -m pytest -q tests -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

demo: setup
	$(PY) -m pretrain.demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) demo_out .pytest_cache
