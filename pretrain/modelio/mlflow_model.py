"""A CLIP model of ours as an MLflow ``pyfunc`` model that embeds texts and images.

    from pretrain.modelio.mlflow_model import log_mlflow_model, save_mlflow_model
    save_mlflow_model(model, "out/mlflow", tokenizer)           # clip-export RUN OUT --format mlflow
    info = log_mlflow_model(model, tokenizer, tracking_uri=uri, run_id=run_id,
                            registered_model_name="clip-vit-b32")  # the trainer, at the end of a run

    m = mlflow.pyfunc.load_model("models:/clip-vit-b32/1")       # or runs:/RUN_ID/model, or out/mlflow
    m.predict(pd.DataFrame({"text": ["a cat", None], "image": [None, jpeg_bytes]}))
    #   -> DataFrame[text_embedding, image_embedding]: L2-normalised float lists, None where absent
    mlflow models serve -m models:/clip-vit-b32/1 --env-manager local -p 5001
    curl -d '{"dataframe_records": [{"text": "a cat"}, {"image": "<base64 JPEG/PNG>"}]}' \\
         -H 'Content-Type: application/json' 127.0.0.1:5001/invocations

Input: a DataFrame with a ``text`` column (str) and/or an ``image`` column (an encoded
JPEG/PNG/... image: ``bytes``, or a base64 string, which is how JSON carries it); a row may
have either or both, a missing value is None/NaN.
Images get the project's one eval transform (`pretrain.data.EvalTransform`: OpenAI's resize,
centre crop and normalisation, with the shards' pixel cap), texts the model's own tokenizer,
so the embeddings equal ``F.normalize(model.encode_image/encode_text(...))`` of the trainer's
model. A bad row (an undecodable image, a non-string text) fails the request with an
``MlflowException`` (HTTP 400 when served) that names the row.

The model directory: ``MLmodel`` (YAML), the environment files, and ``data/clip/``:
``weights.safetensors`` (fp32, OpenAI layout: the file `clip-export` writes),
``model_config.json`` (the model config, plus what shapes cannot tell: activation, heads) and
``tokenizer.json``. Load-time options (``mlflow.pyfunc.load_model(uri, model_config=...)``):
``device`` (``auto``: CUDA when available, else CPU) and ``batch_size`` (rows per forward, 32).

Why MLflow's ``loader_module`` form and not ``python_model``: a ``python_model`` instance is
cloudpickled into the model (unpickling it runs whatever the pickle says), and a
models-from-code ``python_model`` file is copied into the model and executed at load. Here
the MLmodel file names this installed module and ``_load_pyfunc`` reads only safetensors and
JSON: the logged model holds no pickle and no code. The price: the loading environment must
have this project installed (``pip install`` of the repository; ``mlflow models serve
--env-manager local``); the model's requirements.txt lists it with the versions it was
logged with. `load_checked` refuses a model whose MLmodel would run anything else (a
cloudpickled or code-file pyfunc, extra code paths) before MLflow loads it.
"""
from __future__ import annotations

import base64
import binascii
import importlib.metadata
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, Schema
from mlflow.types.schema import Array

LOADER_MODULE = "pretrain.modelio.mlflow_model"  # what MLmodel names; == __name__ (tested)
FORMAT = "pretrain.clip-embedder"
FORMAT_VERSION = 1
WEIGHTS, CONFIG, TOKENIZER = "weights.safetensors", "model_config.json", "tokenizer.json"
DATA_DIR = "clip"  # MLflow copies it to data/clip/ in the model
TEXT, IMAGE = "text", "image"
TEXT_OUT, IMAGE_OUT = "text_embedding", "image_embedding"
DEFAULT_BATCH = 32
# Distributions whose versions the model records (requirements.txt): the project and what
# loading and predicting import.
REQUIREMENTS = ("clip-pretrain", "mlflow", "torch", "safetensors", "tokenizers", "ftfy", "pillow", "simplejpeg",
                "numpy", "pandas", "fsspec", "pyyaml")

# `image` is declared a string column: MLflow's JSON parser base64-decodes a binary column
# value by value and fails on the nulls of rows without an image; a string column passes
# base64 text (JSON) and raw bytes (Python) through, and predict decodes the former.
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(DataType.string, TEXT, required=False), ColSpec(DataType.string, IMAGE, required=False)]),
    outputs=Schema([ColSpec(Array(DataType.float), TEXT_OUT, required=False),
                    ColSpec(Array(DataType.float), IMAGE_OUT, required=False)]),
)


def _bad_input(message: str) -> MlflowException:
    return MlflowException.invalid_parameter_value(message)  # the scoring server answers 400


def _missing(value: Any) -> bool:
    if value is None or value is pd.NA:
        return True
    return isinstance(value, float) and math.isnan(value)


class ClipEmbedder:
    """What ``_load_pyfunc`` returns: ``predict(DataFrame) -> DataFrame`` of normalised embeddings."""

    def __init__(self, model, tokenizer, device: str | torch.device = "cpu", batch_size: int = DEFAULT_BATCH) -> None:
        from pretrain.data.transforms import EvalTransform

        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.transform = EvalTransform(model.image_size)

    # --- pieces, also used by the tests to compare with the model itself -----------------
    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> np.ndarray:
        out = []
        for i in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(texts[i:i + self.batch_size], context_length=self.model.context_length)
            out.append(F.normalize(self.model.encode_text(tokens.to(self.device)).float(), dim=-1).cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, self.model.embed_dim), np.float32)

    @torch.inference_mode()
    def embed_images(self, images: list[bytes]) -> np.ndarray:
        out = []
        for i in range(0, len(images), self.batch_size):
            pixels = torch.stack([self.transform(b) for b in images[i:i + self.batch_size]])
            dtype = next(self.model.parameters()).dtype
            out.append(F.normalize(self.model.encode_image(pixels.to(self.device, dtype)).float(), dim=-1).cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, self.model.embed_dim), np.float32)

    # --- the pyfunc entry point ------------------------------------------------------------
    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> pd.DataFrame:
        if isinstance(model_input, dict):
            model_input = pd.DataFrame(model_input)
        if not isinstance(model_input, pd.DataFrame):
            raise _bad_input(f"expected a DataFrame with a {TEXT!r} and/or an {IMAGE!r} column, "
                             f"got {type(model_input).__name__}")
        if TEXT not in model_input.columns and IMAGE not in model_input.columns:
            raise _bad_input(f"the input needs a {TEXT!r} and/or an {IMAGE!r} column; got columns "
                             f"{[str(c) for c in model_input.columns][:20]}")
        n = len(model_input)
        text_rows, texts, image_rows, images = [], [], [], []
        for row in range(n):
            if TEXT in model_input.columns and not _missing(t := model_input[TEXT].iloc[row]):
                if not isinstance(t, str):
                    raise _bad_input(f"row {row}: {TEXT!r} must be a string, got {type(t).__name__}")
                text_rows.append(row)
                texts.append(t)
            if IMAGE in model_input.columns and not _missing(b := model_input[IMAGE].iloc[row]):
                image_rows.append(row)
                images.append(self._image_bytes(row, b))
        text_emb = self.embed_texts(texts)
        try:
            image_emb = self.embed_images(images)
        except Exception as exn:  # noqa: BLE001 - find the row that failed, for the message
            raise self._which_image(images, image_rows, exn) from exn
        out_text: list[list[float] | None] = [None] * n
        out_image: list[list[float] | None] = [None] * n
        for row, emb in zip(text_rows, text_emb):
            out_text[row] = emb.tolist()
        for row, emb in zip(image_rows, image_emb):
            out_image[row] = emb.tolist()
        return pd.DataFrame({TEXT_OUT: out_text, IMAGE_OUT: out_image}, index=model_input.index)

    @staticmethod
    def _image_bytes(row: int, value: Any) -> bytes:
        if isinstance(value, (bytes, bytearray, memoryview)):
            return bytes(value)
        if isinstance(value, str):  # base64: how JSON requests carry images
            try:
                # line breaks allowed: MLflow's own JSON encoder writes MIME-style base64
                return base64.b64decode("".join(value.split()), validate=True)
            except (binascii.Error, ValueError):
                raise _bad_input(f"row {row}: {IMAGE!r} is a string that is not base64") from None
        raise _bad_input(f"row {row}: {IMAGE!r} must be encoded image bytes (base64 in JSON), "
                         f"got {type(value).__name__}")

    def _which_image(self, images: list[bytes], rows: list[int], exn: Exception) -> MlflowException:
        for row, data in zip(rows, images):
            try:
                self.transform(data)
            except Exception as e:  # noqa: BLE001 - PIL and the pixel cap raise various types
                return _bad_input(f"row {row}: {IMAGE!r} is not a usable image: {type(e).__name__}: {str(e)[:300]}")
        return MlflowException(f"image embedding failed: {type(exn).__name__}: {str(exn)[:300]}")


# --- writing ---------------------------------------------------------------------------------
def _config_record(model) -> dict[str, Any]:
    cfg = model.config
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "act": cfg.act, "text_heads": cfg.text.heads,
            "vision_heads": cfg.vision.heads, "config": {**cfg.to_dict(), "grad_checkpointing": False},
            "image_transform": f"pretrain.data.EvalTransform({cfg.image_size},reduced_decode=False)"}


def write_model_data(model, tokenizer, out: str | os.PathLike) -> Path:
    """The ``data/`` directory of the MLflow model: weights, model config, tokenizer."""
    from safetensors.torch import save_file

    from pretrain.modelio.openai_file import OPENAI_METADATA, openai_weights

    if tokenizer.vocab_size != model.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids, the model {model.vocab_size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(openai_weights(model), str(out / WEIGHTS), metadata=OPENAI_METADATA)
    (out / CONFIG).write_text(json.dumps(_config_record(model), indent=2), encoding="utf-8")
    tokenizer.save(out / TOKENIZER)
    return out


def requirements() -> list[str]:
    """``name==version`` of the installed distributions the model needs."""
    reqs = []
    for name in REQUIREMENTS:
        try:
            reqs.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            reqs.append(name)
    return reqs


def input_example() -> pd.DataFrame:
    """A text row and an image row (an 8 x 8 grey PNG): stored with the model as MLflow's
    serving example, and run through the model once when it is logged (MLflow's check)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (8, 8), 128).save(buf, "PNG")
    return pd.DataFrame({TEXT: ["a photo of a cat.", None], IMAGE: [None, buf.getvalue()]})


def _flavor_kwargs(data_dir: Path) -> dict[str, Any]:
    return {"loader_module": LOADER_MODULE, "data_path": str(data_dir), "signature": SIGNATURE,
            "input_example": input_example(),
            "pip_requirements": requirements(), "metadata": {"format": FORMAT, "format_version": FORMAT_VERSION},
            # the load-time options' defaults (MLflow passes model_config only to models logged with one)
            "model_config": {"device": "auto", "batch_size": DEFAULT_BATCH}}


def save_mlflow_model(model, path: str | os.PathLike, tokenizer) -> Path:
    """Write an MLflow model directory (``path`` must not exist or be empty)."""
    import mlflow

    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="clip-mlflow-") as tmp:
        data = write_model_data(model, tokenizer, Path(tmp) / DATA_DIR)
        mlflow.pyfunc.save_model(str(path), **_flavor_kwargs(data))
    return path


def log_mlflow_model(model, tokenizer, *, tracking_uri: str, run_id: str, name: str = "model",
                     registered_model_name: str = "", step: int = 0):
    """Log the model to run ``run_id`` at ``tracking_uri`` (also registered under
    ``registered_model_name`` when given); returns MLflow's ``ModelInfo``. ``step``: the run's
    metrics of that step are linked to the logged model."""
    import mlflow
    from mlflow.models import Model

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)  # Model.log and the registry use the global URI
    try:
        extra: dict[str, Any] = {}
        client = mlflow.MlflowClient(tracking_uri)
        if hasattr(client, "create_logged_model"):  # MLflow >= 3: models are entities of their own
            # Created here in the run's experiment: Model.log without an active run would put it
            # in the default experiment, where `runs:/<run id>/<name>` does not find it.
            run = client.get_run(run_id)
            extra["model_id"] = client.create_logged_model(
                experiment_id=run.info.experiment_id, name=name, source_run_id=run_id,
                params=dict(run.data.params), model_type="clip-embedder").model_id
        with tempfile.TemporaryDirectory(prefix="clip-mlflow-") as tmp:
            data = write_model_data(model, tokenizer, Path(tmp) / DATA_DIR)
            return Model.log(artifact_path=None, name=name, flavor=mlflow.pyfunc, run_id=run_id, step=step,
                             registered_model_name=registered_model_name or None, **extra, **_flavor_kwargs(data))
    finally:
        mlflow.set_tracking_uri(previous)


# --- loading ---------------------------------------------------------------------------------
def _read_config(data: Path) -> dict[str, Any]:
    try:
        record = json.loads((data / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise MlflowException(f"{data / CONFIG}: not readable as JSON: {e}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise MlflowException(f"{data / CONFIG}: not a {FORMAT} model config")
    if record.get("format_version") != FORMAT_VERSION:
        raise MlflowException(f"{data / CONFIG}: format_version {record.get('format_version')!r} is not "
                              f"{FORMAT_VERSION}; load it with the project version that wrote it")
    return record


def _structure(config: Any) -> Any:
    """What fixes the computation (the init values and checkpointing do not)."""
    if not isinstance(config, dict):
        return config
    return {k: config.get(k) for k in ("embed_dim", "image_size", "vision", "text", "act")}


def load_embedder(data_path: str | os.PathLike, device: str = "auto", batch_size: int = DEFAULT_BATCH) -> ClipEmbedder:
    """A `ClipEmbedder` from a model's ``data/`` directory (safetensors + JSON only)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from pretrain.models import from_openai_state_dict
    from pretrain.tokenizer import ClipTokenizer

    data = Path(data_path)
    record = _read_config(data)
    try:
        sd = load_file(str(data / WEIGHTS))
    except (OSError, SafetensorError, ValueError) as e:
        raise MlflowException(f"{data / WEIGHTS}: not a readable safetensors file: {e}") from None
    try:
        model = from_openai_state_dict(sd, act=record["act"], text_heads=int(record["text_heads"]),
                                       vision_heads=int(record["vision_heads"]))
    except (KeyError, TypeError, ValueError) as e:
        raise MlflowException(f"{data}: the weights do not build the recorded model: {e}") from None
    built, recorded = _structure(model.config.to_dict()), _structure(record.get("config"))
    if built != recorded:
        raise MlflowException(f"{data}: the weights' shapes give {built}, the config says {recorded}")
    try:
        tokenizer = ClipTokenizer.load(data / TOKENIZER)
    except Exception as e:  # noqa: BLE001 - tokenizers raises its own exception type
        raise MlflowException(f"{data / TOKENIZER}: not a CLIP tokenizer: {e}") from None
    if tokenizer.vocab_size != model.vocab_size:
        raise MlflowException(f"{data}: tokenizer has {tokenizer.vocab_size} ids, the model {model.vocab_size}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise MlflowException(f"model_config batch_size must be a positive int, got {batch_size!r}")
    return ClipEmbedder(model, tokenizer, device=device, batch_size=batch_size)


def _load_pyfunc(data_path: str, model_config: dict[str, Any] | None = None) -> ClipEmbedder:
    """MLflow's entry point for ``loader_module`` models (``mlflow.pyfunc.load_model``)."""
    options = dict(model_config or {})
    unknown = sorted(set(options) - {"device", "batch_size"})
    if unknown:
        raise MlflowException(f"unknown model_config keys {unknown}; known: device, batch_size")
    return load_embedder(data_path, device=str(options.get("device", "auto")),
                         batch_size=options.get("batch_size", DEFAULT_BATCH))


def check_mlmodel(local_path: str | os.PathLike) -> None:
    """Raise unless the MLflow model at ``local_path`` is one of ours that loads with this
    module alone: its pyfunc flavor names `LOADER_MODULE`, with no pickled model, no model
    code file and no code paths (each of which MLflow would run at load)."""
    import yaml

    mlmodel = Path(local_path) / "MLmodel"
    try:
        meta = yaml.safe_load(mlmodel.read_text(encoding="utf-8"))
        flavor = meta["flavors"]["python_function"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        raise MlflowException(f"{mlmodel}: not an MLflow pyfunc model: {e}") from None
    if not isinstance(flavor, dict) or flavor.get("loader_module") != LOADER_MODULE:
        raise MlflowException(f"{mlmodel}: loader_module is {flavor.get('loader_module')!r}, not {LOADER_MODULE!r}: "
                              "refused (another loader runs other code)")
    extra = sorted(k for k in ("python_model", "cloudpickle_version", "code", "model_code_path")
                   if flavor.get(k))
    other_flavors = sorted(set(meta["flavors"]) - {"python_function"})
    if extra or other_flavors:
        raise MlflowException(f"{mlmodel}: refused: the model carries {extra + other_flavors}, which MLflow "
                              "would unpickle or execute; ours carry weights, JSON and the tokenizer only")


def load_checked(model_uri: str, model_config: dict[str, Any] | None = None):
    """``mlflow.pyfunc.load_model`` after `check_mlmodel` on the downloaded model: a model
    that would unpickle or run code is refused before anything of it is loaded."""
    import mlflow

    local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri)
    check_mlmodel(local)
    return mlflow.pyfunc.load_model(local, model_config=model_config)
