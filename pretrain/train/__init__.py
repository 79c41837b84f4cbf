"""DeepSpeed training of CLIP: config -> engine (build.py), one step (step.py), the loop
(loop.py), checkpoints and exact resume (checkpoint.py), MLflow (tracking.py), periodic
evaluation (evaluation.py), preemption (preempt.py), process setup (distributed.py).

Entry point: ``deepspeed pretrain/run.py --config RUN.yaml [--key=value ...]``.
"""
