"""Evaluation suite: zero-shot classification with prompt ensembling, linear probe, few-shot
probes, image-text retrieval; a CLI and the library functions the trainer calls.

    python -m pretrain.eval zeroshot --checkpoint RUN_DIR_OR_FILE.pt --dataset packaged:fashion-mnist
    python -m pretrain.eval --help        # tasks: zeroshot linear-probe few-shot retrieval ablation

    from pretrain.eval import load_eval_dataset, zeroshot_eval, retrieval_eval, build_zeroshot_classifier
"""
from pretrain.eval.api import build_zeroshot_classifier, retrieval_eval, zeroshot_eval, zeroshot_scores
from pretrain.eval.datasets import EvalDataset, load_eval_dataset

__all__ = [
    "EvalDataset", "build_zeroshot_classifier", "load_eval_dataset", "retrieval_eval",
    "zeroshot_eval", "zeroshot_scores",
]
