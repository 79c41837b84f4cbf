"""Export a training run's checkpoint: consolidated fp32 weights in OpenAI's layout
(safetensors by default) or as a Hugging Face ``transformers`` CLIP directory.

    python -m pretrain.export RUN_DIR OUT [--tag step_00001000] [--pt]
    clip-export RUN_DIR OUT.safetensors           # OpenAI layout, safetensors
    clip-export RUN_DIR OUT --pt                  # also OUT.pt (pickle, for torch.load users)
    clip-export RUN_DIR DIR/NAME --open-clip-config   # also DIR/NAME.json: open_clip.add_model_config(DIR),
                                                  # open_clip.create_model_and_transforms(NAME, pretrained=...)
    clip-export RUN_DIR OUT_DIR --format hf       # CLIPModel/CLIPProcessor.from_pretrained(OUT_DIR)
    clip-export RUN_DIR OUT_DIR --format mlflow   # mlflow.pyfunc.load_model(OUT_DIR), mlflow models serve -m OUT_DIR

The newest complete checkpoint is used unless `--tag` names one; ZeRO shards (any stage)
are consolidated on CPU. OUT's suffix (.safetensors / .pt) is replaced: the safetensors
file is always written, the pickle only with `--pt` (or when OUT ends in .pt). Both load with pretrain.modelio
(and with OpenAI's / open_clip's loaders, which use the same key names; ``logit_scale`` is
0-dim there). `--format hf` writes config.json, model.safetensors, the tokenizer files
(OpenAI's BPE vocabulary, which the trainer uses) and
preprocessor_config.json; ViT models only (transformers has no ModifiedResNet). `--format
mlflow` writes an MLflow pyfunc model directory that embeds texts and images (the model the
trainer logs at the end of a run: pretrain/modelio/mlflow_model.py); OUT_DIR must not exist
or be empty.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def _atomic(out: Path, write) -> None:
    tmp = out.with_name(out.name + ".tmp")
    write(tmp)
    tmp.replace(out)


def export(run_dir: str | Path, out: str | Path, tag: str | None = None, fmt: str = "openai",
           pt: bool = False, open_clip_config: bool = False) -> list[Path]:
    """Write the export; returns the paths written (an HF export: its directory).
    ``open_clip_config``: also OUT.json, open_clip's model config for these weights."""
    from pretrain.modelio import load_model_from_run, save_hf_dir  # weights-only: a poisoned run dir is refused
    from pretrain.tokenizer import default_tokenizer  # the trainer's tokenizer (pretrain/train/loop.py)

    if fmt not in ("openai", "hf", "mlflow"):
        raise ValueError(f"unknown export format {fmt!r}; use openai, hf or mlflow")
    out = Path(out)
    if fmt == "mlflow" and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--format mlflow: {out} exists and is not an empty directory")
    model = load_model_from_run(run_dir, tag=tag, device="cpu")
    if getattr(model, "objective", "contrastive") != "contrastive":
        raise ValueError(f"{run_dir}: a {model.objective} model has no OpenAI / HF / MLflow CLIP layout; its "
                         "weights are the run's checkpoint (pretrain.modelio.load_model_from_run)")
    if fmt == "mlflow":
        from pretrain.modelio.mlflow_model import save_mlflow_model

        return [save_mlflow_model(model, out, tokenizer=default_tokenizer())]
    if fmt == "hf":
        if model.config.family != "vit":
            raise ValueError("--format hf: transformers' CLIPModel has no ModifiedResNet image tower; "
                             "export ResNet models in the OpenAI layout (the default format)")
        return [save_hf_dir(model, out, tokenizer=default_tokenizer())]
    written = save_openai_layout(model, out, pt=pt)
    if open_clip_config:
        from pretrain.modelio.openclip import write_open_clip_config

        written.append(write_open_clip_config(model.config, written[0].with_suffix(".json")))
    return written


def save_openai_layout(model: torch.nn.Module, out: str | Path, pt: bool = False) -> list[Path]:
    """Write ``model``'s weights in OpenAI's layout: OUT.safetensors, and OUT.pt with ``pt``
    (OUT's .pt / .safetensors suffix replaced); returns the paths written."""
    from safetensors.torch import save_file

    from pretrain.modelio.openai_file import OPENAI_METADATA, openai_weights

    out = Path(out)
    sd = openai_weights(model)
    base = out.with_suffix("") if out.suffix in (".pt", ".safetensors") else out
    base.parent.mkdir(parents=True, exist_ok=True)
    written = [base.with_name(base.name + ".safetensors")]
    _atomic(written[0], lambda p: save_file(sd, str(p), metadata=OPENAI_METADATA))
    if pt:
        written.append(base.with_name(base.name + ".pt"))
        _atomic(written[1], lambda p: torch.save(sd, p))
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="training run directory (holds run_config.yaml and checkpoints/)")
    parser.add_argument("out", help="output file (OpenAI layout; suffix replaced) or directory (--format hf / mlflow)")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: newest complete)")
    parser.add_argument("--format", dest="fmt", choices=("openai", "hf", "mlflow"), default="openai",
                        help="openai: one state-dict file in OpenAI's layout; hf: a transformers CLIP dir; "
                             "mlflow: an MLflow pyfunc model dir (embeds texts and images)")
    parser.add_argument("--pt", action="store_true", help="also write the OpenAI-layout weights as a .pt pickle")
    parser.add_argument("--open-clip-config", action="store_true",
                        help="also write OUT.json, an open_clip model config (open_clip.add_model_config(dir), "
                             "then model name = OUT's stem)")
    args = parser.parse_args(argv)
    if args.fmt != "openai" and (args.pt or args.open_clip_config):
        parser.error("--pt and --open-clip-config apply to --format openai only")
    # An OUT named *.pt (the command before safetensors became the default) still gets its .pt.
    pt = args.pt or (args.fmt == "openai" and Path(args.out).suffix == ".pt")
    try:
        paths = export(args.run_dir, args.out, args.tag, fmt=args.fmt, pt=pt, open_clip_config=args.open_clip_config)
    except (FileNotFoundError, ValueError) as exn:
        print(f"clip-export: {exn}", file=sys.stderr)
        sys.exit(1)
    for path in paths:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
