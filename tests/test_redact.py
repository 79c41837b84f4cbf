"""Credentials in URLs are masked wherever they are logged or saved to be shared.

- `redact` on URL userinfo, presigned S3 / GCS / Azure / CloudFront query strings, token-like
  parameters and Authorization headers; harmless text is left as it was;
- every log record of a process that called `install_log_redaction` (message and traceback);
- a real data build (`python -m data_pipeline build`) whose URL list is fetched from a loopback
  HTTP server through a presigned URL: its output, manifest.json and stats.json hold no
  credential (build_config.json keeps the URL as given: later stages read it back).

The trainer's side (MLflow params, the run_config artifact, INFO logs) is tested in
tests/test_mlflow_tracking.py and tests/test_preempt_tracking_down.py.

Run: `.venv/bin/python -m pytest -q tests/test_redact.py`
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

import data_server_cases as cases
from data_pipeline.serve import ImageServer
from pretrain.redact import MASK, install_log_redaction, redact, redact_tree

ROOT = Path(__file__).resolve().parents[1]

CASES = [
    ("https://user:SEKRET@host/a.tar", "https://***@host/a.tar"),
    ("https://ghp_SEKRET@github.com/o/r.git", "https://***@github.com/o/r.git"),
    ("http://u:p@ss:SEKRET@127.0.0.1:5000/x", "http://***@127.0.0.1:5000/x"),
    ("s3://b/k.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIASEKRET%2F2026&X-Amz-Date=20260101T000000Z"
     "&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Security-Token=SEKRET&X-Amz-Signature=SEKRET",
     "s3://b/k.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***&X-Amz-Date=20260101T000000Z"
     "&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Security-Token=***&X-Amz-Signature=***"),
    ("https://storage.googleapis.com/b/o?X-Goog-Credential=SEKRET&X-Goog-Signature=SEKRET",
     "https://storage.googleapis.com/b/o?X-Goog-Credential=***&X-Goog-Signature=***"),
    ("https://a.blob.core.windows.net/c/x.tar?sv=2022-11-02&se=2026&sp=r&sig=SEKRET%3D",
     "https://a.blob.core.windows.net/c/x.tar?sv=2022-11-02&se=2026&sp=r&sig=***"),
    ("https://d.cloudfront.net/x?Policy=SEKRET&Signature=SEKRET&Key-Pair-Id=SEKRET",
     "https://d.cloudfront.net/x?Policy=***&Signature=***&Key-Pair-Id=***"),
    ("https://h/x?token=SEKRET&page=2&access_token=SEKRET;api_key=SEKRET&key=SEKRET",
     "https://h/x?token=***&page=2&access_token=***;api_key=***&key=***"),
    ('pipe:curl -s -H "Authorization: Bearer SEKRET" https://h/a.tar',
     'pipe:curl -s -H "Authorization: Bearer ***" https://h/a.tar'),
    ("data.sources: ['https://u:SEKRET@h/{0..3}.tar', '/local/x.tar']",
     "data.sources: ['https://***@h/{0..3}.tar', '/local/x.tar']"),
]
UNCHANGED = ["/data/laion/{00000..00099}.tar", "s3://bucket/cc12m/manifest.json", "http://127.0.0.1:5000",
             "mail me at user@example.com", "https://h/x?keyword=cat&page=2", "step 12/100 loss 1.23",
             "sqlite:////runs/a/mlflow.db", "pipe:cat a.tar"]


@pytest.mark.parametrize("text,expected", CASES)
def test_secrets_are_masked(text, expected):
    assert redact(text) == expected
    assert "SEKRET" not in redact(text) and MASK in redact(text)


@pytest.mark.parametrize("text", UNCHANGED)
def test_harmless_text_is_left_alone(text):
    assert redact(text) == text


def test_tree():
    tree = {"a": ["https://u:SEKRET@h/x", 3, None], "b": {"c": ("x?sig=SEKRET",)}, "n": 1.5}
    assert redact_tree(tree) == {"a": ["https://***@h/x", 3, None], "b": {"c": ("x?sig=***",)}, "n": 1.5}


def test_every_log_record_is_redacted(capsys):
    install_log_redaction()
    install_log_redaction()  # idempotent
    logger = logging.getLogger("test_redact.any_library")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    try:
        logger.warning("opening %s", "https://user:SEKRET@host/a.tar?X-Amz-Signature=SEKRET")
        try:
            raise OSError("cannot open https://user:SEKRET@host/b.tar")
        except OSError:
            logger.exception("failed")
        logger.warning("plain %d%%", 5)
    finally:
        logger.removeHandler(handler)
    err = capsys.readouterr().err
    assert "SEKRET" not in err, err
    assert "https://***@host/a.tar?X-Amz-Signature=***" in err and "https://***@host/b.tar" in err
    assert "plain 5%" in err and "Traceback" in err


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_data_build_from_a_presigned_url_list_logs_and_shares_no_credential(tmp_path):
    site = cases.make_site(tmp_path / "site", n_good=4)
    with ImageServer(site.root, behaviours=site.behaviours) as srv:
        table = site.url_table(srv.base_url).iloc[site.kept_rows()]
        table.to_parquet(site.root / "urls.parquet")
        urls = (f"{srv.base_url}/urls.parquet?X-Amz-Algorithm=AWS4-HMAC-SHA256"
                "&X-Amz-Credential=AKIASEKRET%2F20260101&X-Amz-Signature=SEKRETSIG")
        out = tmp_path / "out"
        cmd = [sys.executable, "-m", "data_pipeline", "build", "--urls", urls, "--output", str(out),
               "--crawl.input_format=parquet", "--processes=1", "--crawl.thread_count=4",
               "--crawl.number_sample_per_shard=8", f"--crawl.timeout={cases.TIMEOUT_S}",
               "--crawl.allowed_networks=[127.0.0.1/32]", "--shard.samples_per_shard=5",
               *[f"--{k}={v}" for k, v in cases.BUILD_OVERRIDES.items()]]
        env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled",
               "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
        # an error message that names the URL list is redacted too
        bad = subprocess.run([sys.executable, "-m", "data_pipeline", "crawl", "--urls",
                              urls.replace("urls.parquet", "missing.parquet"), "--output", str(tmp_path / "o2")],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "URL list not found" in bad.stderr, bad.stderr[-2000:]
    for where, text in [("stdout", r.stdout), ("stderr", r.stderr), ("error", bad.stdout + bad.stderr),
                        ("manifest.json", (out / "manifest.json").read_text()),
                        ("stats.json", (out / "stats.json").read_text())]:
        assert "SEKRETSIG" not in text and "AKIASEKRET" not in text, f"{where}: {text[-2000:]}"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["urls"].endswith("X-Amz-Credential=***&X-Amz-Signature=***")
    assert manifest["total_samples"] >= 1
    assert "SEKRETSIG" in (out / "build_config.json").read_text()  # kept as given: later stages read it
