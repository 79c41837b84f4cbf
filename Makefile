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

test: setup
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

demo: setup
	$(PY) -m pretrain.demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) demo_out .pytest_cache
