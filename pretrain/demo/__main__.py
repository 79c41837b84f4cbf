"""``python -m pretrain.demo``: the main job end to end (see ``pretrain/demo/main.py``)."""
from pretrain.demo.main import main

if __name__ == "__main__":
    raise SystemExit(main())
