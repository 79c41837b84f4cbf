"""One model loader: a training run dir of ours (any ZeRO stage), a Hugging Face CLIP dir
(pretrain/modelio/hf.py), an OpenAI-layout ``.safetensors`` file, or a state-dict pickle file (also ``{"state_dict": ...}``-wrapped or ``module.``-prefixed), or a plain
state-dict file. Every pickle is read with ``torch.load(weights_only=True)``; the only
non-tensor globals allowed are the few DeepSpeed writes into its checkpoint files
(``DEEPSPEED_GLOBALS``), found by reading real ZeRO-0/1/2/3 saves of this trainer.

DeepSpeed's own ``zero_to_fp32`` calls ``torch.load(weights_only=False)``; it is run with
``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1``, which makes torch ignore that argument (torch >= 2.4),
so ZeRO-1/2/3 shards are consolidated by DeepSpeed's code without unpickling code.

TorchScript archives (OpenAI's released ``.pt`` files) contain code that runs when
loaded: refused unless ``allow_torchscript=True``.

    model = load_model("runs/vit-b32")                       # newest complete tag, fp32
    model = load_model("ViT-B-32.pt", allow_torchscript=True)  # runs the archive's code
    sd = consolidated_state_dict("runs/vit-b32", tag="step_00000400")
"""
from __future__ import annotations

import contextlib
import io
import os
import pickle
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import torch

from pretrain.modelio.hf import is_hf_dir, read_hf_dir
from pretrain.modelio.tags import CHECKPOINT_DIR, complete_tags, read_marker
from pretrain.progress import verbose


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds something other than tensors and plain containers."""


class TorchScriptRefused(ValueError):
    """A TorchScript archive was given without ``allow_torchscript``."""


TORCHSCRIPT_FLAG = "--allow-torchscript-code"


def deepspeed_globals() -> list[Any]:
    """The non-tensor classes DeepSpeed pickles into ZeRO optimizer-state files: found in real
    bf16 and fp32 ZeRO-1/2/3 saves; DynamicLossScaler is what an fp16 run stores in its place
    (ZeRO's state_dict keeps the loss-scaler object), read from DeepSpeed's source."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only(extra_globals: list[Any] = ()) -> Iterator[None]:
    """Force every ``torch.load`` inside to ``weights_only=True`` (even callers passing False),
    with ``extra_globals`` allowed. The variable is process-wide while the block runs."""
    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(list(extra_globals)):
            yield
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(f"refused to load a checkpoint that holds more than weights "
                                    f"(it could run code): {str(e).splitlines()[0]}") from e
    finally:
        if old is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old


def is_run_dir(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and ((path / "run_config.yaml").is_file() or (path / CHECKPOINT_DIR).is_dir())


def resolve_tag(run_dir: str | Path, tag: str | None) -> str:
    tags = complete_tags(run_dir)
    if tag is None:
        if not tags:
            raise FileNotFoundError(f"{run_dir} has no complete checkpoint under {CHECKPOINT_DIR}/")
        return tags[-1]
    if tag not in tags:
        raise FileNotFoundError(f"checkpoint {tag} of {run_dir} is missing or incomplete; complete: {tags}")
    return tag


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """zero_to_fp32's prints and its tqdm bar ("Processing zero checkpoint ...") only with
    CLIP_VERBOSE; shown after all when the consolidation fails."""
    if verbose():
        yield
        return
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            yield
    except BaseException:
        sys.stderr.write(buf.getvalue())
        raise


def consolidated_state_dict(run_dir: str | Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """fp32 module state dict of a complete tag (newest when None), whatever the ZeRO stage."""
    run_dir = Path(run_dir)
    tag = resolve_tag(run_dir, tag)
    root = run_dir / CHECKPOINT_DIR
    record = read_marker(root / tag) or {}
    with weights_only(deepspeed_globals()):
        if int(record.get("zero_stage", 0)) >= 1:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            with _quiet():
                sd = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
        else:  # ZeRO-0 has no shards: the module is stored whole
            sd = torch.load(root / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
            sd = sd["module"] if isinstance(sd, dict) else None
    if not isinstance(sd, dict):
        raise ValueError(f"checkpoint {root / tag} holds no module state dict")
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def load_model_from_run(run_dir: str | Path, tag: str | None = None, device: str | torch.device = "cpu"):
    """The run's model (`run_config.yaml`: model.name + model.overrides) with consolidated
    fp32 weights from a complete checkpoint, in eval mode."""
    import yaml

    from pretrain.loss import objective_of
    from pretrain.models import create_model

    cfg = yaml.safe_load((Path(run_dir) / "run_config.yaml").read_text(encoding="utf-8"))
    objective = objective_of((cfg.get("train") or {}).get("loss", "clip"))  # captioning / bow: other classes
    model = create_model(cfg["model"]["name"], objective=objective, **(cfg["model"].get("overrides") or {}))
    model.load_state_dict(consolidated_state_dict(run_dir, tag))
    return model.to(device).eval()


def _is_torchscript(data: bytes) -> bool:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            names = z.namelist()
    except zipfile.BadZipFile:
        return False
    return any(n.split("/", 1)[-1].startswith(("code/", "constants.pkl")) for n in names)


def _load_safetensors(data: bytes, spec: Any) -> dict[str, Any]:
    """A ``.safetensors`` file: tensors only by construction (no pickle, nothing to run)."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    try:
        return dict(load_safetensors(data))
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise ValueError(f"{spec}: not a valid safetensors file: {e}") from e


def load_state_dict_file(spec: str | os.PathLike, *, allow_torchscript: bool = False) -> dict[str, Any]:
    """A state dict from a local path or fsspec URL: ``.safetensors``, or a pickle: plain, ``{"state_dict": ...}``-wrapped or
    ``module.``-prefixed (unwrapped here). A TorchScript archive only with ``allow_torchscript``."""
    fs, path = fsspec.core.url_to_fs(str(spec))
    if not fs.isfile(path):
        raise FileNotFoundError(f"no such state-dict file: {spec}")
    with fs.open(path, "rb") as f:
        data = f.read()
    if str(path).endswith(".safetensors"):
        return _load_safetensors(data, spec)
    if _is_torchscript(data):
        if not allow_torchscript:
            raise TorchScriptRefused(
                f"{spec} is a TorchScript archive: loading it runs the code it contains. Pass "
                f"{TORCHSCRIPT_FLAG} (allow_torchscript=True) only for files you trust, or convert it "
                "once to a plain state dict with torch.save(torch.jit.load(f).state_dict(), out)")
        sd = torch.jit.load(io.BytesIO(data), map_location="cpu").state_dict()
    else:
        try:
            sd = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(f"{spec}: refused, the file holds more than weights (it could run "
                                        f"code): {str(e).splitlines()[0]}") from e
        except (RuntimeError, zipfile.BadZipFile) as e:
            raise ValueError(f"{spec}: not a torch state-dict file: {e}") from e
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{spec}: expected a state dict, got {type(sd).__name__}")
    if sd and all(isinstance(k, str) and k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def load_model(spec: str | os.PathLike, *, tag: str | None = None, device: str | torch.device = "cpu",
               image_size: int | None = None, act: str | None = None, allow_torchscript: bool = False):
    """A model in eval mode from a run dir, a Hugging Face CLIP dir (``hf:DIR`` or a dir
    holding config.json + model.safetensors) or an OpenAI-layout file (.safetensors or a
    pickle). ``image_size`` applies to files and HF dirs, ``act`` to files only (a run dir's
    and an HF dir's config fix it)."""
    from pretrain.models import from_openai_state_dict

    if str(spec).startswith("hf:") or is_hf_dir(spec):
        sd, hf_overrides = read_hf_dir(spec)
        return from_openai_state_dict(sd, image_size=image_size, **hf_overrides).to(device).eval()
    if os.path.isdir(spec):
        if not is_run_dir(spec):
            raise ValueError(f"{spec}: a directory must be a training run dir (run_config.yaml + checkpoints/) "
                             "or a Hugging Face CLIP dir (config.json + model.safetensors)")
        return load_model_from_run(spec, tag=tag, device=device)

    overrides = {"act": act} if act else {}
    sd = load_state_dict_file(spec, allow_torchscript=allow_torchscript)
    return from_openai_state_dict(sd, image_size=image_size, **overrides).to(device).eval()
