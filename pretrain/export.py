"""Export a training run's checkpoint as one consolidated fp32 state dict in OpenAI's layout.

    python -m pretrain.export RUN_DIR OUT.pt [--tag step_00001000]
    clip-export RUN_DIR OUT.pt

The newest complete checkpoint is used unless `--tag` names one; ZeRO shards (any stage)
are consolidated on CPU. The file loads with `pretrain.models.from_openai_state_dict`
(and with OpenAI's / open_clip's loaders, which use the same key names).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def export(run_dir: str | Path, out: str | Path, tag: str | None = None) -> Path:
    from pretrain.modelio import load_model_from_run  # weights-only: a poisoned run dir is refused
    from pretrain.models import to_openai_state_dict

    model = load_model_from_run(run_dir, tag=tag, device="cpu")
    sd = {k: v.detach().float().contiguous() if v.is_floating_point() else v
          for k, v in to_openai_state_dict(model).items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(sd, tmp)
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="training run directory (holds run_config.yaml and checkpoints/)")
    parser.add_argument("out", help="output .pt file")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: newest complete)")
    args = parser.parse_args(argv)
    try:
        path = export(args.run_dir, args.out, args.tag)
    except (FileNotFoundError, ValueError) as exn:
        print(f"clip-export: {exn}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
