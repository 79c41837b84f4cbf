"""benchmarks/demo_recipe.py's variant parsing (its measurements are benchmark runs, recorded in
benchmarks/RESULTS.md; the training path it drives is the demo's, tested by tests/test_demo.py)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from demo_recipe import parse_args, parse_variant  # noqa: E402


def test_variants_are_named_nested_mappings():
    assert parse_variant("demo={}") == ("demo", {})
    assert parse_variant("demo=") == ("demo", {})
    assert parse_variant("p8={model: {overrides: {vision_patch_size: 8}}}") == (
        "p8", {"model": {"overrides": {"vision_patch_size": 8}}})
    assert parse_variant("more_data={images: 16000, steps: 1800, optimizer: {lr: 2.0e-3}}") == (
        "more_data", {"images": 16000, "steps": 1800, "optimizer": {"lr": 0.002}})


@pytest.mark.parametrize("text,message", [
    ("nodelimiter", "NAME=YAML"),
    ("=({})", "NAME=YAML"),
    ("a/b={}", "NAME=YAML"),
    ("x=[1, 2]", "wants a mapping"),
    ("x={a: [}", "not YAML"),
])
def test_bad_variants_are_refused_with_the_reason(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        parse_variant(text)


def test_default_and_repeated_names(capsys):
    assert parse_args([]).variant == [("demo", {})]
    with pytest.raises(SystemExit):
        parse_args(["--variant", "a={}", "--variant", "a={model: {patch_dropout: 0.5}}"])
    assert "variant names repeat" in capsys.readouterr().err
