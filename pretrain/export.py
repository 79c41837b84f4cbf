"""Export a training run's checkpoint: consolidated fp32 weights in OpenAI's layout
(safetensors by default) or as a Hugging Face ``transformers`` CLIP directory.

    python -m pretrain.export RUN_DIR OUT [--tag step_00001000] [--pt]
    clip-export RUN_DIR OUT.safetensors           # OpenAI layout, safetensors
    clip-export RUN_DIR OUT --pt                  # also OUT.pt (pickle, for torch.load users)
    clip-export RUN_DIR OUT_DIR --format hf       # CLIPModel/CLIPProcessor.from_pretrained(OUT_DIR)

The newest complete checkpoint is used unless `--tag` names one; ZeRO shards (any stage)
are consolidated on CPU. OUT's suffix (.safetensors / .pt) is replaced: the safetensors
file is always written, the pickle only with `--pt` (or when OUT ends in .pt). Both load with pretrain.modelio
(and with OpenAI's / open_clip's loaders, which use the same key names; ``logit_scale`` is
0-dim there). `--format hf` writes config.json, model.safetensors, the tokenizer files
(OpenAI's BPE vocabulary, which the trainer uses) and
preprocessor_config.json; ViT models only (transformers has no ModifiedResNet).
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
           pt: bool = False) -> list[Path]:
    """Write the export; returns the paths written (an HF export: its directory)."""
    from safetensors.torch import save_file

    from pretrain.modelio import load_model_from_run, save_hf_dir  # weights-only: a poisoned run dir is refused
    from pretrain.models import to_openai_state_dict
    from pretrain.tokenizer import default_tokenizer  # the trainer's tokenizer (pretrain/train/loop.py)

    if fmt not in ("openai", "hf"):
        raise ValueError(f"unknown export format {fmt!r}; use openai or hf")
    model = load_model_from_run(run_dir, tag=tag, device="cpu")
    if getattr(model, "objective", "contrastive") != "contrastive":
        raise ValueError(f"{run_dir}: a {model.objective} model has no OpenAI / HF CLIP layout; its weights are "
                         "the run's checkpoint (pretrain.modelio.load_model_from_run)")
    out = Path(out)
    if fmt == "hf":
        if model.config.family != "vit":
            raise ValueError("--format hf: transformers' CLIPModel has no ModifiedResNet image tower; "
                             "export ResNet models in the OpenAI layout (the default format)")
        return [save_hf_dir(model, out, tokenizer=default_tokenizer())]
    # clone: safetensors refuses tensors that share storage
    sd = {k: v.detach().float().contiguous().clone() if v.is_floating_point() else v.clone()
          for k, v in to_openai_state_dict(model).items()}
    base = out.with_suffix("") if out.suffix in (".pt", ".safetensors") else out
    base.parent.mkdir(parents=True, exist_ok=True)
    written = [base.with_name(base.name + ".safetensors")]
    _atomic(written[0], lambda p: save_file(sd, str(p), metadata={"format": "pt", "layout": "openai"}))
    if pt:
        written.append(base.with_name(base.name + ".pt"))
        _atomic(written[1], lambda p: torch.save(sd, p))
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="training run directory (holds run_config.yaml and checkpoints/)")
    parser.add_argument("out", help="output file (OpenAI layout; suffix replaced) or directory (--format hf)")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: newest complete)")
    parser.add_argument("--format", dest="fmt", choices=("openai", "hf"), default="openai",
                        help="openai: one state-dict file in OpenAI's layout; hf: a transformers CLIP dir")
    parser.add_argument("--pt", action="store_true", help="also write the OpenAI-layout weights as a .pt pickle")
    args = parser.parse_args(argv)
    if args.fmt == "hf" and args.pt:
        parser.error("--pt applies to --format openai only")
    # An OUT named *.pt (the command before safetensors became the default) still gets its .pt.
    pt = args.pt or (args.fmt == "openai" and Path(args.out).suffix == ".pt")
    try:
        paths = export(args.run_dir, args.out, args.tag, fmt=args.fmt, pt=pt)
    except (FileNotFoundError, ValueError) as exn:
        print(f"clip-export: {exn}", file=sys.stderr)
        sys.exit(1)
    for path in paths:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
