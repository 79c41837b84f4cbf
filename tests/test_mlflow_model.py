"""The MLflow model (pretrain/modelio/mlflow_model.py) against a real `mlflow server` on loopback.

- a tiny run trained by a real launch of pretrain/run.py, tracking to the server with
  `logging.registered_model_name`: the run logs its final model, version 1 of that name shows
  in the registry, and `mlflow.pyfunc.load_model("models:/NAME/1")` (and `runs:/ID/model`)
  embeds texts and images as our model does (the checkpoint through `F.normalize(encode_*)`
  and the eval transform), to 1e-5;
- `clip-export RUN OUT --format mlflow` writes the same model; `mlflow models serve
  --env-manager local` on 127.0.0.1 answers /invocations with the same embeddings (base64
  images in JSON) and a bad image with HTTP 400 naming the row;
- a random-init ViT logged with `log_mlflow_model`: `load_checked` loads it, and refuses a copy
  whose MLmodel asks MLflow to unpickle a python_model; bad inputs give clear errors;
- the tracker skips the model when the server is down at the end; config checks.

Run: `.venv/bin/python -m pytest -q tests/test_mlflow_model.py`
"""
from __future__ import annotations

import base64
import io
import json
import logging
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_harness import free_port  # noqa: E402
from mlflow_server import MlflowServer  # noqa: E402
from train_driver import REPO, caption_data, launch, tiny_overrides  # noqa: E402
from watched import kill_tree  # noqa: E402

TEXTS = ["a photo of a cat.", "a pair of trainers", "ÉTÉ <b>sandals</b> &amp; socks " * 20]
NAME = "clip-tiny-test"


def images() -> list[bytes]:
    """A non-square JPEG, a grey PNG, an RGBA PNG: three decode paths of the eval transform."""
    rng = np.random.default_rng(0)
    out = []
    for mode, size, fmt in (("RGB", (61, 40), "JPEG"), ("L", (32, 48), "PNG"), ("RGBA", (50, 50), "PNG")):
        arr = rng.integers(0, 256, (size[1], size[0], len(mode) if mode != "L" else 1), dtype=np.uint8)
        img = Image.fromarray(arr.squeeze(-1) if mode == "L" else arr, mode)
        buf = io.BytesIO()
        img.save(buf, fmt)
        out.append(buf.getvalue())
    return out


def reference(model, texts: list[str], imgs: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Our model's own embeddings: tokenizer -> encode_text, eval transform -> encode_image."""
    from pretrain.eval.transforms import get_eval_transform
    from pretrain.tokenizer import default_tokenizer

    transform, _ = get_eval_transform(model.image_size)
    with torch.no_grad():
        t = F.normalize(model.encode_text(default_tokenizer()(texts, context_length=model.context_length)), dim=-1)
        i = F.normalize(model.encode_image(torch.stack([transform(b) for b in imgs])), dim=-1)
    return t.numpy(), i.numpy()


def as_arrays(out: pd.DataFrame, n_text: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows 0..n_text-1 hold texts only, the rest images only."""
    assert list(out.columns) == ["text_embedding", "image_embedding"]
    texts, imgs = out["text_embedding"].tolist(), out["image_embedding"].tolist()
    assert all(v is None for v in imgs[:n_text]) and all(v is None for v in texts[n_text:]), out
    return np.array(texts[:n_text], dtype=np.float32), np.array(imgs[n_text:], dtype=np.float32)


def mixed_frame(imgs: list[bytes]) -> pd.DataFrame:
    return pd.DataFrame({"text": TEXTS + [None] * len(imgs), "image": [None] * len(TEXTS) + imgs})


@pytest.fixture(scope="module")
def server(mlflow_module_server):
    return mlflow_module_server


@pytest.fixture(scope="module")
def trained(server, tmp_path_factory):
    data = caption_data(tmp_path_factory.mktemp("shards"), corrupt=False)
    run_dir = tmp_path_factory.mktemp("train") / "run"
    extra = [f"--logging.tracking_uri={server.url}", "--logging.log_model=true", f"--logging.registered_model_name={NAME}",
             "--logging.experiment=mlflow-model-test"]
    run = launch(run_dir, tiny_overrides(data, steps=4, extra=extra), nprocs=1)
    assert run.rc == 0, run.output[-6000:]
    return run


@pytest.fixture
def client(server, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    mlflow.set_tracking_uri(server.url)
    return MlflowClient(tracking_uri=server.url)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_finished_run_logs_and_registers_a_model_that_embeds_like_ours(trained, client):
    import mlflow

    from pretrain.modelio import load_model_from_run

    run_id = (trained.run_dir / "mlflow_run_id.txt").read_text().strip()
    assert f"mlflow: logged the final model as runs:/{run_id}/model" in trained.output, trained.output[-4000:]
    assert f"registered as {NAME} version 1" in trained.output
    # MLflow ran the stored input example through the model when it was logged (its failure
    # is a warning, which the trainer's MLflow log level still shows)
    assert "Failed to validate serving input example" not in trained.output, trained.output[-4000:]
    versions = client.search_model_versions(f"name='{NAME}'")
    assert [(v.version, v.run_id) for v in versions] == [("1", run_id)]
    assert client.get_run(run_id).info.status == "FINISHED"

    ours = load_model_from_run(trained.run_dir)
    imgs = images()
    want_t, want_i = reference(ours, TEXTS, imgs)
    for uri in (f"models:/{NAME}/1", f"runs:/{run_id}/model"):
        model = mlflow.pyfunc.load_model(uri, model_config={"device": "cpu"})
        assert model.metadata.get_input_schema().input_names() == ["text", "image"]
        assert model.metadata.saved_input_example_info is not None  # the example is stored with it
        got_t, got_i = as_arrays(model.predict(mixed_frame(imgs)), len(TEXTS))
        np.testing.assert_allclose(got_t, want_t, atol=1e-5, rtol=0)
        np.testing.assert_allclose(got_i, want_i, atol=1e-5, rtol=0)
        np.testing.assert_allclose(np.linalg.norm(got_i, axis=1), 1.0, atol=1e-5)
    # one row with both, and a frame with one column only
    both = model.predict(pd.DataFrame({"text": [TEXTS[0]], "image": [imgs[0]]}))
    np.testing.assert_allclose(both["text_embedding"][0], want_t[0], atol=1e-5)
    np.testing.assert_allclose(both["image_embedding"][0], want_i[0], atol=1e-5)
    only = model.predict(pd.DataFrame({"text": TEXTS[:2]}))
    np.testing.assert_allclose(np.array(only["text_embedding"].tolist()), want_t[:2], atol=1e-5)
    assert only["image_embedding"].tolist() == [None, None]


def _serve(model_dir: Path, port: int, log: Path) -> subprocess.Popen:
    # `--env-manager local` runs uvicorn from PATH: the virtualenv's bin first
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", str(model_dir), "--env-manager",
         "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)


def _post(url: str, payload: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_clip_export_mlflow_and_mlflow_models_serve(trained, tmp_path):
    from pretrain.modelio import load_model_from_run

    out = tmp_path / "exported"
    cli = subprocess.run([sys.executable, "-m", "pretrain.export", str(trained.run_dir), str(out), "--format", "mlflow"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert f"wrote {out}" in cli.stdout
    assert sorted(p.name for p in (out / "data" / "clip").iterdir()) == [
        "model_config.json", "tokenizer.json", "weights.safetensors"]
    assert not list(out.rglob("*.pkl")) and not list(out.rglob("*.py"))  # no pickle, no code
    again = subprocess.run([sys.executable, "-m", "pretrain.export", str(trained.run_dir), str(out), "--format",
                            "mlflow"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert again.returncode == 1 and "exists and is not an empty directory" in again.stderr

    imgs = images()
    want_t, want_i = reference(load_model_from_run(trained.run_dir), TEXTS, imgs)
    port = free_port()
    proc = _serve(out, port, tmp_path / "serve.log")
    try:
        deadline, up = time.monotonic() + 120, False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    up = r.status == 200
                    break
            except OSError:
                time.sleep(0.5)
        if not up:
            pytest.skip("`mlflow models serve --env-manager local` did not answer /ping within 120 s: "
                        + (tmp_path / "serve.log").read_text()[-1500:])
        # plain and MIME-style (line-broken, as MLflow's own encoder writes) base64
        records = [{"text": t} for t in TEXTS] + [{"image": base64.b64encode(imgs[0]).decode()}] + [
            {"image": base64.encodebytes(b).decode()} for b in imgs[1:]]
        status, body = _post(f"http://127.0.0.1:{port}/invocations", {"dataframe_records": records})
        assert status == 200, body
        got = pd.DataFrame(body["predictions"])
        got = got.astype(object).where(got.notna(), None)
        got_t, got_i = as_arrays(got, len(TEXTS))
        np.testing.assert_allclose(got_t, want_t, atol=1e-5, rtol=0)
        np.testing.assert_allclose(got_i, want_i, atol=1e-5, rtol=0)
        bad = [{"text": "fine"}, {"image": base64.b64encode(b"GIF89a not really").decode()}]
        status, body = _post(f"http://127.0.0.1:{port}/invocations", {"dataframe_records": bad})
        assert status == 400 and "row 1: 'image' is not a usable image" in body.get("message", ""), (status, body)
    finally:
        kill_tree(proc)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_random_init_logged_loaded_checked_and_bad_inputs(server, client, tmp_path):
    import mlflow
    import yaml
    from mlflow.exceptions import MlflowException

    from pretrain.models import create_model
    from pretrain.modelio import mlflow_model as mm
    from pretrain.tokenizer import default_tokenizer

    assert mm.LOADER_MODULE == mm.__name__
    torch.manual_seed(0)
    ours = create_model("ViT-tiny").eval()
    exp = client.create_experiment("random-init")
    run_id = client.create_run(exp).info.run_id
    info = mm.log_mlflow_model(ours, default_tokenizer(), tracking_uri=server.url, run_id=run_id,
                               registered_model_name="clip-random")
    assert str(info.registered_model_version) == "1"
    model = mm.load_checked("models:/clip-random/1", model_config={"device": "cpu", "batch_size": 2})
    imgs = images()
    want_t, want_i = reference(ours, TEXTS, imgs)
    got_t, got_i = as_arrays(model.predict(mixed_frame(imgs)), len(TEXTS))  # batch_size 2: split batches
    np.testing.assert_allclose(got_t, want_t, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got_i, want_i, atol=1e-5, rtol=0)
    by_run = mlflow.pyfunc.load_model(f"runs:/{run_id}/model", model_config={"device": "cpu"})
    np.testing.assert_allclose(as_arrays(by_run.predict(mixed_frame(imgs)), len(TEXTS))[0], want_t, atol=1e-5)

    # bad inputs: clear errors naming the row, nothing crashes
    cases = [(pd.DataFrame({"image": [imgs[0], b"\x89PNG\r\n\x1a\n broken"]}), "row 1: 'image' is not a usable image"),
             (pd.DataFrame({"caption": ["x"]}), "needs a 'text' and/or an 'image' column")]
    for frame, message in cases:
        with pytest.raises(MlflowException, match=message):
            model.predict(frame)
    embedder = mm._load_pyfunc(str(Path(mlflow.artifacts.download_artifacts("models:/clip-random/1")) / "data" / "clip"),
                               {"device": "cpu"})
    with pytest.raises(MlflowException, match="row 0: 'image' is a string that is not base64"):
        embedder.predict(pd.DataFrame({"image": ["not base64!"]}))
    with pytest.raises(MlflowException, match="row 0: 'text' must be a string"):
        embedder.predict(pd.DataFrame({"text": [3]}))
    with pytest.raises(MlflowException, match="unknown model_config keys"):
        mm._load_pyfunc("unused", {"devcie": "cpu"})

    # a tampered copy: MLmodel asks MLflow to unpickle a python_model -> refused before loading
    local = Path(mlflow.artifacts.download_artifacts("models:/clip-random/1", dst_path=str(tmp_path / "copy")))
    meta = yaml.safe_load((local / "MLmodel").read_text())
    meta["flavors"]["python_function"].update(python_model="python_model.pkl", loader_module="mlflow.pyfunc.model")
    (local / "MLmodel").write_text(yaml.safe_dump(meta))
    with pytest.raises(MlflowException, match="refused"):
        mm.load_checked(str(local))
    # a damaged weights file: a clear error
    good = Path(mlflow.artifacts.download_artifacts("models:/clip-random/1", dst_path=str(tmp_path / "damaged")))
    w = good / "data" / "clip" / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(MlflowException, match="not a readable safetensors file"):
        mm.load_checked(str(good))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tracker_skips_the_model_when_the_server_is_down_at_the_end(tmp_path, caplog):
    from pretrain.train.tracking import Tracker

    root = tmp_path / "srv"
    root.mkdir()
    srv = MlflowServer(root, free_port()).start()
    tracker = Tracker(True, tmp_path / "run", tracking_uri=srv.url, experiment="down", flush_s=0.2,
                      close_timeout_s=30)
    (tmp_path / "run").mkdir()
    assert tracker.start({"a": "1"})
    srv.kill()
    tracker.log_metrics({"loss": 1.0}, 1)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="pretrain.train.tracking"):
        assert tracker.log_model(tmp_path / "run", tokenizer=None, step=1, registered_model_name="x") is None
    assert time.monotonic() - started < 60
    assert "the final model is not logged" in caplog.text and "--format mlflow" in caplog.text
    tracker.close()


def test_config_keys_for_the_model():
    from train_driver import base_config

    from pretrain.config.engine import ConfigError

    cfg = base_config()
    assert cfg.logging.log_model is True and cfg.logging.registered_model_name == ""
    assert base_config(["--logging.registered_model_name=clip-b32"]).logging.registered_model_name == "clip-b32"
    for bad, message in (("--logging.registered_model_name=a/b", "must not be blank or contain"),
                         ("--logging.registered_model_name=' '", "must not be blank or contain")):
        with pytest.raises(ConfigError, match=message):
            base_config([bad])
    with pytest.raises(ConfigError, match="needs logging.log_model=true"):
        base_config(["--logging.registered_model_name=x", "--logging.log_model=false"])
