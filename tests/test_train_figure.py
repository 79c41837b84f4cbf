"""A real 2-process training launch logging to a real `mlflow server` on loopback, its
output read from a pipe (no terminal):

- the console's step line is paced (every ~10% of the steps or ~30 s, not at each of the
  24 logging steps) and carries the rate and the ETA; no carriage returns;
- `<run dir>/training_curves.png` is a valid PNG of the figure's fixed size, drawn after
  the evaluations and at the end;
- the MLflow run holds it as the artifact `figures/training_curves.png`, byte-identical to
  the run dir's final figure.

Run: .venv/bin/python -m pytest -q tests/test_train_figure.py   (~1 min)
"""
from __future__ import annotations

import re

import pytest
from PIL import Image

from pretrain.train.figure import ARTIFACT_DIR, FIGURE_NAME, HEIGHT_PX, WIDTH_PX
from train_driver import caption_data, launch, tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

STEPS = 24


@pytest.fixture(scope="module")
def server(mlflow_module_server):
    return mlflow_module_server


@pytest.fixture(scope="module")
def run(tmp_path_factory, server):
    data = caption_data(tmp_path_factory.mktemp("shards"))
    extra = ["--eval.zeroshot_dataset=packaged:fashion-mnist", "--eval.limit=100", "--eval.every_steps=12",
             "--eval.templates=['a photo of a {}.']", f"--logging.tracking_uri={server.url}",
             "--logging.experiment=figure-test", "--logging.console=paced", "--logging.figure=true"]
    return launch(tmp_path_factory.mktemp("run") / "run",
                  tiny_overrides(data, model="RN-tiny", steps=STEPS, extra=extra), nprocs=1, timeout=500)


def test_console_step_lines_are_paced_with_rate_and_eta(run) -> None:
    assert run.rc == 0, run.output[-5000:]
    assert "\r" not in run.output
    lines = re.findall(rf"step (\d+)/{STEPS} loss \S+ .* ([\d.]+) samples/s .*, elapsed (\S+), ETA (\S+)", run.output)
    steps = [int(s) for s, *_ in lines]
    assert steps and steps[-1] == STEPS, run.output[-4000:]
    assert len(steps) <= 11 + int(run.seconds / 30) and len(steps) < STEPS, steps
    assert lines[-1][3] == "0:00"  # nothing left at the last step
    # every step still reached metrics.jsonl (and MLflow) at logging.every_steps=1
    assert len((run.run_dir / "metrics.jsonl").read_text().splitlines()) == STEPS


def test_training_figure_in_the_run_dir_and_in_mlflow(run, server, tmp_path) -> None:
    from mlflow import MlflowClient

    assert run.rc == 0, run.output[-5000:]
    png = run.run_dir / FIGURE_NAME
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (WIDTH_PX, HEIGHT_PX)
        im.verify()
    client = MlflowClient(tracking_uri=server.url)
    run_id = (run.run_dir / "mlflow_run_id.txt").read_text().strip()
    assert [a.path for a in client.list_artifacts(run_id, ARTIFACT_DIR)] == [f"{ARTIFACT_DIR}/{FIGURE_NAME}"]
    got = client.download_artifacts(run_id, f"{ARTIFACT_DIR}/{FIGURE_NAME}", str(tmp_path))
    assert open(got, "rb").read() == png.read_bytes()
    assert client.get_run(run_id).info.status == "FINISHED"
