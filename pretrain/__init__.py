"""CLIP pretraining: model zoo, tokenizer, contrastive loss, DeepSpeed training, evaluation.

Training entry point: ``deepspeed pretrain/run.py --config CONFIG.yaml [--key=value ...]``.
"""
__version__ = "0.1.0"
