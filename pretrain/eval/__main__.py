"""``python -m pretrain.eval TASK --checkpoint CKPT --dataset DATASET`` (see cli.py)."""
from pretrain.eval.cli import main

raise SystemExit(main())
