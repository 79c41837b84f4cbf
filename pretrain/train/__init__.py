"""DeepSpeed training of CLIP: config -> engine (build.py), one step (step.py), the loop
(loop.py), checkpoints and exact resume (checkpoint.py), MLflow (tracking.py), periodic
evaluation (evaluation.py), preemption (preempt.py), process setup (distributed.py).

Entry point: ``deepspeed pretrain/run.py --config RUN.yaml [--key=value ...]``.
"""

from pretrain.train.ds_import import import_deepspeed

# First, before any module of the trainer imports DeepSpeed: then DeepSpeed's autotuner does not
# import MLflow into every rank (pretrain/train/ds_import.py); the tracking rank imports it itself.
import_deepspeed()
