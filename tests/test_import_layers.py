"""The layering of docs/architecture.md holds: import-linter's contracts in pyproject.toml
(`[tool.importlinter]`) are kept by the tree, and they do catch a violation, including an
import hidden inside a function body.

Run: `.venv/bin/python -m pytest -q tests/test_import_layers.py`
(or the linter alone: `.venv/bin/lint-imports --config pyproject.toml`).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINT = ("from importlinter.cli import lint_imports; "
        "raise SystemExit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))")


def lint(root: Path) -> subprocess.CompletedProcess:
    """lint-imports over the packages under `root` (found first on the path), with the
    contracts of `root`/pyproject.toml."""
    env = dict(os.environ, PYTHONPATH=str(root))
    return subprocess.run([sys.executable, "-c", LINT], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_tree_keeps_its_import_contracts() -> None:
    out = lint(REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout and "BROKEN" not in out.stdout, out.stdout


def _copy_tree(dst: Path) -> None:
    shutil.copy(REPO / "pyproject.toml", dst / "pyproject.toml")
    for pkg in ("pretrain", "data_pipeline"):
        shutil.copytree(REPO / pkg, dst / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def test_contracts_catch_upward_imports_inside_functions(tmp_path: Path) -> None:
    _copy_tree(tmp_path)
    # Imports that only run when the function is called, as the old cycle-dodging ones did.
    (tmp_path / "pretrain" / "models" / "_probe.py").write_text(
        "def f():\n    from pretrain.train import loop  # upward: models -> train\n    return loop\n")
    (tmp_path / "data_pipeline" / "_probe.py").write_text(
        "def g():\n    import pretrain.eval.api  # the data build must not use eval\n    return pretrain\n")
    (tmp_path / "pretrain" / "gradcache" / "_probe.py").write_text(
        "def h():\n    from pretrain.train.step import train_step  # the old cycle\n    return train_step\n")
    (tmp_path / "pretrain" / "loss" / "_probe.py").write_text(
        "def k():\n    import deepspeed  # the losses stay free of DeepSpeed\n    return deepspeed\n")
    (tmp_path / "pretrain" / "eval" / "_probe.py").write_text(
        "def m():\n    from data_pipeline import layout  # only the demo drives the data build\n    return layout\n")
    out = lint(tmp_path)
    text = out.stdout + out.stderr
    assert out.returncode != 0, text
    assert "pretrain: layers only import downward BROKEN" in text, text
    assert "data_pipeline: the data build never uses the trainer, gradient caching or eval BROKEN" in text, text
    assert "pretrain: only the demo drives the data build BROKEN" in text, text
    assert "model, loss, data, config and step code stay free of DeepSpeed BROKEN" in text, text
    for edge in ("pretrain.models._probe -> pretrain.train.loop", "data_pipeline._probe -> pretrain.eval.api",
                 "pretrain.gradcache._probe -> pretrain.train.step", "pretrain.loss._probe -> deepspeed",
                 "pretrain.eval._probe -> data_pipeline.layout"):
        assert edge in text, text
